"""Splitting geometry and resampling: bit-exact with Pillow, and the settings are validated."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import Idefics3ImageProcessorPil

from board.errors import BundleError, InputError
from board.tiles import SplitSettings, budget_settings, check_tile_budget, plan_tiles, resize, split_image

RNG = np.random.default_rng(11)


def _random_sizes(n: int) -> list[tuple[int, int, int, int]]:
    fixed = [(3024, 4032, 1536, 2048), (1536, 2048, 512, 512), (1080, 1920, 1152, 2048), (1000, 1000, 500, 2000),
             (1000, 100, 300, 200), (37, 53, 1430, 2048), (2, 4000, 2, 2048), (9000, 100, 2048, 22), (1, 1, 2048, 2048)]
    return fixed + [tuple(int(v) for v in RNG.integers(1, 1400, 4)) for _ in range(n)]


@pytest.mark.parametrize("size", _random_sizes(30), ids=lambda s: "x".join(map(str, s)))
def test_resize_is_bit_identical_to_pillow(size):
    """Noise is the worst case: any difference in coefficients, rounding or pass order shows."""
    in_h, in_w, out_h, out_w = size
    img = RNG.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.Resampling.LANCZOS))
    assert np.array_equal(resize(img, (out_h, out_w), Image.Resampling.LANCZOS), expected)


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_other_filters_follow_the_setting(resample):
    img = RNG.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img).resize((640, 333), resample))
    assert np.array_equal(resize(img, (333, 640), resample), expected)


FAMILIES = {"512": (2048, 512), "384": (1536, 384)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("hw", [(1, 1), (100, 2), (2, 100), (511, 512), (512, 513), (3000, 4000), (6000, 50), (4096, 4097)])
@pytest.mark.parametrize("budget", [None, 0, 1, 2, 3])
def test_plan_matches_reference_grid(family, hw, budget):
    longest, tile = FAMILIES[family]
    cfg = {"size": {"longest_edge": longest}, "max_image_size": {"longest_edge": tile}, "resample": 1}
    settings = SplitSettings.from_preprocessor(cfg).with_tiles_per_side(budget)
    ref = Idefics3ImageProcessorPil(
        size={"longest_edge": settings.longest_edge}, max_image_size={"longest_edge": tile},
        do_image_splitting=settings.do_image_splitting, resample=1,
    )
    img = np.zeros((*hw, 3), np.uint8)
    out = ref(Image.fromarray(img), return_row_col_info=True)
    plan = plan_tiles(*hw, settings)
    assert (plan.rows, plan.cols) == (out["rows"][0][0], out["cols"][0][0])
    n_ref = int(np.asarray(out["pixel_attention_mask"][0]).reshape(len(out["pixel_attention_mask"][0]), -1).any(1).sum())
    assert plan.n_tiles == n_ref
    tiled = split_image(img, settings)
    assert tiled.tiles.shape == (plan.n_tiles, tile, tile, 3)


def test_budget_reduces_tiles():
    s = SplitSettings(longest_edge=2048, tile=512)
    counts = [plan_tiles(3024, 4032, s.with_tiles_per_side(b)).n_tiles for b in (None, 3, 2, 1, 0)]
    assert counts == [13, 10, 5, 1, 1]  # 4x3+1, 3x3+1, 2x2+1, one tile, unsplit


def test_tile_budget_per_image_picks_the_largest_grid_that_fits():
    s = SplitSettings(longest_edge=2048, tile=512)
    budgets = (None, 17, 13, 12, 10, 9, 5, 4, 2, 1)
    counts = {b: plan_tiles(3024, 4032, budget_settings(s, 3024, 4032, b)).n_tiles for b in budgets}
    assert counts == {None: 13, 17: 13, 13: 13, 12: 10, 10: 10, 9: 5, 5: 5, 4: 1, 2: 1, 1: 1}
    assert not budget_settings(s, 3024, 4032, 1).do_image_splitting  # 1 = no splitting, not a 1x1 grid
    assert check_tile_budget(None) is None and check_tile_budget(3) == 3
    for bad in (0, -2):
        with pytest.raises(InputError, match="at least 1 tile per image"):
            budget_settings(s, 100, 100, bad)


def test_normalized_matches_reference_formula():
    s = SplitSettings(longest_edge=512, tile=512, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
    tiles = RNG.integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    from board.tiles import normalize_tiles

    out = normalize_tiles(tiles, s)
    chw = tiles.transpose(0, 3, 1, 2).astype(np.float64) / 255
    expected = (chw - np.array([0.1, 0.2, 0.3])[None, :, None, None]) / np.array([0.5, 0.25, 0.125])[None, :, None, None]
    assert out.dtype == np.float32 and np.abs(out - expected).max() < 1e-5


def test_normalization_is_the_reference_processors_in_every_form():
    """board.tiles.normalization is the reference's rescale + normalize, applied (normalize_tiles) and
    as its affine (scale, offset), on every uint8 value with a non-default mean/std."""
    from board.tiles import normalization, normalize_tiles

    s = SplitSettings(longest_edge=512, tile=16, image_mean=(0.48, 0.45, 0.40), image_std=(0.26, 0.26, 0.27))
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    chw = values[0].transpose(2, 0, 1).astype(np.float32)
    processor = Idefics3ImageProcessorPil()
    expected = processor.normalize(processor.rescale(chw, s.rescale_factor), s.image_mean, s.image_std)
    assert np.abs(expected).max() > 2  # not the default 0.5/0.5 scale
    np.testing.assert_allclose(normalize_tiles(values, s)[0], expected, atol=1e-6, rtol=0)
    scale, offset = normalization(s)
    assert scale.shape == offset.shape == (3,)
    np.testing.assert_allclose(chw * scale[:, None, None] + offset[:, None, None], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"size": {"height": 3}, "max_image_size": {"longest_edge": 512}}, "longest_edge"),
        ({"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 99}, "Pillow filter"),
        ({"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "image_std": [0.5, 0, 0.5]}, "std"),
        ({"size": {"longest_edge": 0}, "max_image_size": {"longest_edge": 512}}, "positive"),
    ],
)
def test_bad_settings_are_refused(cfg, message):
    with pytest.raises(BundleError, match=message):
        SplitSettings.from_preprocessor(cfg)
