"""Stage 2: SmolVLM's image splitting, driven by the checkpoint's preprocessor settings.

The reference (transformers' Idefics3/SmolVLM image processor) does, in this order:
1. resize so the longest edge is `size.longest_edge` (small images are upscaled; the other side is
   rounded up to even, and nothing may exceed 4096),
2. resize again so both sides are multiples of the tile (`max_image_size.longest_edge`),
3. cut rows x cols tiles, then append the step-2 image resized to one tile (the global view);
   an image that is already one tile is just that tile (rows = cols = 0),
4. rescale to [0, 1] and normalize with image_mean / image_std.
Without splitting, step 1 is followed by a resize straight to one tile.

`plan_tiles` computes that geometry once; the pixels and the prompt's row/col tokens are both derived
from the same plan (the reference recomputes it separately for its token count).

Resampling parity: the reference resamples with Pillow, whose Lanczos widens the kernel when it
shrinks and works in fixed point; OpenCV's does not (mean error 0.05 on the [-1, 1] scale). So the
resizes call Pillow itself, cut into horizontal bands computed in parallel threads (Pillow releases
the GIL); each band is resampled with the full image's coefficients, so the result is
bit-identical to one call, just faster on a multi-core board.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from .errors import BundleError, InputError

# The reference's absolute bound on a resized side (MAX_IMAGE_SIZE in transformers' idefics3).
MAX_IMAGE_SIDE = 4096
# Below this many output rows per band, threading costs more than it saves.
_MIN_BAND_ROWS = 64


@dataclass(frozen=True)
class SplitSettings:
    """The preprocessor settings that decide tiles and pixels (read from preprocessor_config.json)."""

    longest_edge: int
    tile: int
    do_image_splitting: bool = True
    do_resize: bool = True
    resample: int = int(Image.Resampling.LANCZOS)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_preprocessor(cls, cfg: dict[str, Any]) -> "SplitSettings":
        """Build from a checkpoint's image-processor dict (the Hub's preprocessor_config.json)."""
        try:
            longest = int(cfg["size"]["longest_edge"])
            tile = int(cfg["max_image_size"]["longest_edge"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"preprocessor settings lack size.longest_edge / max_image_size.longest_edge ({exc})"
            ) from exc
        resample = int(cfg.get("resample", Image.Resampling.LANCZOS))
        if resample not in {int(r) for r in Image.Resampling}:
            raise BundleError(f"preprocessor 'resample' = {resample} is not a Pillow filter")
        mean = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise BundleError(f"preprocessor image_mean/image_std must be 3 values each (std > 0): {mean} {std}")
        if longest < 1 or tile < 1:
            raise BundleError(f"preprocessor sizes must be positive: longest_edge={longest}, tile={tile}")
        return cls(
            longest_edge=longest,
            tile=tile,
            do_image_splitting=bool(cfg.get("do_image_splitting", True)),
            do_resize=bool(cfg.get("do_resize", True)),
            resample=resample,
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            image_mean=mean if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0),
            image_std=std if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0),
        )

    def with_tiles_per_side(self, tiles_per_side: Optional[int]) -> "SplitSettings":
        """A smaller grid: the longest edge at most `tiles_per_side` tiles (capped at the checkpoint's),
        0 = no splitting, None = unchanged. A tile budget per image is chosen with budget_settings."""
        from dataclasses import replace

        if tiles_per_side is None:
            return self
        if tiles_per_side <= 0:
            return replace(self, do_image_splitting=False)
        return replace(self, longest_edge=min(self.longest_edge, tiles_per_side * self.tile))


def tokens_per_tile(tile: int, patch: int, scale_factor: int) -> int:
    """Image tokens one tile becomes: (tile // patch)^2 patches (the patch Conv drops a remainder, as
    at 384/14), merged scale^2 at a time by the connector's pixel shuffle: the reference's
    `image_seq_len`. The one place this is computed."""
    if (tile // patch) % scale_factor:
        raise BundleError(f"a {tile}px tile's {tile // patch}x{tile // patch} patch grid does not merge "
                          f"{scale_factor}x{scale_factor}")
    return (tile // patch) ** 2 // scale_factor**2


@dataclass(frozen=True)
class TilePlan:
    """Where an image of a given size goes: the two resize targets and the tile grid."""

    source: tuple[int, int]  # (h, w) of the decoded image
    resized: tuple[int, int]  # after step 1 (longest edge)
    padded: tuple[int, int]  # after step 2 (multiples of the tile); == resized without splitting
    rows: int  # 0 when the image is a single (global) tile
    cols: int
    tile: int

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows else 1


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1's target size, as the reference computes it (int truncation, odd side rounded up)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # then scaled below the absolute bound, keeping the aspect ratio
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2's target size: both sides rounded up to tile multiples, the short side via the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def plan_tiles(height: int, width: int, settings: SplitSettings) -> TilePlan:
    """The tile plan for an image of (height, width) pixels."""
    resized = longest_edge_size(height, width, settings.longest_edge) if settings.do_resize else (height, width)
    if not settings.do_image_splitting:
        return TilePlan((height, width), resized, resized, 0, 0, settings.tile)
    padded = tile_multiple_size(*resized, settings.tile)
    rows = cols = 0
    if padded[0] > settings.tile or padded[1] > settings.tile:
        rows, cols = padded[0] // settings.tile, padded[1] // settings.tile
    return TilePlan((height, width), resized, padded, rows, cols, settings.tile)


def check_tile_budget(max_tiles: Optional[int]) -> Optional[int]:
    """`max_tiles` if it is a tile budget per image: None (the checkpoint's full splitting) or at least
    1 tile, the global view included (1 = no splitting). The one place the rule is written."""
    if max_tiles is not None and max_tiles < 1:
        raise InputError(f"the tile budget must be at least 1 tile per image (1 = no splitting), got {max_tiles}")
    return max_tiles


def budget_settings(settings: SplitSettings, height: int, width: int, max_tiles: Optional[int]) -> SplitSettings:
    """The splitting settings that keep an image of (height, width) within `max_tiles` tiles per image.

    Fewer tiles means a smaller longest edge, as if the processor were given size.longest_edge =
    k * tile (so the reference can still be run the same way): the largest k whose plan fits;
    a budget of 1 means no splitting at all.
    """
    budget = check_tile_budget(max_tiles)
    if budget is None:
        return settings
    if budget == 1:
        return settings.with_tiles_per_side(0)
    if plan_tiles(height, width, settings).n_tiles <= budget:
        return settings
    for per_side in range(math.ceil(settings.longest_edge / settings.tile) - 1, 0, -1):
        smaller = settings.with_tiles_per_side(per_side)
        if plan_tiles(height, width, smaller).n_tiles <= budget:
            return smaller
    return settings.with_tiles_per_side(0)


@dataclass
class TiledImage:
    """An image cut for the vision encoder: uint8 RGB tiles, rows x cols then the global view."""

    tiles: np.ndarray  # [n, T, T, 3] uint8, what the NPU model takes (normalization is baked in)
    plan: TilePlan
    settings: SplitSettings = field(repr=False)

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def cols(self) -> int:
        return self.plan.cols

    def normalized(self) -> np.ndarray:
        """[n, 3, T, T] float32 on the reference's scale (rescale then normalize)."""
        return normalize_tiles(self.tiles, self.settings)


def normalization(settings: SplitSettings) -> tuple[np.ndarray, np.ndarray]:
    """The reference's pixel normalization, uint8 value v of channel c -> (v * rescale - mean_c) / std_c,
    as the affine map v * scale_c + offset_c: returns (scale, offset) = (rescale / std, -mean / std),
    float64 [3].

    The one statement of the formula. normalize_tiles applies it; the `patches` vision layout folds
    it into its first MatMul (host.vision_modules); the `conv` layout's RKNN build bakes it into the
    model's input as rknn-toolkit2's mean_values/std_values (host.vision_rknn.rknn_norm_values).
    """
    std = np.asarray(settings.image_std, np.float64)
    return settings.rescale_factor / std, -np.asarray(settings.image_mean, np.float64) / std


def normalize_tiles(tiles: np.ndarray, settings: SplitSettings) -> np.ndarray:
    """uint8 NHWC tiles -> float32 NCHW on the reference's scale (`normalization`)."""
    scale, offset = (v.astype(np.float32).reshape(1, 3, 1, 1) for v in normalization(settings))
    return tiles.transpose(0, 3, 1, 2).astype(np.float32) * scale + offset


# patch rows are zero-padded to a multiple of this many values: rknn-toolkit2 2.5.0 runs the first
# Reshape of a 3-D input on the CPU unless its last dimension is a multiple of 16 (int8; 8 for fp16),
# measured; 16x16x3 = 768 needs no padding, 14x14x3 = 588 becomes 592
PATCH_ROW_ALIGN = 16


def patch_row_length(patch: int) -> int:
    """Values per patch row: p*p*3, padded to PATCH_ROW_ALIGN."""
    return -(-patch * patch * 3 // PATCH_ROW_ALIGN) * PATCH_ROW_ALIGN


def patchify(tiles: np.ndarray, patch: int) -> np.ndarray:
    """uint8 NHWC tiles [n, T, T, 3] -> their patch rows [n, G*G, patch_row_length(p)] with G = T // p, uint8.

    What the `patches` vision layout feeds the NPU instead of the tile, so the model starts with a
    MatMul rather than the stride-p Conv (whose 3 input channels waste the NPU's lanes). Row r is the
    patch at grid (r // G, r % G), the order of the reference's Conv output flattened; inside a row
    the p*p*3 values are in (y, x, channel) order, the tile's own memory order, so the copy moves runs
    of p*3 bytes, then zeros up to the aligned length. Like the reference's "valid" Conv, the last
    T - G*p pixel rows and columns are not used (384 = 27 * 14 + 6 for the 2.2B family). The host
    folds its Conv weights into this order (host.vision_export) and cuts calibration tiles with this
    function, so the three cannot drift.
    """
    n, height, width, channels = tiles.shape
    if height != width or channels != 3 or height < patch:
        raise ValueError(f"patchify wants square [n, T, T, 3] tiles of at least {patch} pixels, got {list(tiles.shape)}")
    grid = height // patch
    side = grid * patch
    values, length = patch * patch * 3, patch_row_length(patch)
    rows = tiles[:, :side, :side].reshape(n, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    if length == values:
        return np.ascontiguousarray(rows).reshape(n, grid * grid, values)
    out = np.zeros((n, grid * grid, length), np.uint8)
    out[..., :values] = rows.reshape(n, grid * grid, values)
    return out


def split_image(rgb: np.ndarray, settings: SplitSettings) -> TiledImage:
    """Cut an HxWx3 uint8 RGB image into the reference's tiles."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"split_image wants HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    plan = plan_tiles(rgb.shape[0], rgb.shape[1], settings)
    T = plan.tile
    image = resize(rgb, plan.resized, settings.resample)
    if not settings.do_image_splitting:
        tiles = resize(image, (T, T), settings.resample)[None]
        return TiledImage(np.ascontiguousarray(tiles), plan, settings)
    image = resize(image, plan.padded, settings.resample)
    if not plan.rows:
        return TiledImage(np.ascontiguousarray(image[None]), plan, settings)
    tiles = np.empty((plan.n_tiles, T, T, 3), np.uint8)
    grid = image.reshape(plan.rows, T, plan.cols, T, 3).transpose(0, 2, 1, 3, 4)
    tiles[:-1] = grid.reshape(-1, T, T, 3)
    tiles[-1] = resize(image, (T, T), settings.resample)
    return TiledImage(tiles, plan, settings)


_pool: Optional[ThreadPoolExecutor] = None


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="smolvlm-resize")
    return _pool


def _pillow_version() -> tuple[int, ...]:
    import PIL

    return tuple(int(p) for p in PIL.__version__.split(".")[:2] if p.isdigit())


_VERTICAL_FIRST_RULE = _pillow_version() >= (13, 0)


def _vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Which pass Pillow runs first (Resample.c): from 13.0 the vertical one when the height shrinks
    more than twice as much as the width; before 13.0 always the horizontal one. The order changes
    the result (the intermediate image is clipped to 8 bits), so it must be the same."""
    return _VERTICAL_FIRST_RULE and in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


def _bands(n: int) -> list[tuple[int, int]]:
    count = max(1, min(_threads(), n // _MIN_BAND_ROWS))
    edges = [round(n * i / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _pass(rgb: np.ndarray, out_len: int, axis: int, resample: int) -> np.ndarray:
    """One separable pass of Pillow's resize along `axis` (1: width, 0: height).

    Rows are independent in a width pass and columns in a height pass, so the image is cut into
    bands across the other axis and each band is resampled by Pillow in its own thread (Pillow
    releases the GIL while it resamples); the bands join bit-identically.
    """
    in_h, in_w = rgb.shape[:2]
    out_shape = (in_h, out_len, 3) if axis == 1 else (out_len, in_w, 3)
    out = np.empty(out_shape, np.uint8)
    across = in_h if axis == 1 else in_w

    def band(span: tuple[int, int]) -> None:
        a, b = span
        if axis == 1:
            out[a:b] = np.asarray(Image.fromarray(rgb[a:b]).resize((out_len, b - a), resample))
        else:
            part = np.ascontiguousarray(rgb[:, a:b])
            out[:, a:b] = np.asarray(Image.fromarray(part).resize((b - a, out_len), resample))

    spans = _bands(across)
    if len(spans) == 1:
        band(spans[0])
    else:
        list(_executor().map(band, spans))
    return out


def resize(rgb: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow's resize of an HxWx3 uint8 array to (h, w): bit-identical, computed in parallel bands.

    Pillow resamples in two separable passes with an 8-bit intermediate; running the same two
    passes one after the other, in Pillow's order, gives the same bytes as one call.
    """
    out_h, out_w = size
    in_h, in_w = rgb.shape[:2]
    if (out_h, out_w) == (in_h, in_w):
        return rgb  # Pillow returns an unchanged copy for a same-size resize
    if out_w != in_w and out_h != in_h and _vertical_first(in_w, in_h, out_w, out_h):
        return _pass(_pass(rgb, out_h, 0, resample), out_w, 1, resample)
    if out_w != in_w:
        rgb = _pass(rgb, out_w, 1, resample)
    if out_h != in_h:
        rgb = _pass(rgb, out_h, 0, resample)
    return rgb
