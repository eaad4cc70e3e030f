#!/usr/bin/env python3
"""Batch throughput (images/min) in emulation, printed as ONE JSON object: the same folder of images
answered by `python -m board batch` three ways on this machine:

1. local: the pipeline in this process (--bundle --emulate), one image at a time;
2. one_server: one emulated board/serve.py, `batch --server` with 2 requests in flight;
3. fleet: --servers emulated servers behind HAProxy (scripts/fleet/haproxy.cfg, via
   scripts/fleet/local_fleet.py), 2 requests in flight per server.

Each figure counts only the batch itself (models already loaded, servers up). The workload: --images
synthetic photo-like PNGs (board.bench's generator, a different seed each, so the vision cache never
hits) of --side pixels (1024: full splitting makes 4x4 + 1 = 17 tiles for every SmolVLM family), the
question below, greedy, --max-new-tokens. Without --bundle a tiny random-weight bundle is built first
(host.convert --skip-decoder; needs rknn-toolkit2), which measures the serving path (HTTP, base64,
decoding, splitting, balancing, a small model), not SmolVLM's speed. Every server here shares this
machine's CPUs, so a fleet cannot scale as boards do (each board brings its own NPU): these are
emulation numbers, never board numbers. Progress goes to stderr, the JSON to stdout:

    .venv/bin/python scripts/bench_fleet.py                      # 5-10 min on a busy 2-core machine
    .venv/bin/python scripts/bench_fleet.py --bundle out/bundle --images 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "fleet"))

import local_fleet  # noqa: E402

from board.bench import EMULATION_WARNING, synthetic_image  # noqa: E402
from board.batch import LocalRunner, Results, ServerClient, ServerRunner, list_images, run_batch  # noqa: E402

SCHEMA = "smolvlm-rk3588-bench-fleet/1"
PROMPT = "Describe this image."


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def tiny_bundle(work: Path) -> Path:
    from host import convert
    from host.tiny_model import build_tiny_checkpoint

    say("building a tiny random-weight bundle (host.convert --skip-decoder)")
    checkpoint = build_tiny_checkpoint(work / "checkpoint", "256m")
    if convert.main(["--model", str(checkpoint), "--out", str(work / "bundle"), "--skip-decoder", "--quiet"]) != 0:
        raise SystemExit("host.convert failed")
    return work / "bundle"


def measure(name: str, runner: Any, folder: Path, work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    items, _ = list_images(str(folder))
    results = Results(work / f"{name}.jsonl")
    try:
        summary = run_batch(runner, items, results, settings)
    finally:
        results.close()
    if summary.errors or summary.left:
        raise SystemExit(f"{name}: {summary.errors} errors, {summary.left} left")
    lines = [json.loads(line) for line in (work / f"{name}.jsonl").read_text().splitlines()]
    say(f"{name}: {summary.images_per_min:.1f} images/min")
    return {"images_per_min": round(summary.images_per_min, 1), "seconds": round(summary.seconds, 1),
            "concurrency": runner.concurrency, "tiles_per_image": lines[0]["tiles"],
            "mean_new_tokens": round(sum(r["tokens"].get("completion", 0) for r in lines) / len(lines), 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a bundle with its host/ files (default: build a tiny one)")
    parser.add_argument("--images", type=int, default=24, help="how many images (24)")
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (1024: 17 tiles)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (32)")
    parser.add_argument("--servers", type=int, default=3, help="servers behind HAProxy (3)")
    args = parser.parse_args(argv)
    if local_fleet.haproxy_binary() is None:
        print("error: haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 1
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else tiny_bundle(work)
        folder = work / "images"
        folder.mkdir()
        for i in range(args.images):
            (folder / f"img{i:03d}.png").write_bytes(synthetic_image(args.side, seed=i))
        from board.pipeline import Pipeline

        results: dict[str, Any] = {}
        with Pipeline(bundle, emulate=True) as pipeline:
            model, tiny = pipeline.bundle.model_id, pipeline.bundle.is_tiny
            settings = {"model": model, "prompt": PROMPT, "max_tiles": None, "max_new_tokens": args.max_new_tokens}
            results["local"] = measure("local", LocalRunner(pipeline, PROMPT, max_tiles=None,
                                                            max_new_tokens=args.max_new_tokens), folder, work, settings)

        def server_runner(url: str, concurrency: int) -> ServerRunner:
            return ServerRunner(ServerClient(url, api_key=None, timeout=600), PROMPT, max_tiles=None,
                                max_new_tokens=args.max_new_tokens, concurrency=concurrency, retries=5)

        say("one server")
        server = local_fleet.start_server("board1", bundle)
        try:
            if not server.ready.wait(300) or server.url is None:
                raise SystemExit("the server did not start:\n" + "".join(server.lines[-20:]))
            results["one_server"] = {"servers": 1, **measure("one_server", server_runner(server.url, 2), folder, work,
                                                             settings)}
        finally:
            server.proc.terminate()
            server.proc.wait(60)
        say(f"{args.servers} servers behind HAProxy")
        with local_fleet.LocalFleet(bundle, args.servers) as fleet:
            runner = server_runner(fleet.url, 2 * args.servers)
            results["fleet"] = {"servers": args.servers, "balancer": "haproxy",
                                **measure("fleet", runner, folder, work, settings)}
            results["fleet"]["answered_per_server"] = {name: int(s["hrsp_2xx"] or 0)
                                                       for name, s in fleet.stats().items()}
    print(json.dumps({
        "schema": SCHEMA, "backend": "emulate", "warning": EMULATION_WARNING,
        "bundle": {"model": model, "tiny": tiny},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "workload": {"images": args.images, "side": args.side, "prompt": PROMPT, "max_new_tokens": args.max_new_tokens,
                     "greedy": True},
        "results": results,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
