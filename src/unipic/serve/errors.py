"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

Request values are checked by the package's own checks (`unipic.checks`, each pipeline's
`check_inputs`), which raise `UserError`; `user_errors` turns those into 400s naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from unipic.api import UnsupportedTaskError, UserError

# OpenAI's error types by HTTP status; clients (openai, litellm) map statuses to exception classes.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          503: "server_error", 500: "server_error"}


class APIError(Exception):
    """An error answered to the client: HTTP status, plain-words message, the offending field and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's API answers with."""
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` for a status and message."""
    kind = _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 for a bad field."""
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None, code: str = "too_large") -> APIError:
    """A 413 for a body or image over its limit."""
    return APIError(413, message, param=param, code=code)


def busy(message: str, retry_after: int) -> APIError:
    """A 503 with Retry-After (seconds)."""
    return APIError(503, message, code="server_busy", headers={"Retry-After": str(max(1, int(retry_after)))})


def from_user_error(error: UserError, param: str | None = None) -> APIError:
    """A 400 for a `UserError`: `unsupported_task` when the model cannot do the job, else `invalid_value`."""
    code = "unsupported_task" if isinstance(error, UnsupportedTaskError) else "invalid_value"
    return APIError(400, str(error), param=param, code=code)


@contextmanager
def user_errors(param: str | None = None) -> Iterator[None]:
    """Answer a `UserError` raised inside (by `unipic.checks` or a pipeline's checks) as a 400 naming `param`."""
    try:
        yield
    except UserError as error:
        raise from_user_error(error, param) from None
