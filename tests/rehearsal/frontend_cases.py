"""The board front end's results for a few small images: made on x86, compared on aarch64.

`python tests/rehearsal/frontend_cases.py --bundle DIR --out DIR` (x86, by scripts/board_rehearsal)
writes the images and `frontend_ref.npz`, the board code's tiles and token ids for them; inside the
arm64 userland tests/rehearsal/test_frontend.py runs the same code on the same files and compares.
Only board code and its light dependencies are used, so both sides run exactly what a board runs.
The images are small (emulation is slow): each still becomes 12-17 tiles, as SmolVLM splits them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: the project folder (board/) two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from board.bundle import Bundle  # noqa: E402
from board.image_io import read_bytes  # noqa: E402
from board.prompt import build_prompt  # noqa: E402
from board.tiles import SplitSettings, normalize_tiles, split_bytes  # noqa: E402

REFERENCE = "frontend_ref.npz"
# The parity tolerances of tests/test_frontend_parity.py, on the normalized [-1, 1] scale.
MAX_MEAN_ABS_DIFF, MAX_ABS_DIFF = 0.01, 0.1
QUESTION = "What is in this image?"


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields, texture and noise: resampling differences show on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / 7 + y / 19), 128 + 90 * np.cos(y / 5 - x / 30),
                    128 + 70 * np.sin((x - y) / 3)], -1)
    return np.clip(img + rng.normal(0, 18, img.shape), 0, 255).astype(np.uint8)


def _document(h: int, w: int) -> np.ndarray:
    """Black strokes on white: the sharp edges documents have."""
    import cv2

    page = np.full((h, w, 3), 255, np.uint8)
    for i, y in enumerate(range(14, h, 16)):
        cv2.putText(page, f"Line {i}: total 1,234.56", (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return page


def make_images(folder: Path) -> list[Path]:
    """Write the test images (PNG, JPEG, RGBA, palette, grayscale, a turned JPEG: each decoder path) and
    list them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    alpha = np.random.default_rng(5).integers(0, 256, (90, 160), dtype=np.uint8)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    images: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "photo-37x53.png": (Image.fromarray(_photo(37, 53, 1)), {}),
        "photo-150x200.jpg": (Image.fromarray(_photo(150, 200, 2)), {"quality": 90}),
        "document-120x320.png": (Image.fromarray(_document(120, 320)), {}),
        "photo-rgba-90x160.png": (Image.fromarray(np.dstack([_photo(90, 160, 3), alpha])), {}),
        "photo-palette-64x48.png": (Image.fromarray(_photo(64, 48, 4)).convert("P"), {}),
        "photo-gray-200x40.png": (Image.fromarray(_photo(200, 40, 6)).convert("L"), {}),
        # 1.2 MP and turned (EXIF 6): the early decode of the file's first rows and the per-tile turning
        "photo-exif6-1280x960.jpg": (Image.fromarray(_photo(960, 1280, 7)), {"quality": 90, "exif": rotated.tobytes()}),
    }
    paths = []
    for name, (image, options) in images.items():
        path = folder / name
        image.save(path, **options)
        paths.append(path)
    return paths


def front_end(bundle_dir: Path, images: list[Path]) -> dict[str, np.ndarray]:
    """Per image (in name order): the uint8 tiles, the tile grid and the prompt's token ids; and one
    two-image prompt."""
    bundle = Bundle.open(bundle_dir, verify=False)
    settings, fmt, tokenizer = bundle.split_settings, bundle.prompt_format, bundle.tokenizer()
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    out: dict[str, np.ndarray] = {}
    plans = []
    for path in sorted(images, key=lambda p: p.name):
        tiled = split_bytes(read_bytes(path), settings)  # what the pipeline runs on a file
        prompt = build_prompt(one, [tiled.plan], fmt, tokenizer, bundle.image_token_id)
        out[f"{path.name}/tiles"] = tiled.tiles
        out[f"{path.name}/grid"] = np.array([tiled.rows, tiled.cols])
        out[f"{path.name}/ids"] = prompt.input_ids
        plans.append(tiled.plan)
    two = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"},
                                        {"type": "image"}, {"type": "text", "text": "please."}]}]
    out["conversation/ids"] = build_prompt(two, plans[:2], fmt, tokenizer, bundle.image_token_id).input_ids
    return out


def compare(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray], settings: SplitSettings) -> dict[str, Any]:
    """Token ids and grids must be identical; tiles within the parity tolerances (normalized scale)."""
    report: dict[str, Any] = {"ids_identical": True, "grids_identical": True, "tiles_within_tolerance": True,
                              "tiles_bit_identical": 0, "images": 0, "worst_mean_abs_diff": 0.0,
                              "worst_max_abs_diff": 0.0, "problems": []}
    if set(ref) != set(ours):
        report["problems"].append(f"different cases: {sorted(set(ref) ^ set(ours))}")
        report["ids_identical"] = False
    for key in sorted(set(ref) & set(ours)):
        name, kind = key.rsplit("/", 1)
        a, b = ref[key], ours[key]
        if kind in ("ids", "grid"):
            if a.shape != b.shape or not np.array_equal(a, b):
                report["ids_identical" if kind == "ids" else "grids_identical"] = False
                report["problems"].append(f"{name}: {kind} differ")
            continue
        report["images"] += 1
        if a.shape != b.shape:
            report["tiles_within_tolerance"] = False
            report["problems"].append(f"{name}: tiles {list(a.shape)} vs {list(b.shape)}")
            continue
        report["tiles_bit_identical"] += int(np.array_equal(a, b))
        diff = np.abs(normalize_tiles(a, settings) - normalize_tiles(b, settings))
        mean, worst = float(diff.mean()), float(diff.max())
        report["worst_mean_abs_diff"] = max(report["worst_mean_abs_diff"], mean)
        report["worst_max_abs_diff"] = max(report["worst_max_abs_diff"], worst)
        if mean > MAX_MEAN_ABS_DIFF or worst > MAX_ABS_DIFF:
            report["tiles_within_tolerance"] = False
            report["problems"].append(f"{name}: tiles differ by mean {mean:.4f} / max {worst:.4f}")
    report["parity"] = report["ids_identical"] and report["grids_identical"] and report["tiles_within_tolerance"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle the board will get")
    parser.add_argument("--out", type=Path, required=True, help="folder for the images and " + REFERENCE)
    args = parser.parse_args(argv)
    images = make_images(args.out / "images")
    np.savez_compressed(args.out / REFERENCE, **front_end(args.bundle, images))
    print(f"{len(images)} images and {REFERENCE} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
