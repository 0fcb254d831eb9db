"""Images in and out of the server: safe decoding of untrusted bytes, PNG encoding in memory.

Decoding refuses what would cost more than the limits allow *before* pixels are decompressed:
the header gives the size, so a small file that would expand to gigabytes (a decompression bomb)
is refused with 413 without being decoded. Only common still-image formats are opened (no TIFF,
EPS or other rarely used decoders), and truncated files are errors (PIL's global
`LOAD_TRUNCATED_IMAGES` stays off). The decoded image keeps its mode: the pipeline's
`check_inputs` turns every mode into RGB (`unipic.images.to_rgb`, with the model's own background
for transparency), exactly as for the CLI.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping

from PIL import Image, ImageOps, UnidentifiedImageError

from unipic.io_utils import encode_image
from unipic.serve.errors import APIError, bad_request, too_large
from unipic.serve.limits import ServeLimits

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def decode_image(data: bytes, limits: ServeLimits, *, param: str = "image") -> Image.Image:
    """Decode untrusted image bytes (the first frame, upright by its EXIF orientation, in its own mode),
    or raise a 400/413 `APIError` in plain words."""
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
                # A copy detached from the file; phone photos: honour the orientation tag.
                return ImageOps.exif_transpose(image)
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
    """PNG bytes with `text` in text chunks (non-string values as JSON), written as the CLI writes its files."""
    return encode_image(image, "PNG", text)


def png_b64(image: Image.Image, text: Mapping[str, object] | None = None) -> str:
    """`encode_png` as base64 text (the `b64_json` field of an images response)."""
    return base64.b64encode(encode_png(image, text)).decode("ascii")
