"""Vision RKNN builds end to end with the real rknn-toolkit2: tiny random-weight towers of both
geometries, fp16 and int8, in the default (patches) layout and the Conv baseline, checked in the
toolkit's simulator against PyTorch on held-out tiles, with the compiler's op table parsed."""

from __future__ import annotations

import json
import platform
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from support import skip_without_rknn_toolkit  # noqa: E402

skip_without_rknn_toolkit()

from board.errors import InputError, RuntimeUnavailable  # noqa: E402
from board.tiles import SplitSettings  # noqa: E402
from calibration.vision_tiles import default_images  # noqa: E402
from host import vision_rknn  # noqa: E402
from host.checkpoint import load_checkpoint  # noqa: E402
from host.tiny_model import build_tiny_checkpoint  # noqa: E402
from host.vision_export import DEFAULT_LAYOUT, load_vision_tower  # noqa: E402
from host.vision_rknn import (  # noqa: E402
    BuildOptions,
    Progress,
    QuantOptions,
    VisionAccuracyError,
    convert_vision,
    parse_op_table,
    require_rknn_toolkit,
    summarize_ops,
)

# the toolkit's own use of deprecated onnx/numpy APIs floods the run with tens of thousands of warnings
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TILES = {"256m": 512, "2.2b": 384}
# A few calibration images keep the tiny builds fast; the hold-out set is the shipped one (disjoint).
N_CALIBRATION_IMAGES = 8
HOLDOUT_TILES = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{f}"), f) for f in TILES}


def _convert(checkpoint_dir, out_dir, options, layout=DEFAULT_LAYOUT):
    checkpoint = load_checkpoint(checkpoint_dir)
    return convert_vision(
        load_vision_tower(checkpoint, layout), SplitSettings.from_preprocessor(checkpoint.preprocessor), out_dir, options,
        calibration_images=default_images("calibration")[:N_CALIBRATION_IMAGES], calibration_per_image=1,
        holdout_tiles=HOLDOUT_TILES, progress=Progress(enabled=False),
    )


@pytest.fixture(scope="module")
def builds(checkpoints, tmp_path_factory):
    """Every (family, dtype) build in the default layout, once per module, and the 256m Conv fp16
    baseline under (256m, 'baseline'): {(family, dtype): (out_dir, report)}."""
    done = {}
    for family in TILES:
        for dtype in ("fp16", "int8"):
            out = tmp_path_factory.mktemp(f"{family}-{dtype}")
            done[family, dtype] = out, _convert(checkpoints[family], out, BuildOptions(dtype=dtype))
    out = tmp_path_factory.mktemp("256m-baseline")
    done["256m", "baseline"] = out, _convert(checkpoints["256m"], out, BuildOptions(dtype="fp16"), layout="conv")
    return done


@pytest.mark.parametrize("family", sorted(TILES))
@pytest.mark.parametrize("dtype,threshold", [("fp16", 0.999), ("int8", 0.99)])
def test_simulator_matches_pytorch_on_heldout_tiles(builds, family, dtype, threshold):
    out, report = builds[family, dtype]
    accuracy = report["accuracy"]
    assert accuracy["tiles"] == HOLDOUT_TILES
    assert accuracy["cosine_min"] >= threshold, accuracy
    assert accuracy["passed"] and accuracy["threshold"] == threshold
    assert report["geometry"]["tile"] == TILES[family]
    written = json.loads((out / "vision.accuracy.json").read_text())
    assert written["accuracy"] == pytest.approx(accuracy)
    assert (out / "vision.rknn").stat().st_size > 0 and (out / "vision.log").stat().st_size > 0


@pytest.mark.parametrize("family", sorted(TILES))
def test_int8_keeps_float_outputs(builds, family):
    out, report = builds[family, "int8"]
    assert report["float_outputs"] and report["float16_tensors"]
    outputs = [op for op in parse_op_table((out / "vision.log").read_text()) if op["op"] == "OutputOperator"]
    inputs = [op for op in parse_op_table((out / "vision.log").read_text()) if op["op"] == "InputOperator"]
    assert [op["dtype"] for op in outputs] == ["FLOAT16"]
    assert [op["dtype"] for op in inputs] == ["INT8"]


