"""Pillow's resize as banded matrix products: bit-exact in float64, within 2 levels and faster in float32.

The reference resizes with Pillow, so our tiles must be Pillow's. What Pillow does
(src/libImaging/Resample.c; reimplemented here from its description, not copied):

- Two separable passes, each output pixel a weighted sum of a window of input pixels along one axis.
  The filter (Lanczos: support 3) is widened by the downscale factor (antialiasing), so a 2x
  shrink reads 12 inputs per output. `Axis` holds, per output, the first input it reads, how many, and
  the weights: computed in double exactly as Pillow's precompute_coeffs does (window bounds rounded the
  same way, weights normalized to sum 1), then rounded to fixed point with PRECISION_BITS = 22
  fractional bits as Pillow's normalize_coeffs_8bpc does.
- Each output is (sum(input * weight) + 2^21) >> 22, clipped to 0..255; the image between the two
  passes is 8-bit, so which pass goes first changes the result: the horizontal one, except (from
  Pillow 13) the vertical one when the height shrinks more than twice as much as the width
  (`vertical_first`). A same-size axis is not resampled at all.

Here a pass is a product with the banded matrix of those fixed-point weights (scaled by 2^-22), cut
into blocks of BLOCK outputs so the zeros outside the band cost little, and run by numpy's BLAS:
- float64 (`exact=True`): every product and partial sum is a multiple of 2^-22 below 2^31, held
  exactly, so the result is Pillow's bit for bit, whatever order BLAS sums in.
- float32 (the pipeline's choice): products round to 24 bits, so an output whose exact value lies
  within ~1e-4 of a rounding boundary can come out one level off; with two passes, at most 2 levels
  (measured: tiles mean 7e-6, max 0.016 from Pillow's on the normalized scale). 1.2-2.2x faster
  than Pillow per core (docs/frontend.md); float64 about as fast as Pillow.
The vertical pass multiplies a block of weights [outputs, inputs] by the input rows, whole rows wide
(a short, wide product, which BLAS runs fast); the horizontal pass transposes the image (cv2), runs the
same product and transposes back, which is faster than the tall, narrow product it replaces.

`Resize` plans one resize and computes any output region from the input region it depends on
(`need`), so the tiles of a split are computed independently, in parallel, and each can go to the NPU
as soon as it is ready. Only Pillow's convolution filters are reimplemented (BOX, BILINEAR, HAMMING,
BICUBIC, LANCZOS; `supported`); `resize` hands any other filter to Pillow itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from .cpus import frontend_threads, parallel_map

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
# Outputs per product: fewer wastes less work on the zeros around the band, more keeps BLAS efficient
# (16 measured best for 2x shrinks and for upscales on x86).
BLOCK = 16
# Below this many output rows a band is not worth a thread of its own.
MIN_BAND_ROWS = 64

Span = tuple[int, int]  # [start, stop) along one axis


def _sinc(x: np.ndarray) -> np.ndarray:
    t = x * math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(t) / t)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    t = x * math.pi
    # Pillow's constants are C floats (0.54f, 0.46f), promoted to double
    with np.errstate(divide="ignore", invalid="ignore"):
        window = np.sin(t) / t * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(t))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, window))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


# Pillow's convolution filters: (function, support)
FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    int(Image.Resampling.BOX): (_box, 0.5),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
    int(Image.Resampling.HAMMING): (_hamming, 1.0),
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.LANCZOS): (_lanczos, 3.0),
}


def supported(resample: int) -> bool:
    """Whether `resample` is one of the filters reimplemented here."""
    return int(resample) in FILTERS


def _pillow_version() -> tuple[int, ...]:
    import PIL

    return tuple(int(p) for p in PIL.__version__.split(".")[:2] if p.isdigit())


_VERTICAL_FIRST_RULE = _pillow_version() >= (13, 0)


def vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Which pass Pillow runs first: from 13.0 the vertical one when the height shrinks more than twice
    as much as the width; before 13.0 always the horizontal one."""
    return _VERTICAL_FIRST_RULE and in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


@dataclass(frozen=True)
class Axis:
    """Pillow's coefficients for one axis of one resize: output j reads inputs first[j] ..
    first[j] + count[j] - 1 with the fixed-point weights weights[j, :count[j]]."""

    first: np.ndarray  # [out] int64
    count: np.ndarray  # [out] int64
    weights: np.ndarray  # [out, ksize] int64, in units of 2^-PRECISION_BITS

    def span(self, outputs: Span) -> Span:
        """The inputs that outputs [a, b) read."""
        a, b = outputs
        return int(self.first[a]), int((self.first[a:b] + self.count[a:b]).max())


