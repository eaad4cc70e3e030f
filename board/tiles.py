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
shrinks and works in fixed point; OpenCV's does not (mean error 0.05 on the [-1, 1] scale; its AREA,
LANCZOS4 and CUBIC all break the tolerance). board.resample reimplements Pillow's coefficients as
banded matrix products: `resize` is bit-identical to Pillow; the tiles use its float32 form (within
2 levels of Pillow, faster) and are computed tile by tile on the big cores, so the NPU
can start on the first tiles while the others are cut (`cut_tiles`).

From a file (`start_decode`, `stream_tiles`, what the pipeline runs) the decode overlaps the cutting
too: the plan comes from the header; for a large baseline JPEG or PNG the file's first rows are
decoded on their own, in a fraction of the time, on one thread while another decodes the whole file,
and the grid tiles along the side of the image they become are cut from them (then checked against
the whole decode); a turned photo (EXIF orientation) is never turned whole, each tile turns its
window of the file's pixels.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
from PIL import Image

from .cpus import frontend_threads, submit
from .errors import BundleError, ImageError, InputError
from .image_io import ImageInfo, apply_orientation, decode, decode_top, probe, top_band, top_field
from .resample import Resize, Span, chain, need, region, resize, supported

# The reference's absolute bound on a resized side (MAX_IMAGE_SIZE in transformers' idefics3).
MAX_IMAGE_SIDE = 4096


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


def split_image(rgb: np.ndarray, settings: SplitSettings, *, exact: bool = False) -> TiledImage:
    """Cut an HxWx3 uint8 RGB image into the reference's tiles (cut_tiles, stacked)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"split_image wants HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    plan = plan_tiles(rgb.shape[0], rgb.shape[1], settings)
    return TiledImage(np.stack(list(cut_tiles(rgb, plan, settings, exact=exact))), plan, settings)


def split_bytes(data: bytes, settings: SplitSettings, max_tiles: Optional[int] = None) -> TiledImage:
    """An image file's tiles, stacked, as the pipeline makes them (start_decode, then stream_tiles);
    for measuring and checking the front end whole."""
    decoding = start_decode(data, settings, max_tiles)
    tiles: list[np.ndarray] = [np.empty(0)] * decoding.plan.n_tiles
    for place, tile in stream_tiles(decoding):
        tiles[place] = tile
    return TiledImage(np.stack(tiles), decoding.plan, decoding.settings)


Parts = list[tuple[Span, "Future[np.ndarray]"]]  # one tile: its row bands and the jobs computing them
Pixels = Union[np.ndarray, "Future[np.ndarray]"]  # an image, or the decode that will give it


def upright_window(pixels: np.ndarray, orientation: int, upright_hw: tuple[int, int], rows: Span,
                   cols: Span) -> np.ndarray:
    """Rows x cols of the upright (h, w) image, cut from its pixels in the file's own order (which may
    hold only the file's first rows) and turned by the EXIF orientation: only the window is turned."""
    (a, b), (c, d), (h, w) = rows, cols, upright_hw
    if orientation in (5, 6, 7, 8):  # the file's rows are the upright columns
        file_rows = (w - d, w - c) if orientation in (6, 7) else (c, d)
        file_cols = (h - b, h - a) if orientation in (7, 8) else (a, b)
    else:
        file_rows = (h - b, h - a) if orientation in (3, 4) else (a, b)
        file_cols = (w - d, w - c) if orientation in (2, 3) else (c, d)
    part = pixels[file_rows[0]:file_rows[1], file_cols[0]:file_cols[1]]
    return part if orientation == 1 else apply_orientation(part, orientation)


def _tile_parts(steps: list[Resize], source: Pixels, plan: TilePlan, place: int, bands: int = 1,
                orientation: int = 1, upright_hw: tuple[int, int] = (0, 0)) -> Parts:
    """Queue grid tile `place` on the front-end threads, in `bands` row bands, from `source`: the upright
    image, or with an `orientation` the file's pixels of an upright_hw image. `source` may be a decode
    still running: its jobs wait for it, which cannot deadlock, as it was queued before them."""
    T = plan.tile
    r, c = divmod(place, plan.cols)
    edges = [round(T * i / bands) for i in range(bands + 1)]
    return [((a, b), submit(_region, steps, source, (r * T + a, r * T + b), (c * T, c * T + T), orientation,
                            upright_hw))
            for a, b in zip(edges[:-1], edges[1:])]


