#!/usr/bin/env python3
"""Convert the full-size vision tower + connector of a SmolVLM family to RKNN and print one JSON object.

Without --model the weights are random, with the published shapes of the family (below); with --model
the checkpoint's own weights and splitting settings are used. The conversion is the real one
(host.vision_rknn.convert_vision: ONNX export checked in ONNX Runtime, rknn-toolkit2 build, simulator
accuracy on the shipped hold-out images, the compiler's cycle estimate). Progress goes to stderr, the
JSON to stdout:

    .venv/bin/python scripts/bench_vision.py --dtype int8 --family 256m

Every speed figure is a ratio to a baseline built in the same run from the same weights: the
demo-style export (transformers' graph as it is: Conv patch embedding, its pixel shuffle, fp16,
normalization baked in). The estimate is the compiler's cycle count per tile (see
host.vision_rknn.summarize_ops for what it leaves out); est_17_tiles_ms_3cores = ceil(17 / 3) * cycles / 1e9 s, a 17-tile image over three single-core
runtimes at 1 GHz.

A full-size build takes ~1-8 min and 3-6 GB of RAM on 2 cores (the baseline as much again); run one
at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from board.errors import SmolVLMError  # noqa: E402
from board.tiles import SplitSettings  # noqa: E402
from host.tiny_model import FAMILIES  # noqa: E402
from host.vision_export import REFERENCE_FORMS, GraphForms  # noqa: E402
from host.vision_rknn import (  # noqa: E402
    EST_IMAGE_FORMULA,
    BuildOptions,
    add_build_arguments,
    convert_vision,
    est_image_ms,
    options_from_args,
)

# Published vision shapes: SigLIP-B/16 at 512 for 256M/500M, SigLIP SO400M/14 at 384 for 2.2B; the
# connector projects vision_hidden * scale^2 to the text hidden size. Checked against SmolVLM-256M's
# config.json; 500M uses the same tower (SmolVLM blog); the 2.2B values come from secondary copies of
# its config (the SO400M shape is SigLIP's published one). --model reads a real config instead.
SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
FULL_SIZE = {
    "256m": {"vision": SIGLIP_B16_512, "text_hidden": 576, "scale_factor": 4},
    "500m": {"vision": SIGLIP_B16_512, "text_hidden": 960, "scale_factor": 4},
    "2.2b": {"vision": SIGLIP_SO400M_384, "text_hidden": 2048, "scale_factor": 3},
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (the toolkit runs in-process) and any children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def load_tower(args: argparse.Namespace, layout: str, forms: GraphForms) -> tuple[object, SplitSettings, str]:
    """(tower, settings, weights label) for the family's random weights or the checkpoint's, in `layout`."""
    if args.model:
        from host.checkpoint import load_checkpoint
        from host.vision_export import load_vision_tower

        checkpoint = load_checkpoint(args.model)
        settings = SplitSettings.from_preprocessor(checkpoint.preprocessor)
        return load_vision_tower(checkpoint, layout=layout, forms=forms), settings, checkpoint.model_id
    from host.vision_export import random_vision_tower

    shape = FULL_SIZE[args.family]
    family = FAMILIES[args.family]
    settings = SplitSettings(longest_edge=family.longest_edge, tile=family.tile)
    tower = random_vision_tower(shape["vision"], shape["text_hidden"], shape["scale_factor"], seed=args.seed,
                                layout=layout, settings=settings, forms=forms)
    return tower, settings, f"random (seed {args.seed})"


def build(args: argparse.Namespace, layout: str, forms: GraphForms, options: BuildOptions, out: str,
          holdout_tiles: int) -> tuple[dict, str]:
    """One conversion; the tower is dropped before returning so the next build has the memory."""
    tower, settings, weights = load_tower(args, layout, forms)
    report = convert_vision(tower, settings, out, options, holdout_tiles=holdout_tiles,
                            calibration_per_image=args.calibration_per_image)
    del tower
    gc.collect()
    return report, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=tuple(FULL_SIZE), default="256m")
    parser.add_argument("--model", help="Hugging Face id or checkpoint folder: real weights instead of random ones")
    parser.add_argument("--out", help="keep the ONNX/RKNN/reports here (default: a temp dir, removed); "
                                      "the baseline goes to its baseline/ subfolder")
    parser.add_argument("--holdout-tiles", type=int, default=8)
    parser.add_argument("--baseline-holdout-tiles", type=int, default=2,
                        help="held-out tiles for the baseline's own accuracy check (its cycles need none)")
    parser.add_argument("--calibration-per-image", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        options = options_from_args(args)
        with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
            out = Path(args.out or tmp)
            report, weights = build(args, args.layout, GraphForms(), options, str(out), args.holdout_tiles)
            wall_s = round(time.monotonic() - start, 1)
            peak_mb = peak_rss_mb()
            baseline, _ = build(args, "conv", REFERENCE_FORMS, BuildOptions(dtype="fp16"), str(out / "baseline"),
                                args.baseline_holdout_tiles)
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    accuracy, ops = report["accuracy"], report["ops"]
    cycles, base_cycles = ops["est_cycles_per_tile"], baseline["ops"]["est_cycles_per_tile"]
    result = {
        "family": args.family if not args.model else report["geometry"],
        "weights": weights,
        "dtype": args.dtype,
        "layout": report["layout"],
        "graph_forms": report["graph_forms"],
        "quantization": report["quantization"],
        "wall_s": wall_s,
        "build_s": report["build_s"],
        "peak_rss_mb": peak_mb,
        "rknn_mb": report["rknn_mb"],
        "cosine_min": round(accuracy["cosine_min"], 6),
        "cosine_mean": round(accuracy["cosine_mean"], 6),
        "token_cosine_min": round(accuracy["token_cosine_min"], 6),
        "max_abs_err": round(accuracy["max_abs_err"], 5),
        "holdout_tiles": accuracy["tiles"],
        "simulator_s_per_tile": accuracy["simulator_s_per_tile"],
        "est_cycles_per_tile": cycles,
        "baseline_est_cycles_per_tile": base_cycles,
        "est_speedup_vs_baseline": round(base_cycles / cycles, 3),
        "cpu_ops": len(ops["cpu_ops"]),
        "est_17_tiles_ms_3cores": est_image_ms(cycles),
        "baseline_est_17_tiles_ms_3cores": est_image_ms(base_cycles),
        "est_formula": EST_IMAGE_FORMULA,
        "zero_cycle_ops": ops["zero_cycle_ops"],
        "top_ops": [{"name": op["name"], "cycles": op["cycles_total"]} for op in ops["top_ops"]],
        "onnx_cosine_min": round(report["onnx_check"]["cosine_min"], 8),
        "baseline": {"layout": baseline["layout"], "dtype": baseline["dtype"], "build_s": baseline["build_s"],
                     "rknn_mb": baseline["rknn_mb"], "cpu_ops": len(baseline["ops"]["cpu_ops"]),
                     "cosine_min": round(baseline["accuracy"]["cosine_min"], 6)},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
