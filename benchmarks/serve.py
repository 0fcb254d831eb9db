"""`unipic serve` under concurrent load: requests/s and p50/p95 latency, batching on and off.

The baseline is what a user without the server does: the same number of CLI-style calls, one
`pipeline.text_to_image([prompt], seed=...)` plus PNG encoding per request, one after another,
in this process. Then, for batching off (`--max-batch 1`) and on (`--max-batch B`), a fresh
`unipic serve` subprocess on a loopback port answers the same requests from 1, 4 and 16
concurrent clients (each client sends its share one after another). Every run uses the same
model, size, steps and thread count, in the same run of this script, so the ratios compare like
with like.

    python benchmarks/serve.py --model default --size 64 --steps 8 --requests 48
    python benchmarks/serve.py --model tiny-random --size 64 --steps 4 --requests 32 --clients 1 4 16
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    """Requests/s over the wall time, p50 and p95 latency in milliseconds."""
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50_ms": 1000 * percentile(latencies, 50),
            "p95_ms": 1000 * percentile(latencies, 95), "wall_s": wall}


def prompt_for(index: int) -> tuple[str, int]:
    """A different prompt and seed per request (requests are not cache hits of each other)."""
    shapes = ["a red circle", "two blue stars", "a green square left of a yellow triangle", "three purple circles"]
    return shapes[index % len(shapes)], 1000 + index


def sequential_baseline(args: argparse.Namespace) -> dict[str, float]:
    """The same requests as CLI-style calls, one after another, in this process."""
    import torch

    from unipic.loading import load_pipeline
    from unipic.serve.images import encode_png

    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model, device=args.device)
    options = {"steps": args.steps} if args.steps else {}
    for k in range(2):  # warm-up, as the server gets
        pipeline.text_to_image(["warm up"], height=args.size, width=args.size, seed=k, **options)
    latencies = []
    started = time.perf_counter()
    for index in range(args.requests):
        prompt, seed = prompt_for(index)
        t0 = time.perf_counter()
        [[image]] = pipeline.text_to_image([prompt], height=args.size, width=args.size, seed=seed, **options)
        encode_png(image, {"prompt": prompt, "seed": str(seed)})
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    del pipeline
    return summary(latencies, wall)


class Server:
    """A `unipic serve` subprocess on a free loopback port."""

    def __init__(self, args: argparse.Namespace, max_batch: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, "-m", "unipic", "serve", "--model", args.model, "--device", args.device,
                   "--port", "0", "--max-batch", str(max_batch), "--max-queue", str(args.requests + 16),
                   "--batch-wait-ms", str(args.batch_wait_ms), "--max-n", "1", "--max-side", str(max(args.size, 16))]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for line in self.process.stdout:
            if " ready at " in line:
                url = line.rsplit(" ready at ", 1)[1].strip()
                self.port = int(url.rstrip("/").rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError(f"the server did not start: {self.process.stderr.read()[-2000:]}")

    def generate(self, prompt: str, seed: int, size: int, steps: int | None) -> float:
        """One request; its latency in seconds."""
        body = {"prompt": prompt, "seed": seed, "size": f"{size}x{size}"}
        if steps:
            body["num_inference_steps"] = steps
        t0 = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            connection.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        return time.perf_counter() - t0

    def batch_sizes(self) -> dict[str, int]:
        """Requests per batch -> batches, from /metrics.json."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", "/metrics.json")
            return json.loads(connection.getresponse().read())["batching"]["batch_sizes"]
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load_run(server: Server, args: argparse.Namespace, clients: int) -> dict[str, float]:
    """`args.requests` requests from `clients` threads, each sending its share one after another."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    shares = [list(range(c, args.requests, clients)) for c in range(clients)]

    def client(indices: list[int]) -> None:
        for index in indices:
            prompt, seed = prompt_for(index)
            try:
                latency = server.generate(prompt, seed, args.size, args.steps)
            except Exception as error:
                errors.append(str(error))
                continue
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return summary(latencies, wall)


def main(argv: list[str] | None = None) -> int:
    """Run the baseline and the server runs; print a Markdown table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random", help="any --model value (default tiny-random)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's batch limit with batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's batch window")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    print(f"model {args.model}, {args.size}x{args.size}, steps {args.steps or 'default'}, {args.requests} requests "
          f"per run, device {args.device}, threads {args.threads or 'default'}", flush=True)
    rows = [{"mode": "sequential CLI-style calls", "clients": 1, **sequential_baseline(args)}]
    print(f"  baseline: {rows[0]['rps']:.2f} req/s", flush=True)
    for label, max_batch in (("server, batching off", 1), (f"server, batching on (≤{args.max_batch})", args.max_batch)):
        server = Server(args, max_batch)
        try:
            for k in range(2):
                server.generate("warm up", k, args.size, args.steps)
            for clients in args.clients:
                result = load_run(server, args, clients)
                rows.append({"mode": label, "clients": clients, **result})
                print(f"  {label}, {clients} clients: {result['rps']:.2f} req/s", flush=True)
            rows[-1]["batch_sizes"] = server.batch_sizes()
        finally:
            server.stop()

    base = rows[0]["rps"]
    print("\n| mode | clients | req/s | p50 ms | p95 ms | req/s vs sequential |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['mode']} | {row['clients']} | {row['rps']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
              f"{row['rps'] / base:.2f}x |")
    batched = [r for r in rows if "batch_sizes" in r]
    if batched:
        print(f"\nrequests per batch with batching on (all runs): {batched[-1]['batch_sizes']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