def _region(steps: list[Resize], source: Pixels, rows: Span, cols: Span, orientation: int,
            upright_hw: tuple[int, int]) -> np.ndarray:
    pixels = source.result() if isinstance(source, Future) else source
    if orientation == 1:
        return region(steps, pixels, rows, cols)
    window = need(steps, rows, cols)
    return region(steps, upright_window(pixels, orientation, upright_hw, *window), rows, cols,
                  (window[0][0], window[1][0]))


def _collect(parts: Parts, padded: np.ndarray, plan: TilePlan, place: int) -> np.ndarray:
    """Wait for tile `place`'s bands, put them in the padded image and return the tile."""
    T = plan.tile
    r, c = divmod(place, plan.cols)
    tile = padded[r * T:r * T + T, c * T:c * T + T]
    for (a, b), job in parts:
        tile[a:b] = job.result()
    return np.ascontiguousarray(tile)


def _grid(rgb: np.ndarray, plan: TilePlan, settings: SplitSettings, exact: bool) -> tuple[list[Resize], np.ndarray]:
    """(resize steps, their source) from which the grid's tiles are computed: the two resizes as
    board.resample regions, or for a filter it does not reimplement the image resized by Pillow."""
    if supported(settings.resample):
        return chain(rgb.shape[:2], [plan.resized, plan.padded], settings.resample, exact=exact), rgb
    return [], resize(resize(rgb, plan.resized, settings.resample), plan.padded, settings.resample)


def cut_tiles(rgb: np.ndarray, plan: TilePlan, settings: SplitSettings, *, exact: bool = False) -> Iterator[np.ndarray]:
    """The plan's tiles [T, T, 3] in order, each as soon as it is ready: the grid row by row, then the
    global view (a single tile when the plan has no grid).

    `rgb` is the decoded upright image: plan.source, or smaller when the JPEG decoder reduced it
    (plan_decode). Each grid tile is resampled on its own, from the part of the image it depends
    on (board.resample), on the front-end threads: the first split over all of them, so the NPU can
    start early, the others one per thread; all are queued at once and finish about in order while the
    caller hands the first ones to the NPU. The global view is the grid's padded image resized to one
    tile, once the grid is done. Float32 resampling unless `exact` (module docstring).
    """
    T, filt = plan.tile, settings.resample
    if not settings.do_image_splitting:
        yield resize(resize(rgb, plan.resized, filt, exact=exact), (T, T), filt, exact=exact)
        return
    if not plan.rows:
        yield resize(resize(rgb, plan.resized, filt, exact=exact), plan.padded, filt, exact=exact)
        return
    steps, source = _grid(rgb, plan, settings, exact)
    jobs = [_tile_parts(steps, source, plan, place, frontend_threads() if place == 0 else 1)
            for place in range(plan.rows * plan.cols)]
    padded = np.empty((*plan.padded, 3), np.uint8)
    try:
        for place, parts in enumerate(jobs):
            yield _collect(parts, padded, plan, place)
    finally:
        _cancel(jobs)
    yield resize(padded, (T, T), filt, exact=exact)


def _cancel(jobs: Iterable[Parts]) -> None:
    """Drop the jobs that have not started (the caller stopped early)."""
    for parts in jobs:
        for _, job in parts:
            job.cancel()


# Early rows (start_decode) are decoded for images of at least this many pixels: below it the whole
# decode takes a few milliseconds and a second decode of the top would not pay for itself.
EARLY_DECODE_MIN_PIXELS = 1_000_000
# ... and when the grid line they are for needs at most this share of the file's rows.
EARLY_DECODE_MAX_SHARE = 0.6