def test_int8_outputs_on_request(checkpoints, tmp_path):
    """--int8-outputs takes the toolkit's plain build; the output is int8 and still accurate."""
    options = BuildOptions(dtype="int8", quant=QuantOptions(float_outputs=False))
    report = _convert(checkpoints["256m"], tmp_path, options)
    assert report["float_outputs"] is False and report["accuracy"]["cosine_min"] >= 0.99
    outputs = [op for op in parse_op_table((tmp_path / "vision.log").read_text()) if op["op"] == "OutputOperator"]
    assert [op["dtype"] for op in outputs] == ["INT8"]


def test_op_table_parsed_from_a_real_build(builds):
    out, report = builds["256m", "baseline"]
    ops = parse_op_table((out / "vision.log").read_text())
    assert ops[0]["op"] == "InputOperator" and ops[-1]["op"] == "OutputOperator"
    assert [op["id"] for op in ops] == list(range(len(ops)))
    assert all(op["target"] == "NPU" for op in ops[1:-1])
    summary = json.loads((out / "vision.ops.json").read_text())
    assert summary["est_cycles_per_tile"] == sum(op["cycles_total"] for op in ops) > 0
    assert summary["cpu_ops"] == [] and len(summary["top_ops"]) == 5
    # the stride-16 patch-embedding Conv dominates this export (3 input channels waste the NPU lanes)
    assert "patch_embedding" in summary["top_ops"][0]["name"]
    assert summary == {**report["ops"], "ops": summary["ops"]}
    assert summary["zero_cycle_ops"]["exSDPAttention"] == 2  # fused attention: counted as 0 (2 tiny layers)


@pytest.mark.parametrize("family", sorted(TILES))
def test_patch_layout_builds_take_patch_rows_and_cost_less(builds, family):
    """The default layout: a 3-D [1, P, p*p*3] input, no Conv over the 3-channel tile, no CPU op."""
    rows = {"256m": "(1,1024,768)", "2.2b": "(1,729,592)"}[family]
    for dtype in ("fp16", "int8"):
        out, report = builds[family, dtype]
        assert report["layout"] == {"256m": "patches16", "2.2b": "patches14"}[family]
        ops = parse_op_table((out / "vision.log").read_text())
        assert ops[0]["op"] == "InputOperator" and ops[0]["output_shape"] == rows
        assert not [op for op in ops if op["input_shapes"].startswith(("(1,3,512,512)", "(1,3,384,384)"))]
        assert report["ops"]["cpu_ops"] == []
    base = builds["256m", "baseline"][1]["ops"]["est_cycles_per_tile"]
    if family == "256m":
        assert builds["256m", "fp16"][1]["ops"]["est_cycles_per_tile"] < base / 2


def test_op_table_parser_on_text():
    log = "\n".join([
        "D RKNN: [10:00:00.000] ---------------",
        "D RKNN: [10:00:00.000]            Network Layer Information Table",
        "D RKNN: [10:00:00.000] ---------------",
        "D RKNN: [10:00:00.000] ID   OpType   DataType Target InputShape OutputShape Cycles(DDR/NPU/Total) RW(KB) FullName",
        "D RKNN: [10:00:00.000] ---------------",
        "D RKNN: [10:00:00.000] 0    InputOperator  INT8  CPU  \\  (1,3,8,8)  0/0/0  0  InputOperator:x",
        "D RKNN: [10:00:00.000] 1    Conv  INT8  NPU  (1,3,8,8),(4,3,1,1)  (1,4,8,8)  10/20/20  1  Conv:a",
        "D RKNN: [10:00:00.000] 2    Gather  INT8  CPU  (1,4,8,8)  (1,4,8,8)  5/0/5  2  Gather:b",
        "D RKNN: [10:00:00.000] 3    OutputOperator  FLOAT16  CPU  (1,4,8,8)  \\  0/0/0  1  OutputOperator:y",
        "D RKNN: [10:00:00.000] ---------------",
        "D RKNN: [10:00:00.000] 1   Conv   weight   FLOAT16   (4,3,1,1) | 0x0 0x10 0x10",
    ])
    ops = parse_op_table(log)
    assert [op["op"] for op in ops] == ["InputOperator", "Conv", "Gather", "OutputOperator"]
    summary = summarize_ops(ops)
    assert summary["est_cycles_per_tile"] == 25 and summary["n_ops"] == 2
    assert summary["cpu_ops"] == [{"id": 2, "op": "Gather", "name": "Gather:b"}]
    assert summary["top_ops"][0]["name"] == "Conv:a"
    assert parse_op_table("no table here") == []


