"""The one-tile vision export: wrapper == transformers, ONNX == PyTorch, and calibration tiles == board tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from board.image_io import load_image  # noqa: E402
from board.tiles import SplitSettings, normalize_tiles, split_image  # noqa: E402
from calibration import vision_tiles  # noqa: E402
from host.checkpoint import load_checkpoint  # noqa: E402
from host.tiny_model import build_tiny_checkpoint  # noqa: E402
from host.vision_export import (  # noqa: E402
    LAYOUTS,
    REFERENCE_FORMS,
    GraphForms,
    agreement,
    export_onnx,
    get_layout,
    load_vision_tower,
    validate_onnx,
)

FAMILIES = {"256m": (512, 64), "2.2b": (384, 81)}  # tile, tokens per tile


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(checkpoint, tower, settings) of a tiny random-weight SmolVLM with the family's real geometry."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    checkpoint = load_checkpoint(path)
    return request.param, checkpoint, load_vision_tower(checkpoint), SplitSettings.from_preprocessor(checkpoint.preprocessor)


def _random_tiles(n: int, tile: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, tile, tile, 3), dtype=np.uint8)


def test_geometry_matches_family(tiny):
    family, checkpoint, tower, _ = tiny
    tile, tokens = FAMILIES[family]
    geometry = tower.geometry
    assert (geometry.tile, geometry.tokens_per_tile) == (tile, tokens)
    assert geometry.tokens_per_tile == checkpoint.image_seq_len
    assert geometry.text_hidden == checkpoint.text_config["hidden_size"]


def test_wrapper_equals_transformers_image_features(tiny):
    """The export wrapper (positions added directly, eager attention) == the full model's own path."""
    _, checkpoint, tower, settings = tiny
    pixels = normalize_tiles(_random_tiles(2, tower.geometry.tile), settings)
    model = checkpoint.load_model()
    with torch.no_grad():
        expected = model.model.get_image_features(torch.from_numpy(pixels)[None]).pooler_output
        expected = torch.cat(list(expected)).reshape(2, tower.geometry.tokens_per_tile, -1).numpy()
        ours = np.stack([tower(torch.from_numpy(p[None]))[0].numpy() for p in pixels])
    assert ours.shape == (2, *tower.geometry.output_shape[1:])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(tower.reference(pixels), expected, atol=1e-6)


def test_onnx_matches_pytorch(tiny, tmp_path):
    _, _, tower, settings = tiny
    path = export_onnx(tower, tmp_path / "vision.onnx")
    report = validate_onnx(tower, path, _random_tiles(2, tower.geometry.tile, seed=1), settings)
    assert report["cosine_min"] > 0.99999
    assert report["max_abs_err"] < 1e-4
    import onnx

    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and not {"Bucketize", "Loop", "If"} & ops  # the bucketize path is gone
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, tower.geometry.tile, tower.geometry.tile]


FORM_CHOICES = [(name, choice) for name, choices in GraphForms.CHOICES.items() for choice in choices]


@pytest.mark.parametrize(("form", "choice"), FORM_CHOICES, ids=[f"{n}-{c}" for n, c in FORM_CHOICES])
def test_every_graph_form_computes_transformers_features(tiny, tmp_path, form, choice):
    """Each way of writing the ops (the variant table's levers) is the same function in ONNX Runtime."""
    _, checkpoint, _, settings = tiny
    tower = load_vision_tower(checkpoint, layout="patches", forms=GraphForms(**{form: choice}))
    path = export_onnx(tower, tmp_path / "vision.onnx")
    report = validate_onnx(tower, path, _random_tiles(2, tower.geometry.tile, seed=3), settings)
    assert report["max_abs_err"] < 1e-4 and report["cosine_min"] > 0.99999


def test_default_forms_differ_from_the_demo_export_only_in_the_connector():
    """The baseline every speed figure is compared to is transformers' graph; the default changes one thing."""
    default = GraphForms()
    assert default.connector == "blocks" and REFERENCE_FORMS.connector == "reference"
    assert {**vars(default), "connector": "reference"} == vars(REFERENCE_FORMS)
    with pytest.raises(ValueError, match="connector"):
        GraphForms(connector="nope")


def test_conv_layout_inputs():
    """The Conv layout: ONNX gets normalized NCHW, the NPU uint8 NHWC, calibration raw 0..255 NCHW."""
    layout = get_layout("conv")
    tiles = _random_tiles(2, 32)
    settings = SplitSettings(longest_edge=64, tile=32)
    np.testing.assert_array_equal(layout.onnx_input(tiles, settings), normalize_tiles(tiles, settings))
    assert layout.rknn_input(tiles[0]).shape == (1, 32, 32, 3) and layout.rknn_input(tiles[0]).dtype == np.uint8
    calib = layout.calibration_array(tiles[0])
    assert calib.shape == (1, 3, 32, 32) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib[0].transpose(1, 2, 0), tiles[0])
    assert layout.rknn_normalizes and set(LAYOUTS) >= {"conv"}
    with pytest.raises(ValueError, match="unknown vision input layout"):
        get_layout("nope")