class Decoding:
    """An image file being decoded for splitting (start_decode). The plan is known from the header
    before any pixel is; `pixels` is the whole decode in the file's own order (a Future), which
    `orientation` turns upright (stream_tiles turns each tile's window, not the image), `decoded_hw`
    its upright size (plan.source, or less when the JPEG is decoded reduced); `top` an early decode
    of the file's first rows (a Future of an array, or of None when that failed), which become
    `top_region` of the upright image."""

    def __init__(self, plan: TilePlan, settings: SplitSettings, decode_job: Optional[Callable[[], np.ndarray]] = None,
                 *, pixels: Optional[np.ndarray] = None, orientation: int = 1,
                 decoded_hw: Optional[tuple[int, int]] = None,
                 top_job: Optional[Callable[[], Optional[np.ndarray]]] = None,
                 top_region: Optional[tuple[Span, Span]] = None):
        self.plan, self.settings, self.orientation = plan, settings, orientation
        self.decoded_hw, self.top_region = decoded_hw or plan.source, top_region
        self.started = time.perf_counter()
        self.decoded_at = self.started if pixels is not None else None
        if pixels is not None:
            self.pixels: "Future[np.ndarray]" = Future()
            self.pixels.set_result(pixels)
        else:
            self.pixels = submit(self._timed, decode_job)
        self.top: "Optional[Future[Optional[np.ndarray]]]" = submit(top_job) if top_job is not None else None

    def _timed(self, job: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            pixels = job()
        finally:
            self.decoded_at = time.perf_counter()
        upright = pixels.shape[:2][::-1] if self.orientation in (5, 6, 7, 8) else pixels.shape[:2]
        if tuple(upright) != self.decoded_hw:  # the tiles' geometry was planned for this size
            raise ImageError(f"the image decoded to {upright[1]}x{upright[0]}, not the "
                             f"{self.decoded_hw[1]}x{self.decoded_hw[0]} its header gave")
        return pixels

    def upright(self) -> np.ndarray:
        """The whole image, upright (waits for the decode)."""
        return apply_orientation(self.pixels.result(), self.orientation)

    def cancel(self) -> None:
        for future in (self.pixels, self.top):
            if future is not None:
                future.cancel()


def _tile_spans(plan: TilePlan, place: int) -> tuple[Span, Span]:
    """Grid tile `place`'s rows and columns in the padded image."""
    T = plan.tile
    r, c = divmod(place, plan.cols)
    return (r * T, r * T + T), (c * T, c * T + T)


def _early_rows(plan: TilePlan, settings: SplitSettings, orientation: int) -> Optional[int]:
    """How many of the file's rows to decode early: enough for the line of grid tiles along the side of
    the upright image that the file's first rows land on (image_io.top_band: the top unless the photo
    is turned), at most EARLY_DECODE_MAX_SHARE of them; None when the grid is a single line that way."""
    steps = chain(plan.source, [plan.resized, plan.padded], settings.resample)
    (h, w), T = plan.source, plan.tile
    if orientation in (5, 6, 7, 8):  # the file's rows are the upright image's columns
        if plan.cols < 2:
            return None
        first = orientation in (5, 8)
        c = 0 if first else plan.cols - 1
        _, (a, b) = need(steps, (0, plan.padded[0]), (c * T, c * T + T))
        rows, stored = (b if first else w - a), w
    else:
        if plan.rows < 2:
            return None
        first = orientation in (1, 2)
        r = 0 if first else plan.rows - 1
        (a, b), _ = need(steps, (r * T, r * T + T), (0, plan.padded[1]))
        rows, stored = (b if first else h - a), h
    return rows if rows <= EARLY_DECODE_MAX_SHARE * stored else None


def start_decode(data: bytes, settings: SplitSettings, max_tiles: Optional[int] = None) -> Decoding:
    """Start decoding an image file (`data` as board.image_io.read_bytes returned it) for splitting,
    on the front-end threads; its plan (within the tile budget) is read from the header first.

    For a large baseline JPEG or PNG the rows of the first grid line are also decoded on their own
    (image_io.decode_top, about that fraction of a full decode, on another thread), so stream_tiles
    can cut those tiles, and the NPU start on them, while the whole image is still decoding.
    """
    info, plan, chosen, reduction = plan_decode(data, settings, max_tiles)
    top_job, region_ = None, None
    if (reduction == 1 and supported(chosen.resample) and frontend_threads() >= 2
            and info.width * info.height >= EARLY_DECODE_MIN_PIXELS and top_field(data, info) is not None):
        rows = _early_rows(plan, chosen, info.orientation)
        if rows is not None:
            top_job, region_ = partial(decode_top, data, info, rows), top_band(info.orientation, rows, plan.source)
    decoded_hw = tuple(-(-side // reduction) for side in plan.source)  # libjpeg's scaled size rounds up
    return Decoding(plan, chosen, partial(decode, data, info, reduce=reduction, upright=False),
                    orientation=info.orientation, decoded_hw=decoded_hw, top_job=top_job, top_region=region_)


def _inside(inner: tuple[Span, Span], outer: tuple[Span, Span]) -> bool:
    return all(o[0] <= i[0] and i[1] <= o[1] for i, o in zip(inner, outer))


def stream_tiles(decoding: Decoding, *, exact: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(place, tile) for the plan's tiles (place = index in cut_tiles' order, the same tiles), each as
    soon as it is ready, the early ones first.

    Each grid tile reads its window of the file's pixels and turns only that upright, so a turned
    photo is never turned whole. The tiles inside the early decode's region are cut from it; a place
    can then come twice, and the later tile is the right one: the early rows are compared with the
    whole decode once that is there, and if they differ (they should not: one file, one codec
    library), those tiles are cut again.
    """
    plan, settings, orientation = decoding.plan, decoding.settings, decoding.orientation
    T, grid = plan.tile, plan.rows * plan.cols
    if not (settings.do_image_splitting and plan.rows and supported(settings.resample)):
        yield from enumerate(cut_tiles(decoding.upright(), plan, settings, exact=exact))
        return
    steps = chain(decoding.decoded_hw, [plan.resized, plan.padded], settings.resample, exact=exact)
    top = decoding.top.result() if decoding.top is not None else None
    early: list[int] = []
    if top is not None and decoding.top_region is not None:
        early = [p for p in range(grid) if _inside(need(steps, *_tile_spans(plan, p)), decoding.top_region)]
    later = [p for p in range(grid) if p not in early]
    # the first tile in row bands, one per thread (but the one decoding the whole file, if it is early)
    first_bands = max(1, frontend_threads() - 1) if early else frontend_threads()
    turn = (orientation, decoding.decoded_hw)
    jobs = {p: _tile_parts(steps, top if p in early else decoding.pixels, plan, p, first_bands if i == 0 else 1,
                           *turn) for i, p in enumerate(early + later)}
    padded = np.empty((*plan.padded, 3), np.uint8)
    try:
        for p in early:
            yield p, _collect(jobs[p], padded, plan, p)
        if early:
            full = decoding.pixels.result()
            if not np.array_equal(full[:len(top)], top):
                jobs.update({p: _tile_parts(steps, full, plan, p, 1, *turn) for p in early})
                for p in early:
                    yield p, _collect(jobs[p], padded, plan, p)
        for p in later:
            yield p, _collect(jobs[p], padded, plan, p)
    finally:
        _cancel(jobs.values())
        decoding.cancel()
    yield grid, resize(padded, (T, T), settings.resample, exact=exact)


# A JPEG may be decoded at 1/2, 1/4 or 1/8 of its size when that leaves at least this many times the
# first resize's target on both sides: then resampling from the reduced image stays within the parity
# tolerance (measured; with less margin it does not).
REDUCED_DECODE_MARGIN = 1.5


def jpeg_reduction(source: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest JPEG decode reduction (1, 2, 4 or 8) that keeps REDUCED_DECODE_MARGIN x `target`."""
    for factor in (8, 4, 2):
        if all(math.ceil(s / factor) >= REDUCED_DECODE_MARGIN * t for s, t in zip(source, target)):
            return factor
    return 1


def plan_decode(data: bytes, settings: SplitSettings,
                max_tiles: Optional[int] = None) -> tuple[ImageInfo, TilePlan, SplitSettings, int]:
    """What decoding an image file for splitting takes, from its header alone: (header, plan,
    settings within the tile budget, JPEG reduction).

    The plan comes from the header's (upright) size, before any pixel is decoded, so a JPEG can be
    decoded straight to a fraction of its size where jpeg_reduction allows (a 48 MP photo, or a
    small tile budget); the plan still describes the full image, as the reference sees it.
    """
    info = probe(data)
    upright = (info.width, info.height) if info.orientation in (5, 6, 7, 8) else (info.height, info.width)
    chosen = budget_settings(settings, *upright, max_tiles)
    plan = plan_tiles(*upright, chosen)
    return info, plan, chosen, jpeg_reduction(upright, plan.resized) if chosen.do_resize else 1

