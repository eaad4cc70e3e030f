"""Turn image folders into vision-encoder tiles exactly as the board cuts them.

Calibration must see what the NPU will see on the board, so tiles come from the board's own front end
(`board.image_io.load_image` + `board.tiles.split_image`): same decoding, same resampling, same
tile grid and global view. The same function cuts the hold-out tiles for the accuracy check.

rknn-toolkit2 wants a text file listing one `.npy` per calibration sample; `write_dataset` writes it,
each sample being what the layout says the RKNN input is before the baked-in mean/std (for the Conv
layout: NCHW float32 holding raw 0..255 values).

    python -m calibration.vision_tiles --model DIR_OR_ID --out /tmp/calib [IMAGE_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from board.image_io import load_image
from board.tiles import SplitSettings, split_image

HERE = Path(__file__).resolve().parent
IMAGE_DIR = HERE / "images"
MANIFEST = HERE / "manifest.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def default_images(role: str) -> list[Path]:
    """The shipped images with this role ('calibration' or 'holdout'), in manifest order."""
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    paths = [IMAGE_DIR / e["file"] for e in manifest["images"] if e["role"] == role]
    if not paths:
        raise ValueError(f"no '{role}' images in {MANIFEST}")
    return paths


def find_images(sources: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted) in the given folders."""
    found: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(source)
    return found


def pick_order(n_tiles: int) -> list[int]:
    """Tile indices to take first: the global view (last), then the grid spread evenly (centre first)."""
    if n_tiles == 1:
        return [0]
    grid = list(range(n_tiles - 1))
    order, step = [n_tiles - 1], len(grid)
    # middle, then quarters, then eighths...: a spread, deterministic sample of the grid
    while step >= 1:
        for i in range(step // 2, len(grid), max(step, 1)):
            if grid[i] not in order:
                order.append(grid[i])
        step //= 2
    return order + [i for i in grid if i not in order]


def cut_tiles(
    images: Sequence[Path], settings: SplitSettings, per_image: int | None = None, limit: int | None = None
) -> np.ndarray:
    """uint8 NHWC tiles [n, T, T, 3] of the images as the board splits them.

    At most `per_image` tiles per image (global view first, then spread over the grid), interleaved
    across images (every image's first tile, then every image's second...) and cut at `limit`, so a
    small limit still covers many images.
    """
    picked: list[list[np.ndarray]] = []
    for path in images:
        tiled = split_image(load_image(path), settings)
        picked.append([tiled.tiles[i] for i in pick_order(len(tiled.tiles))[:per_image]])
    tiles = [group[k] for k in range(max(map(len, picked), default=0)) for group in picked if k < len(group)]
    if not tiles:
        raise ValueError("no tiles: no images given")
    return np.stack(tiles[:limit])


def write_dataset(tiles: np.ndarray, to_array: Callable[[np.ndarray], np.ndarray], out_dir: str | Path) -> Path:
    """Write one .npy per tile (via the layout's `to_array`) and the dataset.txt rknn-toolkit2 reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, tile in enumerate(tiles):
        path = out / f"tile_{i:04d}.npy"
        np.save(path, to_array(tile))
        lines.append(str(path.resolve()))
    dataset = out / "dataset.txt"
    dataset.write_text("\n".join(lines) + "\n")
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    from host.checkpoint import load_checkpoint
    from host.vision_export import LAYOUTS, get_layout

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files or folders (default: the shipped calibration set)")
    parser.add_argument("--model", required=True, help="checkpoint folder or Hugging Face id (for the splitting settings)")
    parser.add_argument("--out", required=True, help="output folder for the .npy files and dataset.txt")
    parser.add_argument("--per-image", type=int, default=2, help="tiles taken from each image (global view first)")
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default="conv", help="vision input layout the tiles are for")
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint(args.model)
    settings = SplitSettings.from_preprocessor(checkpoint.preprocessor)
    images = find_images(args.images) if args.images else default_images("calibration")
    tiles = cut_tiles(images, settings, args.per_image)
    dataset = write_dataset(tiles, get_layout(args.layout, checkpoint.patch_size).calibration_array, args.out)
    print(f"{len(tiles)} tiles of {settings.tile}px from {len(images)} images -> {dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
