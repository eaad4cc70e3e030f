"""The vision stage: ONNX Runtime emulation against the PyTorch reference, and the NPU runner's scheduling.

The NPU runner is exercised here against a stand-in `rknnlite.api` module (a test double, like the C
double of librkllmrt): it checks what the runner asks of rknnlite (core masks, inputs, release on
every path) and that tiles run on the cores at the same time. It proves nothing about the NPU; the
real runtime is exercised by tests/test_board_rk3588.py on a board.
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest

from board.errors import RuntimeUnavailable, VisionError
from board.tiles import SplitSettings, normalize_tiles
from board.vision import FEEDS, NPU_CORE_MODES, RKNNVisionEncoder, image_key, tile_feed

T, N, H = 32, 4, 8  # tile, tokens per tile, hidden: a small geometry for the scheduling tests


class FakeRKNNLite:
    """Records every call; `inference` returns rows derived from the tile so order can be checked."""

    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1, NPU_CORE_0_1_2 = 0, 1, 2, 4, 3, 7
    instances: list["FakeRKNNLite"] = []
    fail_init_on: int | None = None  # index of the instance whose init_runtime fails
    barrier: threading.Barrier | None = None

    def __init__(self, verbose=False):
        self.calls: list[tuple] = []
        self.released = False
        self.index = len(FakeRKNNLite.instances)
        FakeRKNNLite.instances.append(self)

    def load_rknn(self, path):
        self.calls.append(("load_rknn", path))
        return 0

    def init_runtime(self, core_mask=0):
        self.calls.append(("init_runtime", core_mask))
        return -1 if self.index == FakeRKNNLite.fail_init_on else 0

    def inference(self, inputs, data_format=None):
        (x,) = inputs
        self.calls.append(("inference", x.shape, x.dtype, tuple(data_format or ())))
        if FakeRKNNLite.barrier is not None:
            FakeRKNNLite.barrier.wait(timeout=10)  # passes only when every core's runtime is busy at once
        return [np.full((1, N, H), float(x[0, 0, 0, 0]), np.float32)]

    def release(self):
        self.released = True


@pytest.fixture
def fake_rknnlite(monkeypatch):
    FakeRKNNLite.instances, FakeRKNNLite.fail_init_on, FakeRKNNLite.barrier = [], None, None
    package, api = types.ModuleType("rknnlite"), types.ModuleType("rknnlite.api")
    api.RKNNLite = FakeRKNNLite
    package.api = api
    monkeypatch.setitem(sys.modules, "rknnlite", package)
    monkeypatch.setitem(sys.modules, "rknnlite.api", api)
    return FakeRKNNLite


def _tiles(n):
    tiles = np.zeros((n, T, T, 3), np.uint8)
    tiles[:, 0, 0, 0] = np.arange(n)
    return tiles


@pytest.mark.parametrize("mode,masks", [("parallel", [1, 2, 4]), ("single", [1]), ("all", [7])])
def test_core_modes_open_one_runtime_per_core(fake_rknnlite, mode, masks):
    encoder = RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H, cores=mode)
    assert [r.calls[1] for r in fake_rknnlite.instances] == [("init_runtime", m) for m in masks]
    rows = encoder.encode(_tiles(7))
    assert rows.shape == (7, N, H) and rows.dtype == np.float32
    assert rows[:, 0, 0].tolist() == list(range(7))  # in tile order, whichever core ran each
    inference = [c for r in fake_rknnlite.instances for c in r.calls if c[0] == "inference"]
    assert len(inference) == 7 and all(c[1:] == ((1, T, T, 3), np.uint8, ("nhwc",)) for c in inference)
    encoder.close()
    encoder.close()
    assert all(r.released for r in fake_rknnlite.instances)
    with pytest.raises(VisionError, match="closed"):
        encoder.encode(_tiles(1))


def test_parallel_mode_runs_the_three_cores_at_once(fake_rknnlite):
    fake_rknnlite.barrier = threading.Barrier(3)
    with RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H, cores="parallel") as encoder:
        rows = encoder.encode(_tiles(6))
    assert rows[:, 0, 0].tolist() == list(range(6))
    assert [sum(c[0] == "inference" for c in r.calls) for r in fake_rknnlite.instances] == [2, 2, 2]


def test_runtimes_released_when_a_later_core_fails(fake_rknnlite):
    fake_rknnlite.fail_init_on = 1
    with pytest.raises(VisionError, match="runtime 2/3") as err:
        RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H, cores="parallel")
    assert "--npu-cores single" in err.value.hint
    assert len(fake_rknnlite.instances) == 2 and all(r.released for r in fake_rknnlite.instances)


def test_wrong_output_size_and_failed_inference(fake_rknnlite, monkeypatch):
    with RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N + 1, hidden_size=H, cores="single") as encoder:
        with pytest.raises(VisionError, match="expected"):
            encoder.encode(_tiles(1))
    monkeypatch.setattr(FakeRKNNLite, "inference", lambda self, inputs, data_format=None: None)
    with RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H, cores="single") as encoder:
        with pytest.raises(VisionError, match="inference failed"):
            encoder.encode(_tiles(1))
        with pytest.raises(VisionError, match="uint8"):
            encoder.encode(np.zeros((1, T, T, 3), np.float32))
        assert encoder.encode(_tiles(0)).shape == (0, N, H)


def test_missing_rknnlite_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rknnlite", None)
    monkeypatch.setitem(sys.modules, "rknnlite.api", None)
    with pytest.raises(RuntimeUnavailable, match="rknnlite") as err:
        RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H)
    assert "rknn-toolkit-lite2" in err.value.hint


def test_unknown_layout_and_mode(fake_rknnlite):
    with pytest.raises(VisionError, match="'patches' input layout"):
        tile_feed("patches")
    with pytest.raises(VisionError, match="unknown NPU core mode"):
        RKNNVisionEncoder("vision.rknn", tile=T, tokens_per_tile=N, hidden_size=H, cores="turbo")
    assert set(NPU_CORE_MODES) == {"parallel", "single", "all"}


def test_onnx_feed_is_the_normalization_rknn_bakes_in():
    settings = SplitSettings(longest_edge=64, tile=T, image_mean=(0.48, 0.45, 0.40), image_std=(0.26, 0.26, 0.27))
    tiles = np.random.default_rng(0).integers(0, 256, (3, T, T, 3), dtype=np.uint8)
    fed = FEEDS["conv"].onnx_input(tiles, settings)
    assert fed.shape == (3, 3, T, T) and fed.dtype == np.float32
    np.testing.assert_allclose(fed, normalize_tiles(tiles, settings), atol=2e-6)


def test_image_key():
    settings = SplitSettings(longest_edge=64, tile=T)
    key = image_key(b"abc", settings)
    assert key == image_key(b"abc", settings) != image_key(b"abd", settings)
    assert key != image_key(b"abc", settings.with_tiles_per_side(0)) and key != image_key(b"abc", settings, "x")
    pixels = np.zeros((4, 4, 3), np.uint8)
    assert image_key(pixels, settings) != image_key(pixels.reshape(4, 12, 1), settings)


def test_onnx_encoder_matches_the_pytorch_reference(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from board.bundle import VISION_ONNX, Bundle
    from board.vision import OnnxVisionEncoder
    from host.checkpoint import load_checkpoint
    from host.vision_export import load_vision_tower, reference_features
    from support import tiny_bundle_for

    bundle = Bundle.open(tiny_bundle_for(tmp_path_factory, tiny_checkpoint, "256m"))
    settings = bundle.split_settings
    tiles = np.random.default_rng(1).integers(0, 256, (2, settings.tile, settings.tile, 3), dtype=np.uint8)
    with OnnxVisionEncoder(bundle.verify_host_files(VISION_ONNX), settings=settings,
                           tokens_per_tile=bundle.prompt_format.image_seq_len, hidden_size=bundle.hidden_size,
                           layout=bundle.vision_layout) as enc:
        ours = enc.encode(tiles)
    expected = reference_features(load_vision_tower(load_checkpoint(tiny_checkpoint("256m"))), tiles, settings)
    assert ours.shape == expected.shape == (2, 64, bundle.hidden_size)
    assert np.abs(ours - expected).max() < 1e-4
