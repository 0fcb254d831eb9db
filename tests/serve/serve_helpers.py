"""Start `unipic serve` in a subprocess on a free loopback port, and talk to it with the standard library."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

SRC = Path(__file__).resolve().parents[2] / "src"
API_KEY = "test-key-123"


@dataclass
class Reply:
    """An HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        """The body parsed as JSON."""
        return json.loads(self.body)


class ServerProcess:
    """`python -m unipic serve ... --port 0`, read until it prints its URL; stopped by `stop()`."""

    def __init__(self, *args: str, api_key: str | None = API_KEY, startup_timeout: float = 180.0,
                 cwd: Path | None = None, extra_env: dict[str, str] | None = None, ssl_context=None) -> None:
        env = dict(os.environ, **(extra_env or {}))
        # The worktree's code, also in the child; one thread keeps the 2-core CI machine responsive.
        env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["HF_HUB_OFFLINE"] = "1"
        env.pop("UNIPIC_API_KEY", None)
        command = [sys.executable, "-m", "unipic", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        if api_key:
            command += ["--api-key", api_key]
        self.api_key = api_key
        self.ssl_context = ssl_context  # for an https:// server (--ssl-certfile)
        self.stdout_lines: list[str] = []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                        cwd=cwd)
        self.stderr_lines: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process.stdout, lines, self.stdout_lines),
                         daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        self.url = None
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line is None:
                break
            if " ready at " in line:
                self.url = line.rsplit(" ready at ", 1)[1].strip()
                break
        if self.url is None:
            self.stop()
            raise RuntimeError(f"unipic serve did not start: {''.join(self.stderr_lines)[-3000:]}")
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port

    @staticmethod
    def _pump(stream, lines: queue.Queue, kept: list[str]) -> None:
        for line in stream:
            kept.append(line)
            lines.put(line)
        lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory of the server (VmRSS) or its peak (VmHWM), in KiB, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/{self.pid}/status")

    def written_bytes(self) -> int:
        """Bytes the server has sent to storage (/proc/PID/io write_bytes; anonymous temp files count too)."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        raise RuntimeError(f"write_bytes not in /proc/{self.pid}/io")

    def auth(self) -> dict[str, str]:
        """The Authorization header for this server's key."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None,
                *, auth: bool = True, timeout: float = 120.0) -> Reply:
        """One HTTP request on a fresh connection."""
        connection = self.connection(timeout)
        try:
            all_headers = {**(self.auth() if auth else {}), **(headers or {})}
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def connection(self, timeout: float = 120.0) -> http.client.HTTPConnection:
        """A new (not yet opened) connection to the server, over TLS for an https:// server."""
        if self.url.startswith("https://"):
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post_json(self, path: str, payload, **kwargs) -> Reply:
        """POST a JSON body."""
        return self.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"}, **kwargs)

    def metrics(self) -> dict:
        """GET /metrics.json (the JSON view; /metrics is Prometheus' text format)."""
        return self.request("GET", "/metrics.json").json()

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def multipart(fields: dict[str, str],
              files: dict[str, tuple[str, bytes, str]] | list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type; `files` as a list may repeat a name (image[])."""
    boundary = "----unipic-test-boundary-7f3a"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    for name, (filename, data, ctype) in (files.items() if isinstance(files, dict) else files):
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    """An image as a data:image/png;base64 URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def decode_b64_png(text: str) -> Image.Image:
    """A b64_json PNG from a response, opened (its text chunks in `.text`)."""
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def assert_openai_error(reply: Reply, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    """The reply has `status` and OpenAI's error body (and the given code/param, when given)."""
    assert reply.status == status, (reply.status, reply.body[:500])
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error
