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
import socket
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
    net.add_argument("--served-model-name", default=None,
                     help="the model id clients send and /v1/models lists (default: the --model value or folder name)")
    net.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                     help="comma-separated Host header names the server answers (guards against DNS rebinding; "
                          "'*' allows any). Default: the loopback names, plus --host itself, plus this machine's "
                          "name when --host is 0.0.0.0 or ::")
    net.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                     help="comma-separated web origins (e.g. https://app.example.com) whose pages may call the API "
                          "from a browser; CORS preflights are answered for them (default: none, only the page at /)")
    net.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM; uvicorn's TLS)")
    net.add_argument("--ssl-certfile", default=None, help="the certificate (chain) for --ssl-keyfile (PEM)")
    net.add_argument("--access-log", action="store_true", help="log one line per request (uvicorn's access log)")
    con = serve.add_argument_group("connections and shutdown")
    con.add_argument("--timeout-keep-alive", type=float, default=5.0,
                     help="close a connection idle this many seconds, also one that never sends a request "
                          "(default 5)")
    con.add_argument("--request-timeout", type=float, default=30.0,
                     help="seconds a request body may take to arrive; slower ones get 408 (default 30; 0: no limit)")
    con.add_argument("--max-connections", type=int, default=256,
                     help="open connections (and running requests) at most; beyond it uvicorn answers 503 "
                          "(default 256)")
    con.add_argument("--shutdown-timeout", type=float, default=10.0,
                     help="on SIGINT/SIGTERM, seconds the running batch may take to finish before it is stopped "
                          "at its next sampler step; other requests get 503 shutting_down (default 10)")
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


def _names(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _allowed_hosts(args: argparse.Namespace) -> list[str]:
    """The Host names to accept: --allowed-hosts, else the loopback names and the bound host."""
    from unipic.serve.app import LOOPBACK_HOSTS

    given = _names(args.allowed_hosts)
    if given:
        return given
    hosts = list(LOOPBACK_HOSTS)
    if args.host in ("0.0.0.0", "::", ""):
        hosts += [socket.gethostname(), socket.getfqdn()]
    else:
        hosts.append(f"[{args.host}]" if ":" in args.host else args.host)  # a Host header brackets IPv6
    return list(dict.fromkeys(h.lower() for h in hosts if h))


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line `UserError` (bad address, port in use) before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise UserError(f"--host {host}: not an address or name this machine can listen on "
                        f"({getattr(error, 'strerror', None) or error})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another server?); pick another --port, "
                            f"or --port 0 for a free one") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; use 127.0.0.1, or 0.0.0.0 for every "
                            f"network") from None
        if error.errno == errno.EACCES:
            raise UserError(f"port {port} needs administrator rights; use a port above 1023") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def _log_config(access_log: bool, verbose: bool) -> dict:
    """uvicorn's logging set-up, with its access log at INFO when asked for (the rest at WARNING unless -v)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    level = "INFO" if verbose else "WARNING"
    config["loggers"]["uvicorn"]["level"] = level
    config["loggers"]["uvicorn.error"] = {**config["loggers"].get("uvicorn.error", {}), "level": level}
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if access_log else "WARNING"
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    """`unipic serve`: start uvicorn, load the model in the background, print the URL when ready."""
    try:
        import uvicorn

        from unipic.serve.app import create_app, drain
    except ImportError as error:
        raise UserError(f"unipic serve needs FastAPI, uvicorn, python-multipart and prometheus_client "
                        f"({error.name} is missing): pip install 'unipic[serve]'") from None
    from unipic.loading import load_pipeline

    check_int(args.port, "--port", minimum=0, maximum=65535, hint=" (0 picks a free one)")
    check_int(args.max_connections, "--max-connections", minimum=1)
    if not args.timeout_keep_alive > 0:
        raise UserError(f"--timeout-keep-alive must be more than 0 seconds, got {args.timeout_keep_alive:g}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-timeout", args.shutdown_timeout)):
        if not value >= 0:
            raise UserError(f"{flag} must be 0 or more seconds, got {value:g}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise UserError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    limits = _limits(args)
    api_key = args.api_key or os.environ.get("UNIPIC_API_KEY") or None
    name = _model_name(args)
    sock = _bind(args.host, args.port)  # a bad --host or a used port: one line, before the model loads
    if not _is_loopback(args.host) and api_key is None:
        print(f"unipic serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"machine can use the model (set --api-key or UNIPIC_API_KEY)", file=sys.stderr)

    def load():
        return load_pipeline(args.model, device=args.device, dtype=args.dtype, qwen_path=args.qwen,
                             cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling)

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
                     allowed_hosts=_allowed_hosts(args), allowed_origins=_names(args.allowed_origins),
                     request_timeout=args.request_timeout or None)
    verbose = bool(getattr(args, "verbose", False))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=_log_config(args.access_log, verbose),
                            access_log=args.access_log or verbose, lifespan="on",
                            timeout_graceful_shutdown=2, timeout_keep_alive=args.timeout_keep_alive,
                            limit_concurrency=args.max_connections, ssl_keyfile=args.ssl_keyfile,
                            ssl_certfile=args.ssl_certfile)
    try:
        try:
            config.load()  # here, so that a bad certificate is one line too
        except (OSError, ValueError) as error:
            raise UserError(f"cannot use --ssl-keyfile/--ssl-certfile: {error}") from None
        config.http_protocol_class = _idle_first_request(config.http_protocol_class)
        server = _make_server(config, drain=lambda: drain(app, args.shutdown_timeout))
        server.run(sockets=[sock])
    finally:
        sock.close()
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
    """A uvicorn server whose shutdown first drains the app (`unipic.serve.app.drain`)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; on SIGINT/SIGTERM it stops accepting, then drains the app before closing connections."""

        def __init__(self, config, drain) -> None:
            super().__init__(config)
            self._drain = drain

        async def shutdown(self, sockets=None) -> None:
            for listener in getattr(self, "servers", []):
                listener.close()  # stop accepting at once; uvicorn closes the connections after the drain
            task = asyncio.ensure_future(self._drain())
            while not task.done() and not self.force_exit:  # a second Ctrl+C skips the wait
                await asyncio.wait({task}, timeout=0.1)
            await super().shutdown(sockets)

    return Server(config, drain)


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
    scheme = "https" if getattr(server.config, "is_ssl", False) else "http"
    print(f"unipic serve: model '{name}' ready at {scheme}://{shown}:{port}/", flush=True)
