#!/usr/bin/env python3
"""Run `python -m host.convert` on the full SmolVLM-256M shapes and print ONE JSON object: time and peak
RSS per stage and in total.

Without --model the checkpoint has random weights (stored bf16, as the published one) with the shapes
of HuggingFaceTB/SmolVLM-256M-Instruct's config.json (below); its tokenizer and processor files are the
embedded tiny model's (host.tiny_model), which changes no timing. With --model the real checkpoint is
converted. The convert command runs as a subprocess exactly as a user runs it (its own summary gives
the per-stage figures); it is run twice, the second time to measure a resume. Without rkllm-toolkit
the decoder stages cannot run, so the decoder calibration set is then built and measured here on its
own with the same stage function (unless --no-calibration). Progress goes to stderr, the JSON to stdout:

    .venv/bin/python scripts/bench_convert.py                  # ~10 min and ~5-8 GB RAM on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# HuggingFaceTB/SmolVLM-256M-Instruct config.json: SigLIP-B/16 at 512, SmolLM2-135M, pixel shuffle 4
VISION_256M = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 512, "patch_size": 16}
TEXT_256M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49280, "rope_theta": 100000.0,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SCALE_FACTOR = 4


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def build_full_size_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A SmolVLM-256M-shaped Idefics3 checkpoint with random weights, saved in bf16."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from host.tiny_model import build_tiny_checkpoint

    build_tiny_checkpoint(folder, "256m", vision_layers=1, text_layers=1)  # tokenizer + processor files
    (folder / "tiny_model.json").unlink()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    small = json.loads((folder / "config.json").read_text())
    text = {**small["text_config"], **TEXT_256M}
    text.pop("rope_parameters", None)
    config = Idefics3Config(
        image_token_id=small["image_token_id"], scale_factor=SCALE_FACTOR, tie_word_embeddings=False,
        vision_config=VISION_256M, text_config=text,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval().to(torch.bfloat16)
    model.generation_config.eos_token_id = small["text_config"]["eos_token_id"]
    model.save_pretrained(folder)
    return folder


def run_convert(model: str, out: Path, extra: list[str]) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "host.convert", "--model", model, "--out", str(out), *extra]
    say(" ".join(cmd))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    return proc.returncode, time.monotonic() - t0, proc.stderr


def measure_calibration(model: str, out: Path, tiles: int) -> dict:
    """The decoder calibration stage on its own (what convert runs when rkllm-toolkit is present)."""
    from host import convert

    convert.quiet_libraries()
    args = argparse.Namespace(tiny=None, model=model, revision=None, calibration=None, decoder_calibration_tiles=tiles,
                              decoder_target_tokens=32, decoder_calibration_layout="samples")
    job = convert.Job(args, out, convert.Log())
    text = json.loads((out / convert.STATE).read_text())["text"]["info"]
    per_stage = convert.reset_peak_rss()
    t0 = time.monotonic()
    report = convert.stage_calibration(job, text)
    return {"seconds": round(time.monotonic() - t0, 1), "peak_rss_mb": convert.peak_rss_mb() if per_stage else None,
            "samples": report["samples"], "reference_tiles": report["reference_tiles"], "tokens": report["tokens"],
            "json_mb": round(report["dataset"]["bytes"] / 1e6, 1), "seconds_split": report["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face id or checkpoint folder: real weights instead of random ones")
    parser.add_argument("--work", help="keep the checkpoint and bundle here (default: a temp dir, removed)")
    parser.add_argument("--vision-dtype", choices=("fp16", "int8"), default="fp16")
    parser.add_argument("--no-calibration", action="store_true", help="do not measure the decoder calibration stage")
    parser.add_argument("--calibration-tiles", type=int, default=48)
    args = parser.parse_args(argv)

    from host.decoder_rkllm import require_rkllm_toolkit

    try:
        require_rkllm_toolkit()
        extra = []
    except Exception:
        extra = ["--skip-decoder"]
    extra += ["--vision-dtype", args.vision_dtype]
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict = {"weights": args.model or "random (SmolVLM-256M shapes, bf16)",
                        "shapes": {"vision": VISION_256M, "text": TEXT_256M, "scale_factor": SCALE_FACTOR},
                        "decoder": "rkllm-toolkit" if "--skip-decoder" not in extra else "skipped (rkllm-toolkit absent)"}
        model = args.model
        if not model:
            say("building the full-size random-weight checkpoint")
            t0 = time.monotonic()
            model = str(build_full_size_checkpoint(work / "checkpoint"))
            result["checkpoint_build_s"] = round(time.monotonic() - t0, 1)
        out = work / "bundle"
        code, seconds, stderr = run_convert(model, out, extra + ["--force"])
        if code != 0:
            print(json.dumps({**result, "error": stderr.strip().splitlines()[-1:]}))
            return 1
        report = json.loads((out / "host" / "convert_report.json").read_text())
        result.update(
            stages=report["stages"], total_s=report["total_seconds"], wall_s=round(seconds, 1),
            peak_rss_mb=report["peak_rss_mb"], board_mb=report["board_mb"],
            vision_accuracy=report["vision_accuracy"],
            decoder_equivalence_max_abs_diff=report["decoder_equivalence_max_abs_diff"],
            self_check=report["self_check"],
        )
        code, seconds, _ = run_convert(model, out, extra)
        result["resume_wall_s"] = round(seconds, 1) if code == 0 else f"failed ({code})"
        if "--skip-decoder" in extra and not args.no_calibration:
            say("measuring the decoder calibration stage on its own")
            result["decoder_calibration"] = measure_calibration(model, out, args.calibration_tiles)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