@lru_cache(maxsize=256)
def axis(in_size: int, out_size: int, resample: int) -> Axis:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for resizing in_size pixels to out_size."""
    filter_fn, support = FILTERS[int(resample)]
    scale = filterscale = float(in_size) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    taps = np.arange(ksize)
    w = filter_fn(((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w[taps[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for i in range(ksize):  # left to right, as Pillow sums (the rounding of the sum matters)
        total += w[:, i]
    w = np.where(total[:, None] != 0.0, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    fixed = w * (1 << PRECISION_BITS)
    weights = np.where(w < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed)).astype(np.int64)
    return Axis(first, count, weights)


Block = tuple[int, int, int, int, np.ndarray]  # outputs [a, b), inputs [x0, x1), weights [b - a, x1 - x0]


@lru_cache(maxsize=2048)
def _blocks(in_size: int, out_size: int, resample: int, outputs: Span, dtype: type) -> tuple[Block, ...]:
    """The banded weight matrix of outputs [a, b), cut into blocks of BLOCK outputs (each with the
    input span it reads), scaled to 1.0 = 2^PRECISION_BITS (exact in float32 and float64)."""
    coeffs = axis(in_size, out_size, resample)
    taps = np.arange(coeffs.weights.shape[1])
    blocks = []
    for a in range(outputs[0], outputs[1], BLOCK):
        b = min(outputs[1], a + BLOCK)
        x0, x1 = coeffs.span((a, b))
        used = taps[None, :] < coeffs.count[a:b, None]
        rows = np.broadcast_to(np.arange(b - a)[:, None], used.shape)[used]
        cols = (coeffs.first[a:b, None] - x0 + taps[None, :])[used]
        matrix = np.zeros((b - a, x1 - x0))
        matrix[rows, cols] = coeffs.weights[a:b][used] * 2.0 ** -PRECISION_BITS
        matrix = matrix.astype(dtype)
        matrix.setflags(write=False)
        blocks.append((a, b, x0, x1, matrix))
    return tuple(blocks)


def _vertical(src: np.ndarray, row0: int, sizes: tuple[int, int], resample: int, outputs: Span,
              exact: bool) -> np.ndarray:
    """Output rows [a, b) of a vertical pass; `src` holds input rows row0.. (every column of the region)."""
    dtype = np.float64 if exact else np.float32
    flat = src.reshape(src.shape[0], -1)
    out = np.empty((outputs[1] - outputs[0], flat.shape[1]), np.uint8)
    for a, b, x0, x1, matrix in _blocks(*sizes, resample, outputs, dtype):
        acc = matrix @ flat[x0 - row0:x1 - row0].astype(dtype)
        if exact:  # Pillow's (sum + 2^21) >> 22 is floor(acc + 0.5), and acc is exact in float64
            acc += 0.5
            np.floor(acc, out=acc)
        # saturating cast to 0..255; it rounds half to even, which only matters for float32's
        # inexact sums (exact sums were floored above)
        cv2.add(acc, 0.0, dst=out[a - outputs[0]:b - outputs[0]], dtype=cv2.CV_8U)
    return out.reshape(len(out), *src.shape[1:])


def _horizontal(src: np.ndarray, col0: int, sizes: tuple[int, int], resample: int, outputs: Span,
                exact: bool) -> np.ndarray:
    """Output columns [a, b) of a horizontal pass: the vertical pass of the transposed region."""
    return cv2.transpose(_vertical(cv2.transpose(src), col0, sizes, resample, outputs, exact))


class Resize:
    """One Pillow resize of an (h, w) RGB image to `out_hw` with filter `resample`, computed by regions."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], resample: int, *, exact: bool = False):
        if not supported(resample):
            raise ValueError(f"filter {resample} is not one of Pillow's convolution filters {sorted(FILTERS)}")
        self.in_hw, self.out_hw = (int(in_hw[0]), int(in_hw[1])), (int(out_hw[0]), int(out_hw[1]))
        self.resample, self.exact = int(resample), exact
        (in_h, in_w), (out_h, out_w) = self.in_hw, self.out_hw
        self.vertical, self.horizontal = in_h != out_h, in_w != out_w
        self.vertical_first = self.vertical and self.horizontal and vertical_first(in_w, in_h, out_w, out_h)

    def need(self, rows: Span, cols: Span) -> tuple[Span, Span]:
        """The input region that output rows x cols are computed from."""
        (in_h, in_w), (out_h, out_w) = self.in_hw, self.out_hw
        return (axis(in_h, out_h, self.resample).span(rows) if self.vertical else rows,
                axis(in_w, out_w, self.resample).span(cols) if self.horizontal else cols)

    def region(self, src: np.ndarray, origin: tuple[int, int], rows: Span, cols: Span) -> np.ndarray:
        """Output rows x cols, from `src`: the input from `origin` (row, col) on, covering need(rows, cols)."""
        (in_rows, in_cols) = self.need(rows, cols)
        img = src[in_rows[0] - origin[0]:in_rows[1] - origin[0], in_cols[0] - origin[1]:in_cols[1] - origin[1]]
        v_sizes, h_sizes = (self.in_hw[0], self.out_hw[0]), (self.in_hw[1], self.out_hw[1])
        if self.vertical_first:
            img = _vertical(img, in_rows[0], v_sizes, self.resample, rows, self.exact)
            return _horizontal(img, in_cols[0], h_sizes, self.resample, cols, self.exact)
        if self.horizontal:
            img = _horizontal(img, in_cols[0], h_sizes, self.resample, cols, self.exact)
        if self.vertical:
            img = _vertical(img, in_rows[0], v_sizes, self.resample, rows, self.exact)
        return img


