#!/usr/bin/env python3
"""Build the vision export variants one at a time and write the variant table (docs/vision_variants.md).

Each variant is the full-size vision tower + connector of a family (random weights with the published
shapes, the same seed in every variant, so the numbers compare exports of the same model) converted
with host.vision_rknn.convert_vision: ONNX export checked in ONNX Runtime, rknn-toolkit2 build,
simulator accuracy against PyTorch on the shipped held-out tiles, the compiler's cycle estimate.
Every speed figure is a ratio to the baseline variant of the same table: the demo-style export
(transformers' Conv patch embedding, fp16, normalization baked in).

Each build runs in its own process (the toolkit keeps GBs after a build; a crash costs one row) and
its result is kept as JSON in --work, so an interrupted run resumes where it stopped (--redo NAME
builds a variant again). Builds run one after another: a full-size 256M build takes ~1-8 min and 3-6
GB on 2 cores.

    .venv/bin/python scripts/vision_variants.py                 # every 256M variant, then the table
    .venv/bin/python scripts/vision_variants.py --only baseline patches-int8
    .venv/bin/python scripts/vision_variants.py --table-only    # rewrite the table from --work
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "vision_variants.md"


@dataclass(frozen=True)
class Variant:
    """One export + build configuration; everything not named here is the default."""

    name: str
    what: str
    layout: str = "patches"
    dtype: str = "int8"
    # host.vision_export.GraphForms fields over transformers' own graph (REFERENCE_FORMS), so every row
    # changes one thing against the baseline's graph; the product default is the shuffle-blocks rows.
    forms: dict[str, str] = field(default_factory=dict)
    quant: dict[str, Any] = field(default_factory=dict)  # host.vision_rknn.QuantOptions fields
    opset: int = 18
    family: str = "256m"
    layers: int | None = None  # encoder depth override (connector checks on a shallow tower)


BASELINE = "baseline"
# Never mmse or hybrid 'proposal' here: mmse took 22 min for SigLIP-B on 2 cores; the proposal step is
# a diagnosis, its layers (when wanted) are listed explicitly with fp16_tensors.
VARIANTS = [
    Variant(BASELINE, "demo-style: Conv patch embedding, fp16, normalization baked in", layout="conv", dtype="fp16"),
    Variant("conv-int8", "Conv patch embedding, int8", layout="conv"),
    Variant("patches-fp16", "patch rows + folded MatMul, fp16", dtype="fp16"),
    Variant("patches-int8", "patch rows + folded MatMul, int8 (normal, per channel, float outputs)"),
    Variant("patches-int8-shuffle-blocks", "as patches-int8, pixel shuffle as one 5-D transpose: the default int8 build",
            forms={"connector": "blocks"}),
    Variant("patches-int8-kl", "as patches-int8, kl_divergence calibration", quant={"algorithm": "kl_divergence"}),
    Variant("patches-int8-int8out", "as patches-int8, int8 outputs (the toolkit's plain build)",
            quant={"float_outputs": False}),
    # Hybrid: no single layer limits int8 cosine (rknn-toolkit2's accuracy_analysis on patches-int8:
    # every layer's own cosine >= 0.9997, the loss accumulates over the 12 layers); the first block's
    # tensors are the worst early ones. 'auto' is the toolkit's auto_hybrid (int8 outputs).
    Variant("patches-int8-hybrid-head", "as patches-int8, patch embedding + first LayerNorm kept fp16",
            quant={"fp16_tensors": ("/patch_embed/MatMul#2", "/patch_embed/Add_output_0-rs",
                                    "/encoder/layers.0/layer_norm1/LayerNormalization#1")}),
    Variant("patches-int8-hybrid-auto", "as patches-int8, the toolkit's auto_hybrid (cos thresh 0.98)",
            quant={"hybrid": "auto", "float_outputs": False}),
    # Graph forms: fp16 builds (no calibration) compared with patches-fp16; a form that measured
    # better would get its int8 build too.
    Variant("patches-fp16-sdpa", "as patches-fp16, attention traced from torch SDPA", dtype="fp16",
            forms={"attention": "sdpa"}),
    Variant("patches-fp16-ln-decomposed", "as patches-fp16, LayerNorm written out (ReduceMean/Sub/Pow/...)",
            dtype="fp16", forms={"layernorm": "decomposed"}),
    Variant("patches-fp16-shuffle-blocks", "as patches-fp16, pixel shuffle as one 5-D transpose", dtype="fp16",
            forms={"connector": "blocks"}),
    Variant("patches-fp16-shuffle-conv", "as patches-fp16, pixel shuffle + projection as one stride-4 Conv",
            dtype="fp16", forms={"connector": "conv"}),
    Variant("patches-fp16-opset17", "as patches-fp16, ONNX opset 17", dtype="fp16", opset=17),
    Variant("patches-fp16-opset19", "as patches-fp16, ONNX opset 19", dtype="fp16", opset=19),
    # Accounting: the fused attention (exSDPAttention) counts 0 cycles. With the softmax written out
    # it is not fused and the estimate counts its two products (exMatMul): what every figure above omits.
    Variant("baseline-explicit-attention", "as baseline, attention unfused (accounting only)", layout="conv",
            dtype="fp16", forms={"attention": "explicit"}),
    Variant("patches-fp16-explicit-attention", "as patches-fp16, attention unfused (accounting only)",
            dtype="fp16", forms={"attention": "explicit"}),
    Variant("patches-int8-explicit-attention", "as patches-int8, attention unfused (accounting only)",
            forms={"attention": "explicit"}),
    # 2.2B connector: where the reference pixel shuffle left a Transpose on the CPU. One encoder layer at
    # full widths keeps these builds small; only their CPU ops and connector ops are of interest.
    Variant("2.2b-1layer-shuffle-reference", "2.2B shapes, 1 encoder layer: transformers' pixel shuffle",
            family="2.2b", layers=1, dtype="fp16"),
    Variant("2.2b-1layer-shuffle-blocks", "2.2B shapes, 1 encoder layer: one 5-D transpose",
            family="2.2b", layers=1, dtype="fp16", forms={"connector": "blocks"}),
    Variant("2.2b-1layer-shuffle-conv", "2.2B shapes, 1 encoder layer: stride-3 Conv",
            family="2.2b", layers=1, dtype="fp16", forms={"connector": "conv"}),
]
BY_NAME = {v.name: v for v in VARIANTS}


def run_one(variant: Variant, out: Path, holdout_tiles: int) -> dict[str, Any]:
    """Build one variant in this process and return its row (the conversion's own figures)."""
    from board.tiles import SplitSettings
    from host.tiny_model import FAMILIES
    from host.vision_export import REFERENCE_FORMS, random_vision_tower
    from host.vision_rknn import BuildOptions, QuantOptions, convert_vision
    from scripts.bench_vision import FULL_SIZE

    shape = FULL_SIZE[variant.family]
    vision = dict(shape["vision"])
    if variant.layers:
        vision["num_hidden_layers"] = variant.layers
    family = FAMILIES[variant.family]
    settings = SplitSettings(longest_edge=family.longest_edge, tile=family.tile)
    tower = random_vision_tower(vision, shape["text_hidden"], shape["scale_factor"], seed=0, layout=variant.layout,
                                settings=settings, forms=replace(REFERENCE_FORMS, **variant.forms))
    options = BuildOptions(dtype=variant.dtype, quant=QuantOptions(**variant.quant))
    t0 = time.monotonic()
    report = convert_vision(tower, settings, out, options, holdout_tiles=holdout_tiles, opset=variant.opset)
    ops = report["ops"]
    connector_ops = [op for op in json.loads((out / "vision.ops.json").read_text())["ops"]
                     if "connect" in op["name"] or "modality_projection" in op["name"]]
    return {
        "variant": asdict(variant),
        "layout": report["layout"],
        "est_cycles_per_tile": ops["est_cycles_per_tile"],
        "cpu_ops": ops["cpu_ops"],
        "top_ops": ops["top_ops"],
        "zero_cycle_ops": ops["zero_cycle_ops"],
        "n_ops": ops["n_ops"],
        "connector_ops": [{k: op[k] for k in ("op", "target", "output_shape", "cycles_total")} for op in connector_ops],
        "accuracy": report["accuracy"],
        "onnx_max_abs_err": report["onnx_check"]["max_abs_err"],
        "build_s": report["build_s"],
        "convert_s": round(time.monotonic() - t0, 1),
        "rknn_mb": report["rknn_mb"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def build(variant: Variant, work: Path, holdout_tiles: int, keep: bool) -> dict[str, Any] | None:
    """Run one variant in a child process; its row is written to work/<name>.json. None when it failed."""
    out = work / variant.name
    log = work / f"{variant.name}.stderr"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", variant.name, "--work", str(work),
           "--holdout-tiles", str(holdout_tiles)]
    print(f"[variants] {variant.name}: {variant.what} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(log, "w") as err:
        code = subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=work)
    row_path = work / f"{variant.name}.json"
    if code != 0 or not row_path.exists():
        print(f"[variants] {variant.name}: FAILED (exit {code}); see {log}", file=sys.stderr, flush=True)
        failed = {"variant": asdict(variant), "failed": f"exit {code}", "log_tail": log.read_text()[-2000:]}
        row_path.write_text(json.dumps(failed, indent=2) + "\n")
        return None
    row = json.loads(row_path.read_text())
    if not keep:
        for artifact in ("vision.rknn", "vision.onnx"):
            (out / artifact).unlink(missing_ok=True)
    print(f"[variants] {variant.name}: {row['est_cycles_per_tile'] / 1e6:.1f} M cycles/tile, "
          f"cosine min {row['accuracy']['cosine_min']:.5f} ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
    return row


def _fmt_cpu(row: dict[str, Any]) -> str:
    ops = row["cpu_ops"]
    return str(len(ops)) if not ops else f"{len(ops)} ({', '.join(sorted({op['op'] for op in ops}))})"


def table(rows: dict[str, dict[str, Any]], family: str) -> list[str]:
    """Markdown rows of one family's variants, ratios against that family's baseline when present."""
    base = rows.get(BASELINE) if family == "256m" else None
    lines = ["| variant | what | dtype | est. cycles / tile | vs. baseline | est. 17 tiles, 3 cores | CPU ops "
             "| cosine min / mean | build s | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    from host.vision_rknn import est_image_ms

    for v in VARIANTS:
        row = rows.get(v.name)
        if v.family != family or row is None:
            continue
        if "failed" in row:
            lines.append(f"| {v.name} | {v.what} | {v.dtype} | build failed ({row['failed']}) | | | | | | |")
            continue
        cycles = row["est_cycles_per_tile"]
        ratio = f"{base['est_cycles_per_tile'] / cycles:.2f}x" if base and "failed" not in base else "-"
        acc = row["accuracy"]
        lines.append(
            f"| {v.name} | {v.what} | {v.dtype} | {cycles / 1e6:.1f} M | {ratio} | {est_image_ms(cycles):.0f} ms "
            f"| {_fmt_cpu(row)} | {acc['cosine_min']:.5f} / {acc['cosine_mean']:.5f} | {row['build_s']:.0f} "
            f"| {row['rknn_mb']:.0f} |"
        )
    return lines


# Each fused-attention row and its accounting twin (attention written out, so the estimate counts it).
ATTENTION_TWINS = (("baseline", "baseline-explicit-attention"),
                   ("patches-fp16", "patches-fp16-explicit-attention"),
                   ("patches-int8", "patches-int8-explicit-attention"))


def attention_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Ratios with the attention's products counted: each explicit twin against the baseline's twin."""
    ok = {name: row for name, row in rows.items() if "failed" not in row}
    base = ok.get(ATTENTION_TWINS[0][1])
    lines = ["| export | est. cycles / tile, attention fused (0) | attention unfused | attention's share "
             "| vs. baseline, attention counted |", "|---|---|---|---|---|"]
    for fused, explicit in ATTENTION_TWINS:
        if fused not in ok or explicit not in ok:
            continue
        f, e = ok[fused]["est_cycles_per_tile"], ok[explicit]["est_cycles_per_tile"]
        ratio = f"{base['est_cycles_per_tile'] / e:.2f}x" if base else "-"
        lines.append(f"| {fused} | {f / 1e6:.1f} M | {e / 1e6:.1f} M | {(e - f) / e:.0%} | {ratio} |")
    return lines


def write_doc(rows: dict[str, dict[str, Any]], holdout_tiles: int, path: Path) -> None:
    """The generated part of the variant document: the tables and each variant's zero-cycle ops."""
    from importlib.metadata import version

    lines = [
        "<!-- generated by scripts/vision_variants.py: edit the script, not this block -->",
        f"Generated {time.strftime('%Y-%m-%d')} on a shared 2-core {platform.machine()} host, "
        f"rknn-toolkit2 {version('rknn-toolkit2')}, torch {version('torch')}, "
        f"transformers {version('transformers')}. Random weights (seed 0, published shapes); "
        f"accuracy: simulator vs PyTorch on {holdout_tiles} held-out tiles of the shipped hold-out images. "
        "Build s: the toolkit's load + build + export, on a machine shared with other jobs.",
        "",
        "### SmolVLM-256M (SigLIP-B/16 at 512, pixel shuffle 4)",
        "",
        *table(rows, "256m"),
        "",
        "### With the attention counted (256M)",
        "",
        "The `*-explicit-attention` builds write the softmax out, so the compiler does not fuse the attention "
        "and counts its two products; the unfused column minus the fused one is what the fused figures leave out.",
        "",
        *attention_table(rows),
        "",
        "### SmolVLM-2.2B connector check (SO400M/14 widths at 384, pixel shuffle 3, ONE encoder layer, fp16)",
        "",
        "Cycle figures of these rows are not the 2.2B model's (one of 27 layers); only their CPU ops matter.",
        "",
        *table(rows, "2.2b"),
        "",
        "### Ops the estimate counts as 0 cycles (per variant)",
        "",
    ]
    for v in VARIANTS:
        row = rows.get(v.name)
        if row and "failed" not in row:
            zero = ", ".join(f"{op} x{n}" for op, n in row["zero_cycle_ops"].items())
            lines.append(f"- {v.name}: {zero}")
    lines.append("<!-- end of generated block -->")
    block = "\n".join(lines) + "\n"
    start, end = "<!-- generated by", "<!-- end of generated block -->"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text + ("\n" if text else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these variants (names in VARIANTS)")
    parser.add_argument("--redo", nargs="+", default=[], metavar="NAME", help="build these again")
    parser.add_argument("--work", default="/tmp/vision-variants", help="results (JSON), logs and build folders")
    parser.add_argument("--holdout-tiles", type=int, default=8)
    parser.add_argument("--doc", default=str(DOC), help="markdown file whose generated block is (re)written")
    parser.add_argument("--keep", action="store_true", help="keep each variant's .rknn/.onnx")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from --work")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted((set(args.only or []) | set(args.redo)) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(BY_NAME)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args.run_one:  # the child process: one build, its row as JSON
        variant = BY_NAME[args.run_one]
        row = run_one(variant, work / variant.name, args.holdout_tiles)
        (work / f"{variant.name}.json").write_text(json.dumps(row, indent=2) + "\n")
        return 0

    if not args.table_only:
        for variant in VARIANTS:
            if args.only and variant.name not in args.only:
                continue
            done = work / f"{variant.name}.json"
            if done.exists() and variant.name not in args.redo and "failed" not in json.loads(done.read_text()):
                print(f"[variants] {variant.name}: done earlier ({done})", file=sys.stderr)
                continue
            build(variant, work, args.holdout_tiles, args.keep)
    rows = {p.stem: json.loads(p.read_text()) for p in work.glob("*.json") if p.stem in BY_NAME}
    write_doc(rows, args.holdout_tiles, Path(args.doc))
    print(f"[variants] table written to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
