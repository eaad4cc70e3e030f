#!/usr/bin/env python3
"""Time the board front end against transformers' processor on the same images, and check parity.

Per image: ours = what the pipeline runs (board.tiles.split_bytes: start_decode + stream_tiles, on the
front-end threads, + board.prompt.build_prompt); reference = PIL open + ImageOps.exif_transpose +
apply_chat_template + the Idefics3 processor (what a transformers user runs). Both are timed from the
encoded file (decode included, the figure a user feels) and from already-decoded pixels
(board.tiles.split_image: the splitting and prompt work alone); median of --repeats, ours and the reference timed in alternation.

Prints one JSON object. Without --images it generates its own varied corpus (camera photos, a
rotated phone photo, documents, extreme aspect ratios, 16-bit, palette and RGBA PNGs); with --images
DIR it uses every image in DIR. The tokenizer and settings come from --model (a checkpoint folder or
Hub id) or, by default, a tiny offline checkpoint with the family's real settings. The machine's load
average is recorded: on a busy machine both sides slow down, ours (threads on every big core) more.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from board.cpus import frontend_cpus  # noqa: E402
from board.image_io import load_image  # noqa: E402
from board.prompt import build_prompt  # noqa: E402
from board.tiles import SplitSettings, split_bytes, split_image  # noqa: E402

QUESTION = "Describe this image in detail."


def generated_cases(out_dir: Path) -> list[Path]:
    """Photo-like and document-like images in the formats and sizes people send."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)

    def photo(h: int, w: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([128 + 90 * np.sin(x / 91 + y / 157), 128 + 90 * np.cos(y / 73), 128 + 70 * np.sin((x - y) / 41)], -1)
        img += rng.normal(0, 12, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def page(h: int, w: int) -> np.ndarray:
        p = np.full((h, w, 3), 255, np.uint8)
        for i, y in enumerate(range(60, h - 40, 44)):
            cv2.putText(p, f"{i:02d} Quarterly report: revenue 1,234.5 (+3.2%)", (40, y), cv2.FONT_HERSHEY_SIMPLEX, 1.0,
                        (20, 20, 20), 2, cv2.LINE_AA)
        return p

    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: stored sideways, shown upright (as phones write portraits)
    specs = [
        ("photo-4032x3024.jpg", photo(3024, 4032), "JPEG", {"quality": 90}),
        ("portrait-exif6-3024x4032.jpg", photo(3024, 4032), "JPEG", {"quality": 90, "exif": rotated.tobytes()}),
        ("photo-1920x1080.jpg", photo(1080, 1920), "JPEG", {"quality": 90}),
        ("photo-640x480.jpg", photo(480, 640), "JPEG", {"quality": 90}),
        ("document-1700x2200.png", page(2200, 1700), "PNG", {}),
        ("receipt-500x3600.png", page(3600, 500), "PNG", {}),
        ("panorama-4000x300.webp", photo(300, 4000), "WEBP", {"quality": 85}),
        ("chart-palette-1200x800.png", Image.fromarray(photo(800, 1200)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                                                colors=64), "PNG", {}),
        ("logo-rgba-800x600.png", np.dstack([photo(600, 800), rng.integers(0, 256, (600, 800), dtype=np.uint8)]), "PNG", {}),
    ]
    paths = []
    for name, pixels, fmt, kw in specs:
        path = out_dir / name
        (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(path, fmt, **kw)
        paths.append(path)
    wide = photo(1200, 1600).astype(np.uint16) * 257  # 16 bits per sample, the low byte not just zero
    wide += rng.integers(0, 256, wide.shape, dtype=np.uint16)
    path = out_dir / "photo-16bit-1600x1200.png"
    cv2.imwrite(str(path), np.ascontiguousarray(wide[:, :, ::-1]))
    return paths + [path]


# Resizes the front end does most, timed one thread each (CPU time, best of --repeats): the resampler's
# per-core speed against Pillow's, apart from threads and decoding.
RESIZES = {
    "photo 4032x3024 -> 2048x1536": ((3024, 4032), (1536, 2048)),
    "document 1700x2200 -> 1582x2048": ((2200, 1700), (2048, 1582)),
    "photo 640x480 -> 2048x1536 (upscale)": ((480, 640), (1536, 2048)),
    "global view 2048x2048 -> 512x512": ((2048, 2048), (512, 512)),
}


def resampler_vs_pillow(repeats: int) -> dict:
    """board.resample (float32 and float64, one thread) against Pillow's resize, on noise (Lanczos)."""
    from PIL import Image

    from board.resample import chain, region

    rng = np.random.default_rng(1)
    out = {}
    for name, (src, dst) in RESIZES.items():
        img = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
        best = {}
        for label, fn in [
            ("pillow", lambda: Image.fromarray(img).resize(dst[::-1], Image.Resampling.LANCZOS)),
            ("float32", lambda: region(chain(src, [dst], 1), img, (0, dst[0]), (0, dst[1]))),
            ("float64", lambda: region(chain(src, [dst], 1, exact=True), img, (0, dst[0]), (0, dst[1]))),
        ]:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.thread_time()
                fn()
                times.append(time.thread_time() - t0)
            best[label] = min(times)
        out[name] = {"pillow_ms": round(best["pillow"] * 1e3, 1), "float32_ms": round(best["float32"] * 1e3, 1),
                     "float64_ms": round(best["float64"] * 1e3, 1),
                     "float32_speedup": round(best["pillow"] / best["float32"], 2),
                     "float64_speedup": round(best["pillow"] / best["float64"], 2)}
    return out


def paired_median_times(ours, reference, repeats: int) -> tuple[float, float]:
    """Median wall times of the two, timed in alternation (ours first on even rounds, the reference
    first on odd ones), so a slow spell of a shared machine falls on both sides rather than on one."""
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(repeats):
        for side in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            fn = ours if side == 0 else reference
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, help="a folder of images (default: generated cases)")
    ap.add_argument("--model", help="checkpoint folder or Hub id (default: tiny offline checkpoint of --family)")
    ap.add_argument("--family", default="256m", choices=["256m", "500m", "2.2b"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from PIL import Image, ImageOps
    from tokenizers import Tokenizer

    from host.checkpoint import load_checkpoint
    from host.prompt_format import prompt_format_from_processor, tokenizer_json
    from host.tiny_model import build_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    model = args.model or str(build_tiny_checkpoint(work / "tiny", args.family))
    ck = load_checkpoint(model)
    processor = ck.load_processor()
    fmt = prompt_format_from_processor(processor, ck.chat_template)
    tokenizer = Tokenizer.from_str(tokenizer_json(processor.tokenizer))
    settings = SplitSettings.from_preprocessor(ck.preprocessor)
    image_id = processor.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    if args.images:
        paths = sorted(p for p in args.images.iterdir() if p.is_file())
    else:
        paths = generated_cases(work)

    rows, ratios, ratios_decoded = [], [], []
    load_before = os.getloadavg()[0]
    for path in paths:
        data = path.read_bytes()

        def ours_from_file():
            tiled = split_bytes(data, settings)
            return tiled, build_prompt(messages, [tiled.plan], fmt, tokenizer, image_id)

        def ref_from_file():
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            return processor(text=text, images=[image])

        rgb = load_image(data)
        pil = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        pil.load()

        def ours_decoded():
            tiled = split_image(rgb, settings)
            return build_prompt(messages, [tiled.plan], fmt, tokenizer, image_id)

        def ref_decoded():
            return processor(text=text, images=[pil])

        tiled, prompt = ours_from_file()
        ref = ref_from_file()
        grid = processor.image_processor(pil, return_row_col_info=True)
        n = tiled.plan.n_tiles
        ref_tiles = np.asarray(ref["pixel_values"][0][:n])
        diff = np.abs(tiled.normalized() - ref_tiles) if ref_tiles.shape[0] == n else None
        t_ours, t_ref = paired_median_times(ours_from_file, ref_from_file, args.repeats)
        t_ours_d, t_ref_d = paired_median_times(ours_decoded, ref_decoded, args.repeats)
        ratios.append(t_ref / t_ours)
        ratios_decoded.append(t_ref_d / t_ours_d)
        rows.append({
            "image": path.name,
            "size": [rgb.shape[1], rgb.shape[0]],
            "tiles": n,
            "grid": [tiled.rows, tiled.cols],
            "prompt_tokens": len(prompt),
            "input_ids_identical": prompt.input_ids.tolist() == list(ref["input_ids"][0]),
            "tile_grid_identical": (tiled.rows, tiled.cols) == (grid["rows"][0][0], grid["cols"][0][0]),
            "tile_mean_abs_diff": float(diff.mean()) if diff is not None else None,
            "tile_max_abs_diff": float(diff.max()) if diff is not None else None,
            "ours_s": round(t_ours, 4),
            "reference_s": round(t_ref, 4),
            "speedup": round(t_ref / t_ours, 2),
            "ours_decoded_s": round(t_ours_d, 4),
            "reference_decoded_s": round(t_ref_d, 4),
            "speedup_decoded": round(t_ref_d / t_ours_d, 2),
        })

    diffs_ok = all(r["tile_max_abs_diff"] is not None for r in rows)
    result = {
        "cases": len(rows),
        "model": ck.model_id if args.model else f"tiny offline {args.family} checkpoint (real splitting settings)",
        "cpu_threads": os.cpu_count(),
        "frontend_cpus": list(frontend_cpus()[0]),
        "load_average": [round(v, 2) for v in (load_before, os.getloadavg()[0])],  # before, after
        "input_ids_identical": all(r["input_ids_identical"] for r in rows),
        "tile_grid_identical": all(r["tile_grid_identical"] for r in rows),
        "tile_mean_abs_diff_max": max(r["tile_mean_abs_diff"] for r in rows) if diffs_ok else None,
        "tile_max_abs_diff_max": max(r["tile_max_abs_diff"] for r in rows) if diffs_ok else None,
        "speedup_vs_reference": round(statistics.median(ratios), 2),
        "speedup_vs_reference_decoded": round(statistics.median(ratios_decoded), 2),
        "per_case": rows,
        "resampler_vs_pillow_one_thread": resampler_vs_pillow(max(args.repeats, 5)),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["input_ids_identical"] and result["tile_grid_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
