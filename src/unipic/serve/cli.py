"""`unipic serve`: load a model once and answer OpenAI-style HTTP requests (FastAPI on uvicorn).

This module imports neither FastAPI nor uvicorn until the command runs, so `unipic --help` works
without the `serve` extra installed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path

from unipic.api import UserError
from unipic.checks import check_int
from unipic.cli_common import add_model_options, load_options


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

        from unipic.serve.app import create_app
    except ImportError as error:
        raise UserError(f"unipic serve needs FastAPI, uvicorn and python-multipart ({error.name} is missing): "
                        f"pip install 'unipic[serve]'") from None
    from unipic.loading import load_pipeline

    check_int(args.port, "--port", minimum=0, maximum=65535, hint=" (0 picks a free one)")
    limits = _limits(args)
    api_key = args.api_key or os.environ.get("UNIPIC_API_KEY") or None
    name = _model_name(args)
    if not _is_loopback(args.host) and api_key is None:
        print(f"unipic serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"machine can use the model (set --api-key or UNIPIC_API_KEY)", file=sys.stderr)

    def load():
        return load_pipeline(**load_options(args))

    outcome: dict[str, object] = {}
    server: uvicorn.Server | None = None

    def on_ready() -> None:
        asyncio.get_running_loop().create_task(_announce(server, args.host, name))

    def on_failed(message: str) -> None:
        outcome["error"] = message
        print(f"unipic serve: error: {message}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    app = create_app(load, model_name=name, limits=limits, api_key=api_key, on_ready=on_ready, on_failed=on_failed)
    verbose = bool(getattr(args, "verbose", False))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if verbose else "warning",
                            access_log=verbose, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if "error" in outcome:
        return 2
    return 0 if server.started else 1


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
    print(f"unipic serve: model '{name}' ready at http://{shown}:{port}/", flush=True)