def test_baked_and_folded_normalization_agree_with_the_board(tiny):
    """The other two forms of board.tiles.normalization, on a non-default mean/std: the mean/std values
    the conv layout's RKNN build bakes in ((v - mean) / std on the 0..255 input), and the patch
    layout's weights folded from it (raw patch rows @ W + B == the Conv on normalized pixels)."""
    from dataclasses import replace

    from host.vision_modules import ConvPatchEmbedding, FoldedPatchEmbedding
    from host.vision_rknn import rknn_norm_values

    _, _, tower, settings = tiny
    settings = replace(settings, image_mean=(0.48, 0.45, 0.40), image_std=(0.26, 0.26, 0.27))
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    mean, std = (np.asarray(v[0]).reshape(1, 3, 1, 1) for v in rknn_norm_values(settings))
    baked = (values.transpose(0, 3, 1, 2).astype(np.float64) - mean) / std
    np.testing.assert_allclose(baked, normalize_tiles(values, settings), atol=1e-6, rtol=0)

    geometry = tower.geometry
    layout = get_layout("patches", geometry.patch)
    embeddings = tower.vision_model.embeddings
    tiles = _random_tiles(2, geometry.tile, seed=5)
    with torch.no_grad():
        folded = FoldedPatchEmbedding(embeddings, settings, layout.row_length)(
            torch.from_numpy(layout.onnx_input(tiles, settings)))
        conv = ConvPatchEmbedding(embeddings)(torch.from_numpy(normalize_tiles(tiles, settings)))
    assert float(conv.abs().max()) > 0.1
    np.testing.assert_allclose(folded.numpy(), conv.numpy(), atol=1e-4, rtol=0)


def test_export_refuses_opsets_the_toolkit_rejects(tiny, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny[2], tmp_path / "x.onnx", opset=20)


def test_agreement_metrics():
    a = np.ones((2, 4, 3), np.float32)
    b = a.copy()
    b[1, 0] = [1, -1, 1]
    report = agreement(b, a)
    assert report["cosine_min"] < report["cosine_mean"] < 1.0
    assert report["token_cosine_min"] == pytest.approx(1 / 3)
    assert report["max_abs_err"] == 2.0 and report["tiles"] == 2


# -- calibration tiles ------------------------------------------------------------------------


def test_manifest_lists_every_shipped_image_with_provenance():
    manifest = json.loads(vision_tiles.MANIFEST.read_text())
    files = {entry["file"] for entry in manifest["images"]}
    assert files == {p.name for p in vision_tiles.IMAGE_DIR.iterdir()}
    for entry in manifest["images"]:
        assert entry["role"] in ("calibration", "holdout")
        assert entry["license"] and entry["source"] and entry["made"]
    calibration, holdout = vision_tiles.default_images("calibration"), vision_tiles.default_images("holdout")
    assert not set(calibration) & set(holdout)
    kinds = {e["kind"] for e in manifest["images"] if e["role"] == "holdout"}
    assert kinds == {"photo", "rendered"}  # the accuracy check sees photos and documents
    assert sum(p.stat().st_size for p in vision_tiles.IMAGE_DIR.iterdir()) < 5e6


def test_pick_order_starts_with_global_view_and_covers_all():
    assert vision_tiles.pick_order(1) == [0]
    for n in (2, 5, 13, 17):
        order = vision_tiles.pick_order(n)
        assert order[0] == n - 1 and sorted(order) == list(range(n))


def test_cut_tiles_are_the_board_splitters_tiles():
    settings = SplitSettings(longest_edge=1024, tile=512)
    images = vision_tiles.default_images("holdout")[:2]
    tiles = vision_tiles.cut_tiles(images, settings, per_image=2)
    boards = [split_image(load_image(p), settings).tiles for p in images]
    # interleaved: each image's global view first, then each image's next pick
    np.testing.assert_array_equal(tiles[0], boards[0][-1])
    np.testing.assert_array_equal(tiles[1], boards[1][-1])
    order0 = vision_tiles.pick_order(len(boards[0]))
    np.testing.assert_array_equal(tiles[2], boards[0][order0[1]])
    assert len(vision_tiles.cut_tiles(images, settings, per_image=2, limit=3)) == 3


def test_write_dataset_holds_raw_nchw_values(tmp_path):
    tiles = _random_tiles(3, 16)
    dataset = vision_tiles.write_dataset(tiles, get_layout("conv").calibration_array, tmp_path / "calib")
    lines = dataset.read_text().split()
    assert len(lines) == 3
    first = np.load(lines[0])
    assert first.shape == (1, 3, 16, 16) and first.dtype == np.float32
    assert first.max() > 200  # raw 0..255, not normalized (normalized data gave cosine 0.70)
    np.testing.assert_array_equal(first[0].transpose(1, 2, 0), tiles[0])
