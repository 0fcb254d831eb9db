"""The FastAPI application of `unipic serve`: OpenAI-shaped endpoints over one `UnifiedPipeline`.

Endpoints: `POST /v1/images/generations`, `POST /v1/images/edits` (multipart), `POST
/v1/chat/completions` (image_url data URLs; `stream: true` for server-sent events), `GET /v1/models`,
`GET /health`, `GET /metrics` (queue and batch counters) and the web page at `/`.

Bodies are read and validated here rather than by FastAPI's automatic parsing, so every mistake
gets OpenAI's error body with the field at fault in `param`, and multipart uploads stay in memory.
The model is loaded in the background after the server starts listening: `/health` says
"loading" (503) until it is ready, then "ready".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from unipic.api import CheckedInputs, UnifiedPipeline, UserError, runtime_settings
from unipic.checks import (
    MAX_CFG,
    MAX_SEED,
    MAX_TEMPERATURE,
    PIXEL_MULTIPLE,
    check_int,
    check_number,
    check_seed,
    check_size,
)
from unipic.io_utils import output_record
from unipic.serve.batching import Batcher, Job, shutting_down
from unipic.serve.errors import APIError, bad_request, error_body, from_user_error, too_large, user_errors
from unipic.serve.images import decode_data_url, decode_image, png_b64
from unipic.serve.jobs import (
    ChatSettings,
    ChatWork,
    EditWork,
    GenerateWork,
    ImageSettings,
    InpaintWork,
    run_jobs,
)
from unipic.serve.limits import ServeLimits
from unipic.serve.multipart import parse_multipart

logger = logging.getLogger("unipic.serve")
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})  # the page holds no data; it asks for the key itself
MAX_CHAT_TEMPERATURE = 2.0  # OpenAI's range for chat completions
KEEPALIVE_SECONDS = 5.0  # SSE comment while the answer is computed; also notices a gone client
REQUEST_TIMEOUT = 30.0  # seconds a request's body may take to arrive (slow clients hold a connection)

# OpenAI parameters whose neutral value asks for nothing: sent with that value they are dropped before
# validation; any other value (and any parameter not declared) is a 400 naming it.
_NEUTRAL: dict[str, tuple] = {
    "store": (None, False), "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "service_tier": (None, "auto"),
    "quality": (None, "auto"), "background": (None, "auto"), "moderation": (None, "auto"), "style": (None,),
    "stream": (None, False, "false"), "partial_images": (None, 0, "0"),
}


# ---------------------------------------------------------------------------------------------
# Request shapes (the fields OpenAI's client sends that this server honours; any other field is a
# 400 naming it, never silently ignored)
# ---------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = None  # OpenAI's end-user id: accepted and not used (documented)


class ImageRequest(_Request):
    """Fields shared by generations and edits (`seed` ... `temperature` come as `extra_body`)."""

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    temperature: float | None = None
    fast: bool | None = None  # UniPic-1's training-free shortcuts (`unipic generate --fast`)


class ChatRequest(_Request):
    """An OpenAI chat completion request; the messages are checked by hand for precise errors."""

    messages: list[Any]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None


def _same(value: Any, neutral: Any) -> bool:
    """`value` is the neutral value (0 and 0.0 alike, but a boolean only equals a boolean)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def _validate(model: type[BaseModel], data: Any, *, strict: bool) -> Any:
    """Validate into `model`; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", None,
                          "invalid_request")
    data = {name: value for name, value in data.items()  # a neutral value asks for nothing: honoured by leaving it
            if name in model.model_fields or not any(_same(value, ok) for ok in _NEUTRAL.get(name, ()))}
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        if first.get("type") == "extra_forbidden":
            raise bad_request(f"'{param}' is not supported by this server; leave it out (see docs/serve.md for the "
                              "parameters each endpoint honours)", param, "unsupported_parameter") from None
        if first.get("type") == "missing":
            raise bad_request(f"'{param}' is required", param, "missing_required_parameter") from None
        got = first.get("input")
        shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        raise bad_request(f"'{param}': {first.get('msg', 'invalid value')} (got {shown})", param,
                          "invalid_type") from None


# ---------------------------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the endpoints share: the pipeline once loaded, the batcher, counters."""

    model_name: str
    limits: ServeLimits
    api_key: str | None
    status: str = "loading"  # loading -> ready | failed
    error: str | None = None
    pipeline: UnifiedPipeline | None = None
    batcher: Batcher | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0  # clients that went away before their answer (not errors)
    closing: bool = False  # shutting down: everything new is answered 503 shutting_down


