"""The host-patchified vision layout: the board's patch rows are the reference's patches, the patch
layout computes what the Conv layout computes, and a bundle converted with it runs like the reference.

- patchify (board.tiles) against the tile's own pixels, in the Conv's row order;
- the reference processor's own tiles, patchified and pushed through the folded MatMul (and through
  the whole exported patch graph), against transformers' patch embedding and get_image_features;
- both exported layouts in ONNX Runtime (fp32) on the same uint8 tiles: max abs diff <= 1e-4;
- host.convert --vision-layout patches|conv on a tiny checkpoint: the manifest records the layout,
  the board's feed follows it, and greedy tokens in emulation equal transformers' generate().
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from board.errors import VisionError  # noqa: E402
from board.image_io import load_image  # noqa: E402
from board.tiles import SplitSettings, normalize_tiles, patchify, split_image  # noqa: E402
from board.vision import FEEDS, tile_feed  # noqa: E402
from host.checkpoint import load_checkpoint  # noqa: E402
from host.vision_export import export_onnx, get_layout, load_vision_tower, run_onnx  # noqa: E402

LAYOUT_TOLERANCE = 1e-4  # fp32, ONNX Runtime: patch rows + folded MatMul vs normalization + Conv
# tile, patch, rows, row length (p*p*3 padded to 16: the toolkit keeps the input Reshape on the NPU)
FAMILIES = {"256m": (512, 16, 1024, 768), "2.2b": (384, 14, 729, 592)}


def _tiles(n: int, tile: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, tile, tile, 3), dtype=np.uint8)


# -- patchify: pure numpy ---------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patchify_rows_are_the_tiles_patches_in_conv_order(family):
    tile, patch, rows, width = FAMILIES[family]
    tiles = _tiles(2, tile)
    out = patchify(tiles, patch)
    assert out.shape == (2, rows, width) and out.dtype == np.uint8 and out.flags.c_contiguous
    grid = tile // patch
    for n, r in [(0, 0), (1, 1), (0, grid), (1, rows - 1), (0, 5 * grid + 3)]:
        gy, gx = divmod(r, grid)  # row r is the Conv output at (r // grid, r % grid)
        expected = tiles[n, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch, :]
        values = expected.size
        np.testing.assert_array_equal(out[n, r, :values], expected.reshape(-1))  # (y, x, channel) inside a row
        assert not out[n, r, values:].any()  # zero padding
    # like the reference's "valid" Conv, pixels beyond grid * patch are never used (384 = 27 * 14 + 6)
    edited = tiles.copy()
    edited[:, grid * patch:, :] = 0
    edited[:, :, grid * patch:] = 0
    np.testing.assert_array_equal(patchify(edited, patch), out)


def test_patchify_refuses_wrong_shapes():
    with pytest.raises(ValueError):
        patchify(np.zeros((1, 32, 48, 3), np.uint8), 16)
    with pytest.raises(ValueError):
        patchify(np.zeros((1, 32, 32, 4), np.uint8), 16)


def test_board_feeds_follow_the_recorded_layout():
    """'patches<p>' feeds rknnlite the uint8 rows (no data_format: a 3-D input) and ONNX the same values."""
    tiles = _tiles(2, 32)
    feed = tile_feed("patches16")
    npu = feed.npu_input(tiles[0])
    assert npu.shape == (1, 4, 768) and npu.dtype == np.uint8 and feed.npu_data_format is None
    np.testing.assert_array_equal(npu[0], patchify(tiles, 16)[0])
    onnx_in = feed.onnx_input(tiles, SplitSettings(longest_edge=64, tile=32))
    assert onnx_in.dtype == np.float32 and onnx_in.max() > 200  # raw 0..255: no normalization on the board
    np.testing.assert_array_equal(onnx_in, patchify(tiles, 16))
    assert tile_feed("conv") is FEEDS["conv"]
    for bad in ("patches", "patches0", "patches16x", "grid"):
        with pytest.raises(VisionError, match="input layout"):
            tile_feed(bad)


def test_host_layout_inputs_are_the_board_feeds():
    """Export, the simulator check and calibration use the same rows the board feeds."""
    tiles = _tiles(2, 28)
    settings = SplitSettings(longest_edge=56, tile=28)
    layout, feed = get_layout("patches", 14), tile_feed("patches14")
    assert layout.manifest_name == "patches14" and not layout.rknn_normalizes and layout.rknn_data_format is None
    np.testing.assert_array_equal(layout.rknn_input(tiles[0]), feed.npu_input(tiles[0]))
    np.testing.assert_array_equal(layout.onnx_input(tiles, settings), feed.onnx_input(tiles, settings))
    calib = layout.calibration_array(tiles[1])
    assert calib.shape == (1, 4, 592) and calib.dtype == np.float32  # the RKNN input's shape, raw 0..255
    np.testing.assert_array_equal(calib, patchify(tiles[1:], 14))
    with pytest.raises(ValueError, match="patch size"):
        get_layout("patches")


def test_every_board_layout_has_its_export_and_back(monkeypatch):
    """board.vision.LAYOUTS is the one definition of a layout: host's export layouts extend it under the
    same names and take its input shape; a layout on one side only, or an export that does not extend
    the board's, is refused."""
    from board import vision as board_vision
    from host import vision_export
    from host.vision_export import ConvLayout, InputLayout, PatchLayout, VisionGeometry, export_layouts

    assert set(vision_export.LAYOUTS) == set(board_vision.LAYOUTS) == {"conv", "patches"}
    geometry = VisionGeometry(tile=28, patch=14, scale_factor=2, vision_hidden=8, text_hidden=8)
    for kind, layout in vision_export.LAYOUTS.items():
        assert issubclass(layout, board_vision.LAYOUTS[kind])
        bound = get_layout(kind, geometry.patch)
        feed = tile_feed(bound.manifest_name)  # what the board makes of the manifest's vision.layout
        assert type(feed) is board_vision.LAYOUTS[kind] and feed.name == bound.manifest_name
        assert bound.onnx_input_shape(geometry) == feed.input_shape(geometry.tile)
    assert get_layout("patches", 14).onnx_input_shape(geometry) == (1, 4, 592)

    class GridFeed(board_vision.TileFeed):
        kind = "grid"

    with pytest.raises(TypeError, match="export layout 'grid' has no board layout"):
        export_layouts(ConvLayout, PatchLayout, type("GridLayout", (InputLayout,), {"kind": "grid"}))
    with pytest.raises(TypeError, match="does not extend board.vision.PatchFeed"):
        export_layouts(ConvLayout, type("Impostor", (InputLayout,), {"kind": "patches"}))
    monkeypatch.setitem(board_vision.LAYOUTS, "grid", GridFeed)
    with pytest.raises(TypeError, match="board layout 'grid' has no export layout"):
        export_layouts(ConvLayout, PatchLayout)


