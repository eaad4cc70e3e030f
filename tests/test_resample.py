"""board.resample against Pillow itself: bit-exact in float64, within 2 levels in float32, by regions too;
and the front end built on it (cut_tiles, the reduced JPEG decode) against Pillow and the reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from board import resample as R
from board.image_io import decode, load_image
from board.tiles import (REDUCED_DECODE_MARGIN, SplitSettings, cut_tiles, jpeg_reduction, plan_decode,
                         normalize_tiles, plan_tiles, split_image)

RNG = np.random.default_rng(17)
FILTERS = [Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.HAMMING,
           Image.Resampling.BOX]
# (in_h, in_w, out_h, out_w): shrinks by 2 (the 12 MP photo), near 1, upscales, 4x (the global view), a
# height shrink large enough that Pillow 13 runs the vertical pass first, single pixels and lines
SIZES = [(756, 1008, 384, 512), (550, 425, 512, 396), (120, 160, 384, 512), (512, 384, 128, 128),
         (900, 100, 60, 90), (1, 1, 7, 5), (3, 700, 1, 256), (333, 1, 64, 1), (97, 131, 131, 97)]


def pillow(img: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), resample))


@pytest.mark.parametrize("resample", FILTERS, ids=lambda f: f.name)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_float64_is_pillow_bit_for_bit_and_float32_within_2_levels(resample, size):
    """Noise is the worst case: any difference in coefficients, rounding or pass order shows."""
    in_h, in_w, out_h, out_w = size
    img = RNG.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    expected = pillow(img, (out_h, out_w), resample)
    assert np.array_equal(R.resize(img, (out_h, out_w), resample, exact=True), expected)
    fast = R.resize(img, (out_h, out_w), resample, exact=False)
    assert fast.shape == expected.shape and np.abs(fast.astype(int) - expected).max() <= 2


def test_the_vertical_first_case_is_exercised():
    assert R.vertical_first(100, 900, 90, 60) == R._VERTICAL_FIRST_RULE  # (900, 100) -> (60, 90) above
    assert not R.vertical_first(1008, 756, 512, 384)


@pytest.mark.parametrize("exact", [True, False])
def test_any_region_of_a_chain_is_that_region_of_the_whole(exact):
    """What lets tiles be cut independently: a region computed from only the input it needs equals the
    same region of the whole result (bit-exact against Pillow in float64)."""
    img = RNG.integers(0, 256, (601, 803, 3), dtype=np.uint8)
    sizes = [(384, 512), (512, 512)]  # shrink, then stretch one side (step 1 and 2 of a split)
    steps = R.chain(img.shape[:2], sizes, Image.Resampling.LANCZOS, exact=exact)
    whole = R.render(steps, img)
    if exact:
        assert np.array_equal(whole, pillow(pillow(img, sizes[0], 1), sizes[1], 1))
    for rows, cols in [((0, 512), (0, 512)), ((0, 17), (500, 512)), ((130, 389), (201, 202)), ((511, 512), (0, 1))]:
        part = R.region(steps, img, rows, cols)
        assert np.array_equal(part, whole[rows[0]:rows[1], cols[0]:cols[1]]), (rows, cols)
    assert R.chain((5, 5), [(5, 5)], 1) == [] and np.array_equal(R.render([], img), img)


def test_unsupported_filters_go_to_pillow():
    img = RNG.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert not R.supported(Image.Resampling.NEAREST)
    assert np.array_equal(R.resize(img, (31, 90), Image.Resampling.NEAREST), pillow(img, (31, 90), 0))
    with pytest.raises(ValueError, match="convolution filters"):
        R.Resize((50, 70), (31, 90), Image.Resampling.NEAREST)


def _pillow_split(img: np.ndarray, settings: SplitSettings) -> np.ndarray:
    """The tiles as the reference cuts them, with Pillow's resizes (what split_image did before)."""
    plan, T, f = plan_tiles(*img.shape[:2], settings), settings.tile, settings.resample
    padded = pillow(pillow(img, plan.resized, f), plan.padded, f)
    grid = padded.reshape(plan.rows, T, plan.cols, T, 3).transpose(0, 2, 1, 3, 4).reshape(-1, T, T, 3)
    return np.concatenate([grid, pillow(padded, (T, T), f)[None]])


def test_cut_tiles_streams_the_tiles_of_split_image_in_order():
    settings = SplitSettings(longest_edge=512, tile=128)
    img = RNG.integers(0, 256, (700, 533, 3), dtype=np.uint8)
    plan = plan_tiles(*img.shape[:2], settings)
    assert (plan.rows, plan.cols) == (4, 4)
    expected = _pillow_split(img, settings)
    assert np.array_equal(split_image(img, settings, exact=True).tiles, expected)
    streamed = list(cut_tiles(img, plan, settings))
    assert len(streamed) == plan.n_tiles and all(t.shape == (128, 128, 3) and t.flags.c_contiguous for t in streamed)
    assert np.abs(np.stack(streamed).astype(int) - expected).max() <= 2
    assert np.array_equal(np.stack(streamed), split_image(img, settings).tiles)  # float32 is deterministic


def _jpeg(h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / 41 + y / 97), 128 + 90 * np.cos(y / 29 - x / 300),
                    128 + 70 * np.sin((x - y) / 17)], -1) + RNG.normal(0, 18, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_jpeg_reduction_keeps_the_margin():
    assert jpeg_reduction((3024, 4032), (1536, 2048)) == 1  # a 12 MP photo at full splitting: no margin
    assert jpeg_reduction((3024, 4032), (768, 1024)) == 2  # with a 5-tile budget
    assert jpeg_reduction((6000, 8000), (768, 1024)) == 4
    assert jpeg_reduction((6000, 8000), (150, 200)) == 8
    for factor, target in [(2, 1024), (4, 512)]:  # just at the margin, and one pixel short of it
        side = int(np.ceil(REDUCED_DECODE_MARGIN * target)) * factor
        assert jpeg_reduction((side, side), (target, target)) == factor
        assert jpeg_reduction((side - factor, side - factor), (target, target)) < factor


def test_reduced_jpeg_decode_stays_within_the_parity_tolerance():
    """A 12 MP JPEG under a 5-tile budget decodes at half size; its tiles still match the reference
    processor (run as the budget says: size.longest_edge = 2 tiles) within the parity tolerances."""
    from transformers import Idefics3ImageProcessorPil

    data = _jpeg(3000, 4000)
    settings = SplitSettings(longest_edge=2048, tile=512)
    info, plan, chosen, reduction = plan_decode(data, settings, max_tiles=5)
    rgb = decode(data, info, reduce=reduction)
    assert reduction == 2 and rgb.shape == (1500, 2000, 3) and plan.source == (3000, 4000) and (plan.rows, plan.cols) == (2, 2)
    ours = normalize_tiles(np.stack(list(cut_tiles(rgb, plan, chosen))), chosen)
    ref = Idefics3ImageProcessorPil(size={"longest_edge": chosen.longest_edge}, max_image_size={"longest_edge": 512},
                                    resample=1)(Image.open(io.BytesIO(data)), return_tensors="np")
    diff = np.abs(ours - ref["pixel_values"][0][: plan.n_tiles])
    assert diff.mean() <= 0.01 and diff.max() <= 0.1, (diff.mean(), diff.max())
    full = load_image(data)  # at full size: no reduction without the margin
    info, _, _, reduction = plan_decode(data, settings)
    assert reduction == 1 and decode(data, info, reduce=reduction).shape == full.shape == (3000, 4000, 3)
