#!/usr/bin/env python3
"""Soak board/serve.py with image requests and watch its memory: does RSS level off once the vision
cache is full, and where?

    python scripts/bench_serve_soak.py --bundle out/bundle --emulate            # x86, 500 requests
    python scripts/bench_serve_soak.py --bundle ~/smolvlm-256m --vision-cache-mb 256 --requests 2000

Starts `board/serve.py --port 0` itself (on this machine's loopback only), sends --requests chat
requests one after another, each with one of --images distinct synthetic photos (cycled in order,
so once the cache is full every image has been evicted before it comes back: the cache stays full
and churns), and samples the resident memory of the server process and of its NPU worker every
--every requests from /proc. Prints one JSON object: the samples, the status counts, and
`levels_off_at_request`: the first sample after which the worker's RSS never rose more than
--tolerance-mb above it (null if it kept growing).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in this image?"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc/PID/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def photo_url(seed: int, size: int = 96) -> str:
    """A distinct small photo-like PNG as a data: URL."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (5 + seed % 17) + y / 13), 128 + 90 * np.cos(y / (3 + seed % 11)),
                    128 + 70 * np.sin((x - y) / 7)], -1) + rng.normal(0, 20, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def levels_off(samples: list[dict[str, Any]], key: str, tolerance_mb: float) -> Optional[int]:
    """The request count of the first sample that no later sample exceeds by more than tolerance_mb."""
    for i, sample in enumerate(samples[:-1]):
        if max(s[key] for s in samples[i:]) - sample[key] <= tolerance_mb:
            return sample["request"]
    return None


def soak(host: str, port: int, server_pid: int, *, requests: int, images: int, every: int, max_tokens: int = 4,
         tolerance_mb: float = 8.0, progress: bool = False) -> dict[str, Any]:
    """Send the requests to a running server and sample its memory; the result as a dict."""
    urls = [photo_url(i) for i in range(images)]

    def health() -> dict[str, Any]:
        return get(host, port, "/health")

    model = get(host, port, "/v1/models")["data"][0]["id"]
    worker_pid = health()["worker_pid"]
    samples: list[dict[str, Any]] = []
    statuses: dict[str, int] = {}
    cached = 0
    t0 = time.perf_counter()
    for i in range(requests + 1):
        if i % every == 0:
            samples.append({"request": i, "server_mb": round(rss_mb(server_pid), 1),
                            "worker_mb": round(rss_mb(worker_pid), 1)})
            if progress:
                print(f"[soak] {i}/{requests} worker {samples[-1]['worker_mb']} MB", file=sys.stderr, flush=True)
        if i == requests:
            break
        body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": urls[i % images], "detail": "low"}},
            {"type": "text", "text": QUESTION}]}]}
        status, answer = post(host, port, body)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status == 200:
            cached += answer.get("timings", {}).get("images_cached", 0)
    seconds = time.perf_counter() - t0
    worker = [s["worker_mb"] for s in samples]
    at = levels_off(samples, "worker_mb", tolerance_mb)
    return {
        "requests": requests, "distinct_images": images, "seconds": round(seconds, 1),
        "requests_per_s": round(requests / seconds, 2), "statuses": statuses, "cache_hits": cached,
        "worker_pid_unchanged": health()["worker_pid"] == worker_pid,
        "worker_rss_mb": {"first": worker[0], "max": max(worker), "last": worker[-1]},
        "server_rss_mb": {"first": samples[0]["server_mb"], "max": max(s["server_mb"] for s in samples),
                          "last": samples[-1]["server_mb"]},
        "tolerance_mb": tolerance_mb, "levels_off_at_request": at,
        "growth_after_level_mb": None if at is None else round(worker[-1] - next(
            s["worker_mb"] for s in samples if s["request"] == at), 1),
        "samples": samples,
    }


def get(host: str, port: int, path: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return data


def post(host: str, port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection(host, port, timeout=300)
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return response.status, data


def start_server(bundle: Path, emulate: bool, cache_mb: float) -> tuple[subprocess.Popen, str, int]:
    """board/serve.py on a free loopback port; returns once the model is loaded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, str(ROOT / "board" / "serve.py"), "--bundle", str(bundle), "--port", "0", "--quiet",
               "--vision-cache-mb", str(cache_mb)] + (["--emulate"] if emulate else [])
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    ready, lines = threading.Event(), []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening on http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or proc.poll() is not None:
        proc.kill()
        raise SystemExit("bench_serve_soak: the server did not start:\n" + "".join(lines))
    url = next(line for line in lines if "listening on" in line).split("listening on ")[1].split()[0]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return proc, host, int(port)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle folder")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation (ONNX Runtime + PyTorch)")
    parser.add_argument("--requests", type=int, default=500, help="requests to send (500)")
    parser.add_argument("--images", type=int, default=100, help="distinct images, cycled (100)")
    parser.add_argument("--vision-cache-mb", type=float, default=0.5, help="the server's vision cache (0.5: full "
                        "after a few dozen one-tile images of the tiny model; 256 is the server's default)")
    parser.add_argument("--every", type=int, default=25, help="sample memory every N requests (25)")
    parser.add_argument("--tolerance-mb", type=float, default=8.0, help="growth still counted as level (8)")
    args = parser.parse_args(argv)
    if min(args.requests, args.images, args.every) < 1:
        parser.error("--requests, --images and --every must be at least 1")
    proc, host, port = start_server(args.bundle, args.emulate, args.vision_cache_mb)
    try:
        result = soak(host, port, proc.pid, requests=args.requests, images=args.images, every=args.every,
                      tolerance_mb=args.tolerance_mb, progress=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(json.dumps({"bundle": str(args.bundle), "emulate": args.emulate, "vision_cache_mb": args.vision_cache_mb,
                      **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