def test_accuracy_below_threshold_fails_loudly(checkpoints, tmp_path, capsys):
    """An impossible threshold: the CLI exits non-zero with a plain message; the JSON is still written."""
    code = vision_rknn.main([
        "--model", str(checkpoints["2.2b"]), "--out", str(tmp_path), "--dtype", "fp16", "--min-cosine", "1.000001",
        "--holdout-tiles", "1",
    ])
    assert code == 1
    err = capsys.readouterr().err
    assert "below the threshold 1.000001" in err and "hint:" in err
    written = json.loads((tmp_path / "vision.accuracy.json").read_text())
    assert written["accuracy"]["passed"] is False


def test_threshold_error_type(checkpoints, tmp_path):
    with pytest.raises(VisionAccuracyError):
        _convert(checkpoints["256m"], tmp_path, BuildOptions(dtype="fp16", min_cosine=1.000001))


def test_accuracy_analysis_behind_a_flag(checkpoints, tmp_path):
    """rknn-toolkit2's per-layer analysis on a tiny int8 build: its table kept, its dumps removed."""
    report = _convert(checkpoints["256m"], tmp_path, BuildOptions(dtype="int8", accuracy_analysis=True))
    table = tmp_path / report["accuracy_analysis"]
    assert table.exists() and "cos" in table.read_text().lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["vision.onnx", "vision.rknn", "vision.log", "vision.accuracy.json", "vision.ops.json", table.name]
    )


def test_unknown_fp16_tensor_is_an_input_error(tmp_path):
    cfg = tmp_path / "m.quantization.cfg"
    cfg.write_text("custom_quantize_layers: {}\nquantize_parameters:\n    a:\n        dtype: int8\n    b:\n        dtype: int8\n")
    assert vision_rknn._edit_quant_cfg(cfg, ["a"]) == ["a"]
    assert "a: float16" in cfg.read_text().replace('"', "")
    with pytest.raises(InputError, match="nope"):
        vision_rknn._edit_quant_cfg(cfg, ["nope"])


def test_bad_options_are_input_errors():
    with pytest.raises(InputError):
        BuildOptions(dtype="int4").validate()
    with pytest.raises(InputError):
        BuildOptions(dtype="int8", quant=QuantOptions(algorithm="fast")).validate()
    with pytest.raises(InputError):
        BuildOptions(dtype="int8", quant=QuantOptions(hybrid="auto", fp16_tensors=("x",))).validate()


def test_norm_values_come_from_the_preprocessor():
    settings = SplitSettings(longest_edge=1024, tile=512, image_mean=(0.48, 0.45, 0.4), image_std=(0.26, 0.26, 0.27))
    mean, std = vision_rknn.rknn_norm_values(settings)
    np.testing.assert_allclose(mean[0], [0.48 * 255, 0.45 * 255, 0.4 * 255])
    np.testing.assert_allclose(std[0], [0.26 * 255, 0.26 * 255, 0.27 * 255])


def test_wrong_platform_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeUnavailable, match="x86_64 Linux") as err:
        require_rknn_toolkit()
    assert err.value.hint


def test_missing_toolkit_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rknn.api", None)  # makes `from rknn.api import RKNN` raise ImportError
    with pytest.raises(RuntimeUnavailable, match="rknn-toolkit2") as err:
        require_rknn_toolkit()
    assert "pip install --no-deps rknn-toolkit2" in err.value.hint