def chain(in_hw: tuple[int, int], sizes: Sequence[tuple[int, int]], resample: int, *,
          exact: bool = False) -> list[Resize]:
    """Resizes one after the other through `sizes` (a size equal to the previous one is no resize)."""
    steps: list[Resize] = []
    for size in sizes:
        current = steps[-1].out_hw if steps else tuple(in_hw)
        if tuple(size) != current:
            steps.append(Resize(current, size, resample, exact=exact))
    return steps


def _windows(steps: Sequence[Resize], rows: Span, cols: Span) -> list[tuple[Span, Span]]:
    """The region each step reads, first step's input first, ending with (rows, cols) themselves."""
    windows = [(rows, cols)]
    for step in reversed(steps):
        windows.append(step.need(*windows[-1]))
    windows.reverse()
    return windows


def need(steps: Sequence[Resize], rows: Span, cols: Span) -> tuple[Span, Span]:
    """The region of the source that output rows x cols of `steps` are computed from."""
    return _windows(steps, rows, cols)[0]


def region(steps: Sequence[Resize], src: np.ndarray, rows: Span, cols: Span,
           origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Output rows x cols of `steps` applied to `src`, computing only what they depend on; a new array.
    `src` may be only a part of the input, from `origin` (row, col) on, covering need(rows, cols)
    (a band of an image decoded early)."""
    if not steps:
        return src[rows[0] - origin[0]:rows[1] - origin[0], cols[0] - origin[1]:cols[1] - origin[1]].copy()
    windows = _windows(steps, rows, cols)
    img = src
    for step, (out_rows, out_cols) in zip(steps, windows[1:]):
        img = step.region(img, origin, out_rows, out_cols)
        origin = (out_rows[0], out_cols[0])
    return img


def render(steps: Sequence[Resize], src: np.ndarray) -> np.ndarray:
    """The whole output of `steps` applied to `src` (a new array), in row bands on the front-end threads."""
    if not steps:
        return src.copy()
    out_h, out_w = steps[-1].out_hw
    count = max(1, min(frontend_threads(), out_h // MIN_BAND_ROWS))
    edges = [round(out_h * i / count) for i in range(count + 1)]
    bands = parallel_map(lambda span: region(steps, src, span, (0, out_w)), list(zip(edges[:-1], edges[1:])))
    return bands[0] if len(bands) == 1 else np.concatenate(bands)


def resize(rgb: np.ndarray, size: tuple[int, int], resample: int, *, exact: bool = True) -> np.ndarray:
    """Pillow's resize of an HxWx3 uint8 array to size (h, w): bit-identical with `exact`, else within
    2 levels and faster. A same-size resize returns the input, as Pillow returns an unchanged copy."""
    if tuple(size) == rgb.shape[:2]:
        return rgb
    if not supported(resample):
        return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample))
    return render(chain(rgb.shape[:2], [size], resample, exact=exact), rgb)