# -- against the reference ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint(request.param))
    settings = SplitSettings.from_preprocessor(checkpoint.preprocessor)
    return SimpleNamespace(family=request.param, checkpoint=checkpoint, settings=settings,
                           conv=load_vision_tower(checkpoint, "conv"), patches=load_vision_tower(checkpoint, "patches"))


def _reference_tiles(tiny, images):
    """The reference processor's pixel_values for a split image, and the same tiles as uint8 NHWC."""
    from PIL import Image

    processor = tiny.checkpoint.load_processor()
    pixels = processor.image_processor(images=[Image.open(images["wide"]).convert("RGB")],
                                       return_tensors="np")["pixel_values"][0].astype(np.float32)
    s = tiny.settings
    mean = np.asarray(s.image_mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(s.image_std, np.float32).reshape(1, 3, 1, 1)
    raw = (pixels * std + mean) / s.rescale_factor
    assert np.abs(raw - np.round(raw)).max() < 1e-3  # the processor's tiles are 8-bit images, normalized
    return pixels, np.round(raw).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def test_patch_rows_of_the_reference_tiles_give_transformers_patch_embedding(tiny, images):
    """The board's patch order is the reference's: patchify(reference tile) @ folded weights ==
    transformers' Conv patch embedding (+ positions) on the reference's normalized pixels."""
    pixels, tiles = _reference_tiles(tiny, images)
    assert len(pixels) > 1  # a split image: grid tiles and the global view
    embeddings = tiny.checkpoint.load_model().model.vision_model.embeddings
    with torch.no_grad():
        conv = embeddings.patch_embedding(torch.from_numpy(pixels)).flatten(2).transpose(1, 2)
        expected = (conv + embeddings.position_embedding.weight).numpy()
        ours = tiny.patches.patch_embed(torch.from_numpy(patchify(tiles, tiny.patches.geometry.patch).astype(np.float32)))
    np.testing.assert_allclose(ours.numpy(), expected, atol=LAYOUT_TOLERANCE, rtol=0)


def test_patch_graph_on_reference_tiles_equals_transformers_image_features(tiny, images, tmp_path):
    pixels, tiles = _reference_tiles(tiny, images)
    path = export_onnx(tiny.patches, tmp_path / "patches.onnx")
    ours = run_onnx(path, tiny.patches.layout.onnx_input(tiles, tiny.settings))
    model = tiny.checkpoint.load_model()
    with torch.no_grad():
        expected = model.model.get_image_features(torch.from_numpy(pixels)[None]).pooler_output
    expected = torch.cat(list(expected)).reshape(ours.shape).numpy()
    assert np.abs(ours - expected).max() <= LAYOUT_TOLERANCE


def test_both_layouts_compute_the_same_in_onnx_runtime(tiny, tmp_path):
    """The two exported graphs, fp32 in ONNX Runtime, on the same uint8 tiles (each fed its own way)."""
    tiles = _tiles(3, tiny.settings.tile, seed=2)
    outputs = {}
    for name in ("conv", "patches"):
        tower = getattr(tiny, name)
        path = export_onnx(tower, tmp_path / f"{name}.onnx")
        outputs[name] = run_onnx(path, tower.layout.onnx_input(tiles, tiny.settings))
    assert np.abs(outputs["patches"] - outputs["conv"]).max() <= LAYOUT_TOLERANCE
    assert np.abs(outputs["conv"]).max() > 0.1  # not trivially small features
    reference = tiny.conv.reference(normalize_tiles(tiles, tiny.settings))
    assert np.abs(outputs["patches"] - reference).max() <= LAYOUT_TOLERANCE


# -- the bundle and the board front end ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint):
    """The tiny 256m checkpoint converted once per layout (x86: --skip-decoder)."""
    from host import convert

    made = {}
    for layout in ("patches", "conv"):
        out = tmp_path_factory.mktemp(f"bundle-{layout}")
        assert convert.main(["--model", str(tiny_checkpoint("256m")), "--out", str(out), "--skip-decoder",
                             "--quiet", "--vision-layout", layout]) == 0
        made[layout] = out
    return made


def test_manifest_records_the_layout_and_the_model_takes_it(bundles):
    import onnx

    from board.bundle import VISION_ONNX, Bundle

    for layout, manifest_name, dims in (("patches", "patches16", [1, 1024, 768]), ("conv", "conv", [1, 3, 512, 512])):
        bundle = Bundle.open(bundles[layout])
        assert bundle.vision_layout == manifest_name
        assert json.loads((bundles[layout] / "manifest.json").read_text())["vision"]["layout"] == manifest_name
        graph = onnx.load(str(bundle.path(VISION_ONNX)), load_external_data=False).graph
        assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == dims
        assert tile_feed(bundle.vision_layout).name == manifest_name


def test_both_layouts_give_the_reference_greedy_tokens(bundles, tiny_checkpoint, images):
    """The front end follows the recorded layout: same tokens as each other and as transformers' generate()."""
    from board.decoder import SamplingParams
    from board.pipeline import Pipeline
    from support import CHAT_QUESTION, Oracle

    oracle = Oracle(tiny_checkpoint("256m"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_QUESTION}]}]
    expected = oracle.generate(oracle.inputs(messages, [images["wide"]]), 12)
    answers, rows = {}, {}
    for layout, folder in bundles.items():
        with Pipeline(folder, emulate=True) as pipeline:
            assert pipeline.bundle.vision_layout == ("patches16" if layout == "patches" else "conv")
            answers[layout] = pipeline.ask(CHAT_QUESTION, [images["wide"]],
                                           sampling=SamplingParams(max_new_tokens=12)).collect().token_ids
            tiles = split_image(load_image(images["wide"]), pipeline.bundle.split_settings).tiles[:2]
            rows[layout] = pipeline.vision.encode(tiles)
    assert answers["patches"] == answers["conv"] == expected
    assert np.abs(rows["patches"] - rows["conv"]).max() <= LAYOUT_TOLERANCE


@pytest.mark.parametrize("layout,tile", [("conv", 512), ("patches16", 512), ("patches14", 384)])
def test_manifest_input_is_what_the_npu_is_fed(layout, tile):
    """vision.input in the manifest describes the array rknnlite really gets in that layout."""
    from board.vision import tile_feed
    from host.bundle_writer import npu_input_section

    fed = tile_feed(layout).npu_input(np.zeros((tile, tile, 3), np.uint8))
    section = npu_input_section(layout, tile)
    assert section["shape"] == list(fed.shape) and section["dtype"] == str(fed.dtype)