def create_app(load: Callable[[], UnifiedPipeline], *, model_name: str, limits: ServeLimits | None = None,
               api_key: str | None = None, on_ready: Callable[[], None] | None = None,
               on_failed: Callable[[str], None] | None = None, allowed_hosts: Sequence[str] | None = None,
               allowed_origins: Sequence[str] = (), request_timeout: float | None = REQUEST_TIMEOUT) -> FastAPI:
    """The application; `load()` runs on the model thread after start-up (`on_ready`/`on_failed` report it).

    `allowed_hosts`: the `Host` names answered (None: any; `unipic serve` passes the names it is bound
    to, so a DNS-rebinding page cannot read answers). `allowed_origins`: other sites' pages allowed
    to call the API from a browser (CORS; none by default); a browser POST from any other page is
    refused 403. `request_timeout`: seconds a request body may take to arrive (408 after; None: no limit).
    """
    limits = limits or ServeLimits()
    state = ServerState(model_name=model_name, limits=limits, api_key=api_key or None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(lambda jobs: run_jobs(state.pipeline, jobs), limits)
        state.batcher = batcher

        async def load_model() -> None:
            try:
                state.pipeline = await batcher.run_sync(load)
            except Exception as error:  # reported, and the CLI stops the server
                state.status, state.error = "failed", str(error) or type(error).__name__
                if on_failed is not None:
                    on_failed(state.error)
                else:
                    logger.error("loading the model failed: %s", state.error)
                return
            batcher.start()
            state.status = "ready"
            if on_ready is not None:
                on_ready()

        loader = asyncio.get_running_loop().create_task(load_model(), name="unipic-load")
        try:
            yield
        finally:
            loader.cancel()
            await batcher.stop()

    app = FastAPI(title="unipic", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.unipic = state
    app.add_middleware(_Guard, state=state, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                       request_timeout=request_timeout)
    if allowed_origins:
        # Added last, so it is outermost: preflights are answered before the key check.
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    _add_error_handlers(app, state)
    _add_routes(app, state)
    return app


async def drain(app: FastAPI, timeout: float) -> None:
    """Begin a graceful shutdown: answer new and waiting requests 503 `shutting_down`, let the running
    batch finish within `timeout` seconds, then stop it at its next sampler step (the CLI calls this on
    SIGINT/SIGTERM, before uvicorn closes the connections)."""
    state: ServerState = app.state.unipic
    state.closing = True
    if state.batcher is not None:
        await state.batcher.drain(timeout)


# ---------------------------------------------------------------------------------------------
# Auth and body size (plain ASGI, so both act before the body is read)
# ---------------------------------------------------------------------------------------------


def host_name(header: str) -> str:
    """The name of a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """Host, origin, bearer-key and request-body checks; refusals are answered before any body is read.

    Also: while shutting down everything is answered 503 `shutting_down`, and a body that stops
    arriving for `request_timeout` seconds is answered 408.
    """

    def __init__(self, app, state: ServerState, allowed_hosts: Sequence[str] | None, allowed_origins: Sequence[str],
                 request_timeout: float | None) -> None:
        self.app = app
        self.state = state
        self.limit = state.limits.max_body_bytes
        self.api_key = state.api_key.encode() if state.api_key else None
        self.hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.origins = {origin.rstrip("/") for origin in allowed_origins}
        self.request_timeout = request_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.hosts is not None and "*" not in self.hosts:
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.hosts:
                await _send_json(send, 400, error_body(400, f"this server answers for {', '.join(sorted(self.hosts))}, "
                                                            f"not for Host '{name}' (see --allowed-hosts)",
                                                       code="invalid_host"))
                return
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and scope.get("method") not in ("GET", "HEAD", "OPTIONS") and not self._same_site(
                origin, headers.get(b"host", b"").decode("latin-1")):
            # A form POST from another site's page (multipart is a "simple" request: no preflight stops it).
            await _send_json(send, 403, error_body(403, f"requests from the web page at {origin} are not allowed; "
                                                        "start the server with --allowed-origins to allow them",
                                                   code="origin_not_allowed"))
            return
        if self.state.closing:
            await _send_json(send, 503, shutting_down().body(), {"Connection": "close"})
            return
        if self.api_key is not None and scope.get("path") not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = ("this server needs an API key: send 'Authorization: Bearer <key>'" if not given
                           else "the API key is not valid")
                await _send_json(send, 401, error_body(401, message, code="invalid_api_key"),
                                 {"WWW-Authenticate": "Bearer"})
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, error_body(400, "the Content-Length header is not a number",
                                                       code="invalid_request"))
                return
            if declared > self.limit:
                if b"100-continue" not in headers.get(b"expect", b"").lower():
                    await self._drain(receive, 0)
                await _send_json(send, 413, error_body(413, f"the request body is {declared:,} bytes; the limit is "
                                                            f"{self.limit:,} bytes", code="request_too_large"),
                                 {"Connection": "close"})
                return
        received = 0
        complete = False

        async def counted_receive():
            nonlocal received, complete
            if complete or self.request_timeout is None:
                message = await receive()  # the body is in: what comes now is the disconnect
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.request_timeout)
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request body did not arrive within {self.request_timeout:g} s",
                                   code="request_timeout", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body without Content-Length
                    if message.get("more_body"):
                        await self._drain(receive, received)
                    raise too_large(f"the request body is over the limit of {self.limit:,} bytes", None,
                                    "request_too_large")
            return message

        await self.app(scope, counted_receive, send)

    def _same_site(self, origin: str, host: str) -> bool:
        """The page making the request is this server's own, or one `--allowed-origins` lists."""
        return origin.rstrip("/") in self.origins or urlsplit(origin).netloc.lower() == host.lower()


    async def _drain(self, receive, received: int) -> None:
        """Read and drop the rest of a refused body, up to a few times the limit.

        A server that answers and closes while the client is still sending makes the client's
        kernel reset the connection, and the client then sees a broken pipe instead of the 413.
        Draining a bounded amount first lets ordinary clients read the answer.
        """
        cap = 4 * self.limit
        while received < cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                return


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    def count(status: int) -> None:
        state.errors[str(status)] = state.errors.get(str(status), 0) + 1

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        count(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        count(error.status_code)
        if error.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}", "unknown_url"
        elif error.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return JSONResponse(error_body(error.status_code, message, code=code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        state.disconnects += 1  # the client hung up while sending: nobody to answer, nothing went wrong here
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        count(400)
        return JSONResponse(error_body(400, f"invalid request: {error.errors()[0].get('msg', '')}"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        count(500)
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(error).__name__})",
                                       code="internal_error"), status_code=500)


# ---------------------------------------------------------------------------------------------
# Shared request handling
# ---------------------------------------------------------------------------------------------


def _ready(state: ServerState) -> tuple[UnifiedPipeline, Batcher]:
    if state.status == "failed":
        raise APIError(503, f"the model failed to load: {state.error}", code="model_failed")
    if state.status != "ready" or state.pipeline is None or state.batcher is None:
        raise APIError(503, "the model is still loading; retry in a few seconds", code="model_loading",
                       headers={"Retry-After": "5"})
    return state.pipeline, state.batcher


MAX_JSON_DEPTH = 32  # OpenAI's requests nest a few levels; deeper is a mistake or an attack


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _require_media_type(request: Request, wanted: str, how: str) -> None:
    """415 unless the request says it sends `wanted`: a browser page on another site can send
    text/plain or a form without asking (no CORS preflight), never application/json."""
    given = _media_type(request)
    if given != wanted:
        raise APIError(415, f"send the body as {wanted} ({how}); got Content-Type {given or 'none'}",
                       code="unsupported_media_type")


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def _json_body(request: Request) -> Any:
    _require_media_type(request, "application/json", "Content-Type: application/json")
    body = await request.body()
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" at line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else ""
        raise bad_request(f"the request body is not valid JSON{where}", None, "invalid_json") from None
    except RecursionError:
        data = None
    if data is None and body.strip() != b"null" or _json_depth(data) > MAX_JSON_DEPTH:
        raise bad_request(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    return data


def _check_model(state: ServerState, model: str | None) -> None:
    if model not in (None, "", state.model_name):
        raise APIError(404, f"the model '{model}' does not exist here; this server serves '{state.model_name}' "
                            f"(see GET /v1/models)", param="model", code="model_not_found")


def _check_text(value: str, param: str, limits: ServeLimits, *, allow_blank: bool = False) -> str:
    if not allow_blank and not value.strip():
        raise bad_request(f"'{param}' is empty; say what you want", param, "invalid_value")
    if len(value) > limits.max_prompt_chars:
        raise bad_request(f"'{param}' is {len(value):,} characters long; the limit is {limits.max_prompt_chars:,}",
                          param, "prompt_too_long")
    return value


_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


def parse_size(size: str | None, limits: ServeLimits) -> tuple[int | None, int | None]:
    """'WIDTHxHEIGHT' (or 'auto'/None for the model's default) -> (height, width), checked."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(size)
    if match is None:
        raise bad_request(f"size must look like WIDTHxHEIGHT, e.g. 256x256; got {size!r}", "size", "invalid_size")
    width, height = int(match.group(1)), int(match.group(2))
    try:  # the package's one size rule (unipic.checks), answered in the request's WIDTHxHEIGHT terms
        check_size(width, "width")
        check_size(height, "height")
    except UserError:
        fix = "x".join(str(max(PIXEL_MULTIPLE, round(v / PIXEL_MULTIPLE) * PIXEL_MULTIPLE)) for v in (width, height))
        raise bad_request(f"size {width}x{height}: width and height must be positive multiples of {PIXEL_MULTIPLE} "
                          f"(e.g. {fix})", "size", "invalid_size") from None
    if max(width, height) > limits.max_side:
        fit = suggest_size(width, height, lambda w, h: max(w, h) <= limits.max_side)
        raise bad_request(f"size {width}x{height} is too large: this server allows at most {limits.max_side} "
                          f"pixels per side; try {fit}", "size", "invalid_size")
    return height, width


def suggest_size(width: int, height: int, fits: Callable[[int, int], bool]) -> str:
    """The largest 'WxH' of the same aspect ratio, in multiples of 16, that `fits` (scaled down 1% at a time)."""
    for step in range(1, 460):
        scale = 0.99 ** step
        w = max(PIXEL_MULTIPLE, int(width * scale) // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
        h = max(PIXEL_MULTIPLE, int(height * scale) // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
        if fits(w, h):
            return f"{w}x{h}"
    return f"{PIXEL_MULTIPLE}x{PIXEL_MULTIPLE}"


def _image_settings(req: ImageRequest, limits: ServeLimits) -> tuple[list[int], ImageSettings]:
    """(one seed per image, settings) from an image request, every server bound checked (`unipic.checks`)."""
    with user_errors("n"):
        n = check_int(1 if req.n is None else req.n, "n", minimum=1, maximum=limits.max_n,
                      hint=" (images per request on this server)")
    if req.response_format not in (None, "b64_json"):
        raise bad_request(f"response_format {req.response_format!r} is not supported: the server keeps no image "
                          f"files to link to; use 'b64_json'", "response_format", "unsupported_response_format")
    if req.output_format not in (None, "png"):
        raise bad_request(f"output_format {req.output_format!r} is not supported; images come back as PNG",
                          "output_format", "invalid_value")
    if req.seed is not None:
        with user_errors("seed"):  # image k uses seed + k, so seed + max_n - 1 must be a valid seed too
            check_int(req.seed, "seed", minimum=0, maximum=MAX_SEED - (limits.max_n - 1),
                      hint=" (image k of a request uses seed + k)")
    steps = req.num_inference_steps
    if steps is not None:
        with user_errors("num_inference_steps"):
            check_int(steps, "num_inference_steps", minimum=1, maximum=limits.max_steps)
    for name, value, top in (("guidance_scale", req.guidance_scale, MAX_CFG),
                             ("temperature", req.temperature, MAX_TEMPERATURE)):
        if value is not None:
            with user_errors(name):
                check_number(value, name, minimum=0.0, maximum=top)
    height, width = parse_size(req.size, limits)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    settings = ImageSettings(height=height, width=width, steps=steps, guidance_scale=req.guidance_scale,
                             temperature=req.temperature, fast=req.fast)
    return [seed + k for k in range(n)], settings


def _check_request(pipeline: UnifiedPipeline, job: str, texts: list[str], images: list | None, *,
                   seed: list[int] | int | None = None, height: int | None = None, width: int | None = None,
                   max_new_tokens: int | None = None, options: dict[str, object]) -> CheckedInputs:
    """The pipeline's own `check_inputs` for exactly what the batch will run for this request.

    A mistake only the model can see (steps beyond the image's tokens, a prompt beyond its positions,
    an option the family does not take, an image mode without an RGB conversion) is answered 400 at
    once instead of taking a queue slot. The result holds the RGB images and the settings each output
    records. Runs off the event loop (tokenising and image conversion are CPU work).
    """
    with user_errors():
        if job == "image_to_text":
            return pipeline.check_inputs(job, texts, images, seed=seed, max_new_tokens=max_new_tokens, **options)
    try:
        return pipeline.check_inputs(job, texts, images, height=height, width=width, seed=seed, **options)
    except UserError as error:
        message = str(error)
        if height is None or width is None or not message.startswith(("height=", "width=")):
            raise from_user_error(error) from None

        def fits(w: int, h: int) -> bool:
            try:
                pipeline.check_inputs(job, texts[:1], images[:1] if images else None, height=h, width=w,
                                      seed=seed[:1] if isinstance(seed, list) else seed, **options)
                return True
            except UserError:
                return False

        # The model's own size rule (positions, memory), answered in the request's terms.
        raise bad_request(f"size {width}x{height}: {message.split(': ', 1)[-1]}; try "
                          f"{suggest_size(width, height, fits)}", "size", "invalid_size") from None


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _await_job(request: Request, batcher: Batcher, job: Job) -> Any:
    """The job's result; a disconnect first cancels the job (its queue slot frees at once)."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job.future in done:
            return job.future.result()
        batcher.cancel(job)
        raise ClientGone()
    except asyncio.CancelledError:
        batcher.cancel(job)
        raise
    finally:
        watcher.cancel()


async def _images_response(state: ServerState, images: list, request: CheckedInputs, **text: str) -> dict[str, Any]:
    """OpenAI's images response; each PNG records what the CLI records (`unipic.io_utils.output_record`):
    the model, the image's own seed and the settings the pipeline resolved for this request."""
    def encode() -> list[dict[str, Any]]:
        settings = {**request.settings, **runtime_settings(state.pipeline)}  # device and dtype change pixels
        return [{"b64_json": png_b64(image, output_record(state.model_name, seed, settings, **text, index=k)),
                 "revised_prompt": None, "seed": seed} for k, (image, seed) in enumerate(zip(images, request.seed))]

    data = await run_in_threadpool(encode)  # PNG compression is CPU work: keep it off the event loop
    width, height = images[0].size
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{width}x{height}"}


def _token_count(pipeline: UnifiedPipeline, text: str) -> int:
    """Tokens of `text` by the model's tokenizer when it has one, else words (an estimate)."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:
        try:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception:  # an odd tokenizer: fall back to the estimate
            pass
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Chat messages
# ---------------------------------------------------------------------------------------------


def _parse_messages(messages: list[Any], limits: ServeLimits) -> tuple[str, Any]:
    """(question, image) from OpenAI chat messages: the last user message's text, the latest image."""
    if not messages:
        raise bad_request("'messages' is empty; send a user message with text and an image_url part", "messages",
                          "invalid_value")
    question, image_url, image_param = None, None, None
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with 'role' and 'content'", param, "invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"{param}.role must be 'user', 'assistant' or 'system', got {role!r}", f"{param}.role",
                              "invalid_value")
        content = message.get("content")
        if role != "user":
            continue  # earlier answers and instructions: the model answers one question about one image
        texts: list[str] = []
        urls: list[tuple[Any, str]] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pparam = f"{param}.content[{j}]"
                if not isinstance(part, dict):
                    raise bad_request(f"{pparam} must be an object with a 'type'", pparam, "invalid_type")
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad_request(f"{pparam}.text must be a string", f"{pparam}.text", "invalid_type")
                    texts.append(part["text"])
                elif kind == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if url is None:
                        raise bad_request(f"{pparam}.image_url.url is required", f"{pparam}.image_url.url",
                                          "missing_required_parameter")
                    urls.append((url, f"{pparam}.image_url.url"))
                else:
                    raise bad_request(f"{pparam}.type {kind!r} is not supported; use 'text' or 'image_url'",
                                      f"{pparam}.type", "invalid_value")
        else:
            raise bad_request(f"{param}.content must be a string or a list of parts", f"{param}.content",
                              "invalid_type")
        if len(urls) > 1:
            raise bad_request(f"{param} has {len(urls)} images; ask about one image at a time", f"{param}.content",
                              "too_many_images")
        if urls:
            image_url, image_param = urls[0]
        question = "\n".join(t for t in texts if t.strip())
    if question is None:
        raise bad_request("'messages' has no user message", "messages", "invalid_value")
    if image_url is None:
        raise bad_request("add an image to a user message (an image_url part with a data: URL); this model answers "
                          "questions about images", "messages", "missing_image")
    _check_text(question, "messages", limits, allow_blank=True)
    return question, decode_data_url(image_url, limits, param=image_param or "image_url")


def _default_question(pipeline: UnifiedPipeline) -> str:
    """The model's description prompt (as `unipic caption` uses without --prompt)."""
    sampling = getattr(getattr(pipeline, "config", None), "sampling", None)
    return getattr(sampling, "caption_prompt", None) or "Describe the image in detail."


def _openai_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """OpenAI's edit mask -> the package's (H, W) bool mask: True where the mask is transparent (alpha < 128)."""
    if mask.size != size:
        raise bad_request(f"the mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; they must "
                          f"be the same size", "mask", "invalid_mask")
    if mask.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in mask.info:
        raise bad_request("the mask has no transparency: its transparent pixels mark what to regenerate "
                          "(OpenAI's convention); send a PNG with an alpha channel", "mask", "invalid_mask")
    regenerate = np.asarray(mask.convert("RGBA").getchannel("A")) < 128
    if not regenerate.any():
        raise bad_request("the mask has no transparent pixels, so there is nothing to regenerate", "mask",
                          "invalid_mask")
    return regenerate


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _pieces(text: str) -> list[str]:
    """The answer in word-sized pieces, spaces kept, so the joined stream equals the answer."""
    return re.findall(r"\s*\S+|\s+", text) or [""]


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def _page() -> str:
    return (resources.files("unipic.serve") / "page.html").read_text(encoding="utf-8")


def _prometheus_registry(state: ServerState):
    """A registry whose collector reads the server's counters at each scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class ServerCollector:
        def collect(self):
            up = GaugeMetricFamily("unipic_model_ready", "1 when the model is loaded and serving", labels=["model"])
            up.add_metric([state.model_name], 1.0 if state.status == "ready" else 0.0)
            yield up
            uptime = GaugeMetricFamily("unipic_uptime_seconds", "seconds since the server started")
            uptime.add_metric([], time.monotonic() - state.started)
            yield uptime
            requests = CounterMetricFamily("unipic_requests", "requests by endpoint", labels=["endpoint"])
            for name, value in sorted(state.requests.items()):
                requests.add_metric([name], value)
            yield requests
            errors = CounterMetricFamily("unipic_errors", "error answers by HTTP status", labels=["status"])
            for status, value in sorted(state.errors.items()):
                errors.add_metric([status], value)
            yield errors
            yield CounterMetricFamily("unipic_client_disconnects", "clients that went away before their answer "
                                      "(not errors)", value=state.disconnects)
            batcher = state.batcher
            for name, help_text, value in (("unipic_queue_waiting", "requests waiting for the model",
                                            batcher.waiting if batcher else 0),
                                           ("unipic_running", "requests the model is working on",
                                            batcher.running if batcher else 0)):
                gauge = GaugeMetricFamily(name, help_text)
                gauge.add_metric([], value)
                yield gauge
            for key, value in (batcher.stats.as_dict() if batcher else {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    stat = GaugeMetricFamily(f"unipic_batching_{key}", f"batching statistic '{key}'")
                    stat.add_metric([], float(value))
                    yield stat

    registry = CollectorRegistry()
    registry.register(ServerCollector())
    return registry


def _add_routes(app: FastAPI, state: ServerState) -> None:
    limits = state.limits
    page = _page()

    def count(name: str) -> None:
        state.requests[name] = state.requests.get(name, 0) + 1

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": state.status, "model": state.model_name}
        if state.status == "failed":
            body["error"] = state.error
        if state.status != "ready":
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(body)

    registry = _prometheus_registry(state)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus' text format (prometheus_client), for scrapers."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics.json")
    async def metrics_json() -> JSONResponse:
        batcher = state.batcher
        return JSONResponse({
            "status": state.status, "model": state.model_name,
            "uptime_seconds": round(time.monotonic() - state.started, 1),
            "queue_waiting": batcher.waiting if batcher else 0, "running": batcher.running if batcher else 0,
            "limits": {"max_batch": limits.max_batch, "max_queue": limits.max_queue,
                       "batch_wait_ms": limits.batch_wait_ms, "max_n": limits.max_n,
                       "max_steps": limits.max_steps, "max_side": limits.max_side,
                       "max_upload_bytes": limits.max_upload_bytes, "max_image_pixels": limits.max_image_pixels,
                       "max_prompt_chars": limits.max_prompt_chars, "max_tokens": limits.max_tokens},
            "requests": dict(state.requests), "errors": dict(state.errors), "client_disconnects": state.disconnects,
            "batching": batcher.stats.as_dict() if batcher else {},
        })

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "unipic"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        _check_model(state, model_id)
        return JSONResponse(model_card())

    async def images_job(request: Request, batcher: Batcher, kind: str, settings: ImageSettings, work: Any,
                         checked: CheckedInputs, **text: str) -> Response:
        """Queue a checked images request; answer its PNGs (499 when the client left first)."""
        job = batcher.submit(kind, settings, len(checked.seed), work)
        try:
            images = await _await_job(request, batcher, job)
        except ClientGone:
            state.disconnects += 1
            return Response(status_code=499)
        return JSONResponse(await _images_response(state, images, checked, **text))

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        count("images.generations")
        req = _validate(ImageRequest, await _json_body(request), strict=True)
        _check_model(state, req.model)
        prompt = _check_text(req.prompt, "prompt", limits)
        seeds, settings = _image_settings(req, limits)
        pipeline, batcher = _ready(state)
        checked = await run_in_threadpool(_check_request, pipeline, "text_to_image", [prompt] * len(seeds), None,
                                          seed=seeds, height=settings.height, width=settings.width,
                                          options=settings.options())
        return await images_job(request, batcher, "generate", settings, GenerateWork(prompt, seeds, settings),
                                checked, prompt=prompt)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        count("images.edits")
        _require_media_type(request, "multipart/form-data", "an 'image' file part and a 'prompt' field")
        body = await request.body()
        form = parse_multipart(body, request.headers.get("content-type", ""))
        images = form.all("image", "image[]")
        mask_part = form.get("mask")
        fields: dict[str, Any] = {}
        for part in form.parts:
            if part.name in ("image", "image[]", "mask"):
                continue
            if part.filename is not None:
                raise bad_request(f"'{part.name}' must be a text field, not a file", part.name, "invalid_type")
            try:
                fields[part.name] = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request(f"'{part.name}' is not UTF-8 text", part.name, "invalid_type") from None
        req = _validate(ImageRequest, fields, strict=False)  # form fields are text: "2" is n=2
        _check_model(state, req.model)
        if not images:
            raise bad_request("'image' is required: attach the image to edit as a file part", "image",
                              "missing_required_parameter")
        instruction = _check_text(req.prompt, "prompt", limits)
        seeds, settings = _image_settings(req, limits)
        pipeline, batcher = _ready(state)
        most = int(pipeline.sampling_defaults().get("max_input_images", 1))
        if len(images) > most:
            reason = (f"this model ({state.model_name}) edits one image per request" if most == 1 else
                      f"this model composes at most {most} images")
            raise bad_request(f"got {len(images)} images; {reason}", "image", "too_many_images")
        params = ["image"] if len(images) == 1 else [f"image[{index}]" for index in range(len(images))]
        sources = [await run_in_threadpool(decode_image, part.data, limits, param=param)
                   for part, param in zip(images, params)]
        source = sources[0]
        if mask_part is not None:
            if len(sources) > 1:
                raise bad_request("a mask goes with one image; send one 'image' with it", "mask", "too_many_images")
            return await inpaint(request, pipeline, batcher, source, mask_part, instruction, seeds, settings)
        n = len(seeds)
        entry = source if len(sources) == 1 else sources  # UniPic-3: one list of images per instruction
        checked = await run_in_threadpool(_check_request, pipeline, "edit_image", [instruction] * n, [entry] * n,
                                          seed=seeds, height=settings.height, width=settings.width,
                                          options=settings.options())
        source = checked.images[0]  # RGB (or a list of them), converted by the pipeline's rule (as for the CLI)
        # Without `size` the pipeline chose the output size (the input's aspect ratio), as for the CLI.
        height, width = (checked.settings.get("height"), checked.settings.get("width"))
        if isinstance(height, int) and isinstance(width, int) and max(height, width) > limits.max_side:
            scale = limits.max_side / max(height, width)
            fit = f"{max(16, int(width * scale) // 16 * 16)}x{max(16, int(height * scale) // 16 * 16)}"
            raise bad_request(f"the edit's output would be {width}x{height}, over this server's limit of "
                              f"{limits.max_side} px a side; give a size within it, e.g. size={fit}", "size",
                              "invalid_value")
        return await images_job(request, batcher, "edit", settings, EditWork(source, instruction, seeds, settings),
                                checked, instruction=instruction)

    async def inpaint(request: Request, pipeline: UnifiedPipeline, batcher: Batcher, source, mask_part,
                      instruction: str, seeds: list[int], settings: ImageSettings) -> Response:
        """An edit with a mask: inpainting, by OpenAI's convention (the mask's transparent pixels are redrawn)."""
        if mask_part.filename is None:
            raise bad_request("'mask' must be a file part (a PNG with transparency)", "mask", "invalid_type")
        if getattr(pipeline, "check_inpaint", None) is None:
            raise bad_request(f"the model '{state.model_name}' cannot inpaint; leave 'mask' out", "mask",
                              "unsupported_task")
        mask_image = await run_in_threadpool(decode_image, mask_part.data, limits, param="mask")
        mask = _openai_mask(mask_image, source.size)
        if settings.height is not None and (settings.width, settings.height) != source.size:
            raise bad_request(f"size {settings.width}x{settings.height}: with a mask the edit keeps the image's size "
                              f"({source.width}x{source.height}); leave 'size' out", "size", "invalid_size")
        settings = ImageSettings(None, None, settings.steps, settings.guidance_scale, settings.temperature,
                                 settings.fast)
        n = len(seeds)

        def check() -> CheckedInputs:
            with user_errors():
                return pipeline.check_inpaint([source] * n, [mask] * n, [instruction] * n, seed=seeds,
                                              **settings.options())

        checked = await run_in_threadpool(check)
        work = InpaintWork(checked.images[0], mask, instruction, seeds, settings)
        return await images_job(request, batcher, "inpaint", (settings, source.size), work, checked,
                                instruction=instruction)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        count("chat.completions")
        req = _validate(ChatRequest, await _json_body(request), strict=True)
        _check_model(state, req.model)
        if req.n not in (None, 1):
            raise bad_request(f"n={req.n}: this server gives one answer per request", "n", "invalid_value")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is not None:
            with user_errors("max_tokens"):
                check_int(max_tokens, "max_tokens", minimum=1, maximum=limits.max_tokens)
        if req.temperature is not None:
            with user_errors("temperature"):
                check_number(req.temperature, "temperature", minimum=0.0, maximum=MAX_CHAT_TEMPERATURE)
        if req.top_p is not None:
            with user_errors("top_p"):
                check_number(req.top_p, "top_p", minimum=0.0, above_minimum=True, maximum=1.0)
        with user_errors("seed"):
            check_seed(req.seed)
        pipeline, batcher = _ready(state)
        question, image = await run_in_threadpool(_parse_messages, req.messages, limits)
        question = question if question.strip() else _default_question(pipeline)
        settings = ChatSettings(max_tokens, req.temperature, req.top_p)
        checked = await run_in_threadpool(_check_request, pipeline, "image_to_text", [question], [image],
                                          seed=req.seed, max_new_tokens=max_tokens, options=settings.options())
        work = ChatWork(checked.images[0], question, settings, checked.seed)
        # Sampled answers with a seed run alone: their randomness is one RNG per pipeline call.
        key = (settings, uuid.uuid4().hex) if settings.sampling and req.seed is not None else settings
        job = batcher.submit("chat", key, 1, work)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage(answer: str) -> dict[str, int]:
            prompt_tokens, completion_tokens = _token_count(pipeline, question), _token_count(pipeline, answer)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or not all(stops):
            raise bad_request("stop: give up to 4 non-empty strings", "stop", "invalid_value")

        def finish(answer: str) -> str:
            limit = max_tokens
            return "length" if limit is not None and _token_count(pipeline, answer) >= limit else "stop"

        def cut(answer: str) -> str:
            """The answer up to the first stop string (OpenAI's `stop`: the stop string is not returned)."""
            ends = [answer.find(stop) for stop in stops if stop in answer]
            return answer[: min(ends)] if ends else answer

        if not req.stream:
            try:
                answer = cut(await _await_job(request, batcher, job))
            except ClientGone:
                state.disconnects += 1
                return Response(status_code=499)
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": finish(answer), "logprobs": None}],
                "usage": usage(answer)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

        async def events() -> AsyncIterator[str]:
            watcher = asyncio.ensure_future(_disconnected(request))
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                while not job.future.done():
                    done, _ = await asyncio.wait({job.future, watcher}, timeout=KEEPALIVE_SECONDS,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if watcher in done:
                        state.disconnects += 1
                        batcher.cancel(job)
                        return
                    if not done:
                        yield ": the model is working\n\n"  # a comment line: clients ignore it
                try:
                    answer = cut(job.future.result())
                except APIError as error:  # headers are sent: report the error in the stream, as OpenAI does
                    yield _sse(error.body())
                    return
                for piece in _pieces(answer):
                    yield _sse(chunk({"content": piece}))
                yield _sse(chunk({}, finish(answer)))
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": usage(answer)})
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                if not job.future.done():
                    batcher.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
