"""Images in and out of the server: safe decoding of untrusted bytes, PNG encoding in memory.

Decoding refuses what would cost more than the limits allow *before* pixels are decompressed:
the header gives the size, so a small file that would expand to gigabytes (a decompression bomb)
is refused with 413 without being decoded. Only common still-image formats are opened (no TIFF,
EPS or other rarely used decoders), truncated files are errors (PIL's global
`LOAD_TRUNCATED_IMAGES` stays off), and every mode PIL can produce is turned into RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from unipic.serve.errors import APIError, bad_request, too_large
from unipic.serve.limits import ServeLimits

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def decode_image(data: bytes, limits: ServeLimits, *, param: str = "image") -> Image.Image:
    """Decode untrusted image bytes into an RGB image, or raise a 400/413 `APIError` in plain words."""
    if not data:
        raise bad_request("the image is empty (0 bytes); upload a PNG, JPEG, WebP, GIF or BMP file", param,
                          "invalid_image")
    if len(data) > limits.max_upload_bytes:
        raise too_large(f"the image file is {len(data):,} bytes; the limit is {limits.max_upload_bytes:,} bytes",
                        param, "image_too_large")
    with warnings.catch_warnings():
        # Our own pixel limit replaces PIL's global one; its warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError:
            raise _too_many_pixels(None, limits, param) from None
        except UnidentifiedImageError:
            raise bad_request("the upload is not an image this server reads; send a PNG, JPEG, WebP, GIF or BMP "
                              "file", param, "invalid_image") from None
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise bad_request(f"the image file is damaged and cannot be read ({_reason(error)})", param,
                              "invalid_image") from None
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise bad_request(f"the image has no pixels ({width}x{height})", param, "invalid_image")
            if width * height > limits.max_image_pixels:
                raise _too_many_pixels((width, height), limits, param)
            try:
                image.load()  # the first frame of an animation
                image = ImageOps.exif_transpose(image) or image  # phone photos: honour the orientation tag
                return to_rgb(image)
            except Image.DecompressionBombError:
                raise _too_many_pixels((width, height), limits, param) from None
            except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
                raise bad_request(f"the image file is truncated or damaged and cannot be decoded "
                                  f"({_reason(error)})", param, "invalid_image") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text[:200]


def _too_many_pixels(size: tuple[int, int] | None, limits: ServeLimits, param: str) -> APIError:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "too many pixels"
    return too_large(f"the image has {what}; the limit is {limits.max_image_pixels:,} pixels (this also refuses "
                     f"decompression bombs); send a smaller image", param, "image_too_large")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16/32-bit and float scaled down."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith(("I", "F")):
        # PIL's own I/F → RGB conversion clips at 255, which turns 16-bit images white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def decode_data_url(url: object, limits: ServeLimits, *, param: str) -> Image.Image:
    """An image from a `data:image/...;base64,...` URL (remote URLs are refused: the server fetches nothing)."""
    if not isinstance(url, str):
        raise bad_request(f"{param} must be a string (a data: URL), got {type(url).__name__}", param, "invalid_type")
    match = _DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0][:20] if ":" in url else "no scheme"
        raise bad_request(f"{param} must be a data: URL with a base64 image (data:image/png;base64,...); got "
                          f"{scheme!r}: this server does not fetch remote images", param, "invalid_image_url")
    if not match.group("b64"):
        raise bad_request(f"{param}: the data: URL must be base64-encoded (data:image/png;base64,...)", param,
                          "invalid_image_url")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > limits.max_upload_bytes + 3:
        raise too_large(f"the image in {param} is about {len(payload) * 3 // 4:,} bytes; the limit is "
                        f"{limits.max_upload_bytes:,} bytes", param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL is not valid base64", param, "invalid_image_url") from None
    return decode_image(data, limits, param=param)


def encode_png(image: Image.Image, text: Mapping[str, object] | None = None) -> bytes:
    """PNG bytes with `text` in tEXt chunks (non-string values as JSON), like the CLI's files."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_b64(image: Image.Image, text: Mapping[str, object] | None = None) -> str:
    """`encode_png` as base64 text (the `b64_json` field of an images response)."""
    return base64.b64encode(encode_png(image, text)).decode("ascii")
