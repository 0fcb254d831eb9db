"""multipart/form-data parsed in memory (python-multipart's streaming parser, our own buffers).

Starlette's `request.form()` spools file parts over 1 MB to temporary files on disk; the server
promises to write nothing to disk, and the body is already bounded by the size limit, so the whole
form is collected in memory instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unipic.serve.errors import APIError, bad_request

MAX_PARTS = 64  # a form has a handful of fields; thousands of tiny parts would only cost CPU


@dataclass
class FormPart:
    """One field of a form: its name, the file name when it is a file, and its bytes."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass
class Form:
    """The parsed fields, in order; a name may repeat (`image[]`)."""

    parts: list[FormPart] = field(default_factory=list)

    def get(self, name: str) -> FormPart | None:
        """The first part called `name`, if any."""
        return next((p for p in self.parts if p.name == name), None)

    def all(self, *names: str) -> list[FormPart]:
        """Every part whose name is one of `names`."""
        return [p for p in self.parts if p.name in names]


def _content_disposition(value: bytes) -> tuple[str | None, str | None]:
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(value)
    if kind.lower() != b"form-data":
        return None, None
    name = options.get(b"name")
    filename = options.get(b"filename")
    return (name.decode("utf-8", "replace") if name is not None else None,
            filename.decode("utf-8", "replace") if filename is not None else None)


def parse_multipart(body: bytes, content_type: str) -> Form:
    """Parse a complete multipart/form-data body; a malformed one is a 400 in plain words."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind.lower() != b"multipart/form-data" or not boundary:
        raise bad_request("send the edit as multipart/form-data with an 'image' file part and a 'prompt' field",
                          None, "invalid_content_type")
    form = Form()
    state: dict = {"headers": {}, "field": b"", "value": b"", "chunks": []}

    def on_part_begin() -> None:
        state["headers"], state["chunks"] = {}, []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].strip().lower()] = state["value"].strip()
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["chunks"].append(data[start:end])

    def on_part_end() -> None:
        if len(form.parts) >= MAX_PARTS:
            raise bad_request(f"the form has more than {MAX_PARTS} parts", None, "invalid_form")
        name, filename = _content_disposition(state["headers"].get(b"content-disposition", b""))
        if name is None:
            raise bad_request("a form part has no name (Content-Disposition: form-data; name=...)", None,
                              "invalid_form")
        ctype = state["headers"].get(b"content-type")
        form.parts.append(FormPart(name, b"".join(state["chunks"]), filename,
                                   ctype.decode("latin-1") if ctype else None))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except Exception as error:  # python-multipart raises its own parse errors (and ValueError)
        if isinstance(error, APIError):
            raise
        raise bad_request(f"the multipart form is malformed ({str(error)[:200] or type(error).__name__})", None,
                          "invalid_form") from None
    return form
