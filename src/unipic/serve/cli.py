"""`unipic serve`: load a model once and answer OpenAI-style HTTP requests (FastAPI on uvicorn).

This module imports neither FastAPI nor uvicorn until the command runs, so `unipic --help` works
without the `serve` extra installed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
import sys
from pathlib import Path

from unipic.api import UserError
from unipic.checks import check_int
from unipic.cli_common import add_model_options


def register_serve_commands(sub: argparse._SubParsersAction) -> None:
    """Add `unipic serve` to the CLI."""
    from unipic.serve.limits import ServeLimits

    d = ServeLimits()
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server and web page",
        description="Load the model once and serve it: POST /v1/images/generations, /v1/images/edits, "
                    "/v1/chat/completions, GET /v1/models, /health, /metrics, and a web page at /. "
                    "Needs the serve extra: pip install 'unipic[serve]'.")
    add_model_options(serve)
    serve.add_argument("--cpu-offload", action="store_true", help="UniPic-2: keep sub-models on the CPU until used")
    serve.add_argument("--vae-tiling", action="store_true", help="UniPic-2: decode large images tile by tile")
    net = serve.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                          "network, so set an API key)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every endpoint but the page itself "
                          "(default: $UNIPIC_API_KEY, else no key)")
    net.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                     help="comma-separated Host header names the server answers for (default: the names of the "
                          "address it is bound to: localhost, 127.0.0.1 and ::1 for a loopback address; any name "
                          "for 0.0.0.0 or ::, with a warning); '*' allows any. Stops DNS-rebinding pages reading "
                          "answers")
    net.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                     help="comma-separated origins (https://app.example.com) whose pages may call the API from a "
                          "browser (CORS, preflights answered); default none")
    net.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM; uvicorn's TLS)")
    net.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    net.add_argument("--timeout-keep-alive", type=int, default=5,
                     help="close an idle connection after this many seconds, also one that never sends a request "
                          "(default 5)")
    net.add_argument("--request-timeout", type=float, default=30.0,
                     help="seconds a request body may take to arrive; slower ones get 408 (default 30; 0: no limit)")
    net.add_argument("--limit-concurrency", type=int, default=256,
                     help="most connections handled at once; more are answered 503 at once (default 256)")
    net.add_argument("--shutdown-timeout", type=float, default=10.0,
                     help="on SIGINT/SIGTERM, seconds the running batch may take to finish before it is stopped at "
                          "its next sampler step; every other request gets 503 shutting_down (default 10)")
    net.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    net.add_argument("--served-model-name", default=None,
                     help="the model id clients send and /v1/models lists (default: the --model value or folder name)")
    lim = serve.add_argument_group("limits")
    lim.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                     help=f"largest image file accepted, in MiB (default {d.max_upload_bytes / 2**20:g})")
    lim.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                     help=f"largest decoded upload, in pixels; refuses decompression bombs (default {d.max_image_pixels})")
    lim.add_argument("--max-side", type=int, default=d.max_side,
                     help=f"longest side of a requested output size (default {d.max_side})")
    lim.add_argument("--max-n", type=int, default=d.max_n, help=f"most images per request (default {d.max_n})")
    lim.add_argument("--max-steps", type=int, default=d.max_steps,
                     help=f"most sampling steps per request (default {d.max_steps})")
    lim.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                     help=f"longest prompt, instruction or question (default {d.max_prompt_chars})")
    lim.add_argument("--max-tokens", type=int, default=d.max_tokens,
                     help=f"largest max_tokens of a chat completion (default {d.max_tokens})")
    bat = serve.add_argument_group("batching and queue")
    bat.add_argument("--max-batch", type=int, default=d.max_batch,
                     help=f"images or answers per model call; 1 turns batching off (default {d.max_batch})")
    bat.add_argument("--max-queue", type=int, default=d.max_queue,
                     help=f"requests allowed to wait; beyond it the server answers 503 + Retry-After "
                          f"(default {d.max_queue})")
    bat.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                     help=f"how long a lone request waits for others to batch with (default {d.batch_wait_ms:g})")
    serve.set_defaults(handler=cmd_serve)


def _model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    model = args.model or "default"
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def _limits(args: argparse.Namespace):
    from unipic.serve.limits import ServeLimits

    try:
        return ServeLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_image_pixels,
                           max_side=args.max_side, max_n=args.max_n, max_steps=args.max_steps,
                           max_prompt_chars=args.max_prompt_chars, max_tokens=args.max_tokens,
                           max_batch=args.max_batch, max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms)
    except ValueError as error:
        raise UserError(f"serve limits: {error}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """`unipic serve`: start uvicorn, load the model in the background, print the URL when ready."""
    try:
        import uvicorn

        from unipic.serve.app import create_app, drain
    except ImportError as error:
        raise UserError(f"unipic serve needs FastAPI, uvicorn and python-multipart ({error.name} is missing): "
                        f"pip install 'unipic[serve]'") from None
    from unipic.cli_common import loader_kwargs
    from unipic.loading import load_pipeline

    check_int(args.port, "--port", minimum=0, maximum=65535, hint=" (0 picks a free one)")
    check_int(args.timeout_keep_alive, "--timeout-keep-alive", minimum=1)
    check_int(args.limit_concurrency, "--limit-concurrency", minimum=1)
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-timeout", args.shutdown_timeout)):
        if not value >= 0:
            raise UserError(f"{flag} must be 0 or more seconds, got {value:g}")
    _check_tls(args)
    _check_address(args.host, args.port)  # before the model loads: a busy port costs no load time
    allowed_hosts = _allowed_hosts(args)
    allowed_origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()]
    limits = _limits(args)
    api_key = args.api_key or os.environ.get("UNIPIC_API_KEY") or None
    name = _model_name(args)
    if not _is_loopback(args.host) and api_key is None:
        print(f"unipic serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"machine can use the model (set --api-key or UNIPIC_API_KEY)", file=sys.stderr)

    def load():
        return load_pipeline(args.model, **loader_kwargs(args))

    outcome: dict[str, object] = {}
    server: uvicorn.Server | None = None

    def on_ready() -> None:
        asyncio.get_running_loop().create_task(_announce(server, args.host, name))

    def on_failed(message: str) -> None:
        outcome["error"] = message
        print(f"unipic serve: error: {message}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    app = create_app(load, model_name=name, limits=limits, api_key=api_key, on_ready=on_ready, on_failed=on_failed,
                     allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                     request_timeout=args.request_timeout or None)
    verbose = bool(getattr(args, "verbose", False))
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level="info" if verbose or args.access_log else "warning",
                            access_log=verbose or args.access_log, lifespan="on",
                            timeout_graceful_shutdown=2, timeout_keep_alive=args.timeout_keep_alive,
                            limit_concurrency=args.limit_concurrency, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile)
    try:
        config.load()  # here, so that an unusable certificate is one line too
    except (OSError, ValueError) as error:
        raise UserError(f"cannot use --ssl-certfile/--ssl-keyfile: {error}") from None
    config.http_protocol_class = _idle_first_request(config.http_protocol_class)
    server = _make_server(config, drain=lambda: drain(app, args.shutdown_timeout))
    server.run()
    if "error" in outcome:
        return 2
    return 0 if server.started else 1


def _idle_first_request(protocol: type) -> type:
    """uvicorn's HTTP protocol, with its keep-alive timer also running before a connection's first request,
    so a client that connects and sends nothing is closed after --timeout-keep-alive too."""

    class Protocol(protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    return Protocol


def _make_server(config, drain):
    """A uvicorn server whose shutdown first drains the app (`unipic.serve.app.drain`): new and waiting
    requests get 503 shutting_down, the running batch finishes within --shutdown-timeout or stops at its
    next step; then uvicorn closes the connections (within 2 s: only answers are left to send)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for listener in getattr(self, "servers", []):
                listener.close()  # stop accepting at once
            task = asyncio.ensure_future(drain())
            while not task.done() and not self.force_exit:  # a second Ctrl+C skips the wait
                await asyncio.wait({task}, timeout=0.1)
            await super().shutdown(sockets)

    return Server(config)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _allowed_hosts(args: argparse.Namespace) -> list[str] | None:
    """The Host names to answer for: --allowed-hosts, else the bound address's names (None: any)."""
    if args.allowed_hosts:
        return [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    if args.host in ("0.0.0.0", "::", ""):
        print(f"unipic serve: warning: listening on every address ({args.host or 'all'}) and answering for any "
              "Host name; pass --allowed-hosts with the names clients use", file=sys.stderr)
        return None
    return [*LOOPBACK_NAMES, args.host] if _is_loopback(args.host) else [args.host, *LOOPBACK_NAMES]


def _check_tls(args: argparse.Namespace) -> None:
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise UserError("--ssl-certfile and --ssl-keyfile go together: give both for HTTPS, or neither")
    for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found")


def _check_address(host: str, port: int) -> None:
    """One line, before anything loads, for an address this machine cannot listen on."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: already in use on {host}; stop the other server or choose "
                                "another port (0 picks a free one)") from None
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None


async def _announce(server, host: str, name: str) -> None:
    """Print the URL once the socket is bound (port 0 becomes the real port) and the model is loaded."""
    while server is not None and not server.started:
        await asyncio.sleep(0.05)
    port = None
    for listener in getattr(server, "servers", []) or []:
        for sock in getattr(listener, "sockets", []) or []:
            port = sock.getsockname()[1]
            break
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if getattr(server.config, "ssl_certfile", None) else "http"
    print(f"unipic serve: model '{name}' ready at {scheme}://{shown}:{port}/", flush=True)
