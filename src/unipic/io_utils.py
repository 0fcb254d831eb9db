"""Atomic file output: write to a temporary file in the destination folder, then rename.

A crash or Ctrl-C therefore never leaves a half-written image, JSON or checkpoint behind,
and resumable jobs can treat "file exists" as "file is complete".
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    created = _make_folders(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, path)
    except BaseException:
        # Leave nothing behind on failure (a full disk, KeyboardInterrupt): no temp file, and no
        # output folder this call created and left empty.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        _remove_empty(created)
        raise
    return path


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, innermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer), or already gone
            return


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write one JSON object per line to `path` atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# EXIF ImageDescription: where JPEG and WebP outputs keep the settings that PNG keeps in text chunks.
EXIF_DESCRIPTION = 0x010E


def _chunk_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=False)


def output_record(model: str, seed: int | None, settings: Mapping[str, object], **extra: object) -> dict[str, str]:
    """What an output image was made from, once each: model, seed, the exact settings sampling used
    (a `CheckedInputs.settings`, as JSON; NaN is refused) and the texts (`prompt`, `index`, ...).

    The CLI writes this into its files and `unipic serve` into the PNGs it returns, so both read the same.
    """
    return {"software": "unipic", "model": model, "seed": str(seed),
            "settings": json.dumps(dict(settings), sort_keys=True, allow_nan=False),
            **{key: str(value) for key, value in extra.items()}}


def save_image_atomic(
    image: Image.Image, path: str | os.PathLike, text_chunks: Mapping[str, object] | None = None
) -> Path:
    """Save an image atomically with `text_chunks` (non-str values as JSON; NaN is refused).

    PNG keeps each chunk as a tEXt/iTXt entry; JPEG and WebP keep them all as one JSON object in
    the EXIF ImageDescription tag (escaped to ASCII, as EXIF requires). `read_image_metadata`
    reads either back.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format from the file name {str(path)!r}; use .png or .jpg")
    return atomic_write_bytes(path, encode_image(image, fmt, text_chunks))


def encode_image(image: Image.Image, fmt: str, text_chunks: Mapping[str, object] | None = None) -> bytes:
    """The bytes `save_image_atomic` writes: `fmt` ("PNG", "JPEG", "WEBP", ...) with `text_chunks`."""
    chunks = {key: _chunk_text(value) for key, value in (text_chunks or {}).items()}
    buffer = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        image.save(buffer, format="PNG", pnginfo=info)
    elif chunks and fmt in ("JPEG", "WEBP"):
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = json.dumps(chunks, sort_keys=True, ensure_ascii=True)
        image.save(buffer, format=fmt, exif=exif.tobytes())
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def read_image_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks `save_image_atomic` wrote ({} for an image without them or an unreadable file)."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                return dict(getattr(image, "text", {}))
            description = image.getexif().get(EXIF_DESCRIPTION)
    except (OSError, SyntaxError, ValueError):
        return {}
    try:
        data = json.loads(description) if isinstance(description, str) else {}
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`; None when it is missing, a folder, unreadable, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
