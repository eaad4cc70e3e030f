"""host.convert's rkllm-toolkit step as a subprocess in the toolkit's own venv (host/decoder_rkllm.py +
host/rkllm_runner.py), against the stand-in toolkit in tests/standin_rkllm: files in, log kept, heartbeat,
the evidence that the toolkit read the calibration set, plain errors. The stand-in is no toolkit and says
so; Rockchip's own runs in tests/test_decoder_rkllm_toolkit.py when its venv exists (skipped otherwise)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from board.errors import RuntimeUnavailable
from calibration import decoder_dataset as D
from host import decoder_rkllm as R
from support import STANDIN_RKLLM

STANDIN_TEXT = b"RKLLM STAND-IN OUTPUT"


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """This test's Python runs the stand-in as 'the toolkit venv'; every call it gets is recorded."""
    monkeypatch.setenv("PYTHONPATH", str(STANDIN_RKLLM))
    monkeypatch.setenv("STANDIN_RKLLM_CALLS", str(tmp_path / "calls.jsonl"))
    for name in ("STANDIN_RKLLM_EXPORT", "STANDIN_RKLLM_SKIP_DATASET", "STANDIN_RKLLM_BUILD_RC"):
        monkeypatch.delenv(name, raising=False)
    R._probe.cache_clear()
    calls = tmp_path / "calls.jsonl"
    yield lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    R._probe.cache_clear()


def _decoder_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "decoder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # what the stand-in checks; only get_logits would load weights
    return folder


def _samples(n: int = 3, hidden: int = 8) -> list:
    rng = np.random.default_rng(0)
    return [D.Sample(name=f"s{i}", images=[], tiles=0, input_ids=np.arange(5 + i), image_positions=np.zeros(0, np.int64),
                     embeds=rng.standard_normal((5 + i, hidden)).astype(np.float32), text="x") for i in range(n)]


def _build(tmp_path: Path, layout: str, **kwargs):
    calib = tmp_path / "host"
    calib.mkdir(exist_ok=True)
    samples = _samples()
    if layout == "samples":
        D.write_sample_layout(samples, calib / D.SAMPLE_LAYOUT)
    else:
        D.write_rkllm_dataset(samples, calib / D.DATASET)
    kwargs.setdefault("progress", lambda line: None)
    return R.build_decoder_rkllm(_decoder_folder(tmp_path), calib / D.dataset_file(layout), calib / "decoder.rkllm",
                                 layout=layout, options=R.RKLLMOptions(max_context=256), hidden_size=8,
                                 python=sys.executable, **kwargs), calib


def test_the_step_runs_in_the_toolkit_interpreter_on_the_files_it_wrote(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_RKLLM_EXPORT", "1")  # this test asks for the stand-in's labelled file
    lines: list[str] = []
    report, calib = _build(tmp_path, "samples", progress=lines.append, heartbeat_s=0.5)
    assert report["standin"] is True and report["toolkit"] == "0+standin"
    assert report["calibration"] == {"layout": "samples", "samples": 3,
                                     "read_by_toolkit": {"index": True, "sample_files": 3, "log_examples": 3}}
    assert (calib / "decoder.rkllm").read_bytes().startswith(STANDIN_TEXT)
    log = (calib / "decoder.log").read_text()
    assert "STAND-IN" in log and "Generating train split: 3 examples" in log and "===== build" in log
    assert json.loads((calib / "decoder.accuracy.json").read_text())["calibration"] == report["calibration"]
    assert any("is the tests' STAND-IN" in line for line in lines)
    assert any("still running" in line for line in lines)  # the heartbeat, with the runner's phase
    calls = {c["call"]: c for c in standin()}
    assert calls["build"]["dataset"] == str(calib / D.dataset_file("samples"))
    assert (calls["build"]["optimization_level"], calls["build"]["quantized_dtype"], calls["build"]["max_context"]) == (
        0, "w8a8", 256)
    assert calls["load_huggingface"]["model"] == str(tmp_path / "decoder")


def test_the_input_embed_layout(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_RKLLM_EXPORT", "1")
    report, _ = _build(tmp_path, "input_embed")
    assert report["calibration"]["read_by_toolkit"] == {"file": True, "sample_files": None, "log_examples": 3}


def test_a_toolkit_that_calibrates_on_nothing_fails_plainly(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_RKLLM_EXPORT", "1")
    monkeypatch.setenv("STANDIN_RKLLM_SKIP_DATASET", "1")
    with pytest.raises(R.DecoderBuildError, match="did not calibrate on the calibration set: it opened none") as err:
        _build(tmp_path, "samples")
    assert "decoder.log" not in err.value.message and "log" in err.value.hint


@pytest.mark.parametrize("log, read, message", [
    ("Generating train split: 5 examples", {"index": True, "sample_files": 3}, "loaded 5 examples, but the set has 3"),
    ("", {"index": True, "sample_files": 1}, "opened 1 of the 3 sample files"),
    ("", {"index": False, "sample_files": 0}, "opened none"),
])
def test_the_calibration_evidence(log, read, message):
    report = {"calibration": {"layout": "samples", "samples": 3, "read_by_toolkit": read}}
    with pytest.raises(R.DecoderBuildError, match=message):
        R.check_calibration_read(report, log)
    ok = R.check_calibration_read({"calibration": {"layout": "samples", "samples": 3, "read_by_toolkit": {
        "index": False, "sample_files": 0}}}, "x\nGenerating train split: 3 examples\n")
    assert ok["read_by_toolkit"]["log_examples"] == 3  # the toolkit's own count is enough


def test_the_stand_in_writes_no_model_unless_a_test_asks(standin, tmp_path):
    with pytest.raises(R.DecoderBuildError, match=r"export_rkllm\(.*\) failed \(returned -1\)") as err:
        _build(tmp_path, "input_embed")
    assert not (tmp_path / "host" / "decoder.rkllm").exists()
    assert str(tmp_path / "host" / "decoder.log") in err.value.hint
    assert "export refused" in (tmp_path / "host" / "decoder.log").read_text()


def test_a_failed_build_names_the_step_and_keeps_the_log(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_RKLLM_BUILD_RC", "-3")
    with pytest.raises(R.DecoderBuildError, match=r"rkllm-toolkit build failed \(returned -3\)"):
        _build(tmp_path, "input_embed")
    assert "STAND-IN" in (tmp_path / "host" / "decoder.log").read_text()


def test_a_sample_the_toolkit_venv_cannot_read_is_refused_before_build(standin, tmp_path):
    calib = tmp_path / "host"
    calib.mkdir()
    D.write_sample_layout(_samples(), calib / D.SAMPLE_LAYOUT)
    (calib / D.SAMPLE_LAYOUT / "sample_1").write_bytes(b"not a pickle")
    with pytest.raises(R.DecoderBuildError, match=r"cannot be used by this venv: .*sample_1: cannot be unpickled here"):
        R.build_decoder_rkllm(_decoder_folder(tmp_path), calib / D.dataset_file("samples"), calib / "decoder.rkllm",
                              python=sys.executable)
    assert not any(c["call"] == "build" for c in standin())


def test_no_venv_or_no_wheel_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv(R.PYTHON_ENV, raising=False)
    R._probe.cache_clear()
    with pytest.raises(RuntimeUnavailable, match="has no venv here") as err:
        R.require_rkllm_toolkit(tmp_path / "venv" / "bin" / "python")
    assert "scripts/setup_rkllm_toolkit.sh" in err.value.hint and "--skip-decoder" in err.value.hint
    with pytest.raises(RuntimeUnavailable, match=r"is not installed in .*No module named 'rkllm'"):
        R.require_rkllm_toolkit(sys.executable)  # a venv without the wheel
    monkeypatch.setenv(R.PYTHON_ENV, str(tmp_path / "elsewhere"))
    assert R.toolkit_python() == tmp_path / "elsewhere" and R.toolkit_version() is None
    R._probe.cache_clear()


def test_the_setup_script_checks_its_arguments_and_dry_runs(tmp_path):
    import subprocess

    script = ["bash", str(R.ROOT / "scripts" / "setup_rkllm_toolkit.sh")]
    assert subprocess.run(script, capture_output=True).returncode == 2
    bad = tmp_path / "rkllm_toolkit-1.2.0-cp311-cp311-linux_x86_64.whl"
    bad.write_bytes(b"")
    done = subprocess.run([*script, str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "not an rkllm-toolkit 1.3.0 wheel" in done.stderr
    minor = sys.version_info[1]
    wheel = tmp_path / f"rkllm_toolkit-1.3.0-cp3{minor}-cp3{minor}-linux_x86_64.whl"
    wheel.write_bytes(b"")
    done = subprocess.run([*script, str(wheel), "--python", sys.executable, "--venv", str(tmp_path / "v"),
                           "--dry-run"], capture_output=True, text=True)
    if sys.version_info[:2] > (3, 12) or sys.version_info[:2] < (3, 9):
        assert done.returncode == 2
        return
    assert done.returncode == 0, done.stderr
    assert "torch==2.6.0 torchvision==0.21.0 --index-url https://download.pytorch.org/whl/cpu" in done.stdout
    assert f"install {wheel}" in done.stdout and "host.rkllm_runner --probe" in done.stdout
    assert not (tmp_path / "v").exists()  # a dry run changes nothing
    other = 12 if minor != 12 else 11
    done = subprocess.run([*script, str(wheel).replace(f"cp3{minor}", f"cp3{other}"), "--python", sys.executable],
                          capture_output=True, text=True)
    assert done.returncode == 2  # no such wheel, or not this Python's


# -- host.convert through the stand-in ---------------------------------------------------------------


def test_convert_builds_the_decoder_step_through_the_stand_in(standin, bundle, tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from support import skip_without_rknn_toolkit

    skip_without_rknn_toolkit()
    from board import bundle_schema as S
    from board.bundle import Bundle
    from board.pipeline import open_vision_encoder
    from host import convert

    monkeypatch.setenv("STANDIN_RKLLM_EXPORT", "1")
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)  # its finished stages are skipped; calibration, rkllm and the fallback run
    code = convert.main(["--model", str(tiny_checkpoint("256m")), "--out", str(out), "--rkllm-python", sys.executable,
                         "--decoder-calibration-tiles", "4", "--decoder-target-tokens", "2", "--vision-fallback",
                         "--quiet"])
    assert code == 0
    state = json.loads((out / convert.STATE).read_text())
    assert {"calibration", "rkllm", "vision-fallback"} <= set(state)
    b = Bundle.open(out, need_decoder=True)
    decoder = b.manifest[S.Manifest.DECODER]
    assert b.has_decoder and (out / S.DECODER_RKLLM).read_bytes().startswith(STANDIN_TEXT)
    assert decoder[S.Decoder.TOOLKIT] == "0+standin" and decoder[S.Decoder.OPTIMIZATION_LEVEL] == 0
    calibration = decoder[S.Decoder.CALIBRATION]
    assert calibration["layout"] == "samples" and calibration["read_by_toolkit"]["sample_files"] == calibration["samples"]
    assert "STAND-IN" in (out / "host" / "decoder.log").read_text()
    assert decoder[S.Decoder.ACCURACY]["measured"] >= 1  # the held-out samples went through get_logits
    assert (out / "host" / D.dataset_file("samples")).is_file() and not (out / "host" / D.DATASET).exists()
    # the opt-in fallback: fp16, conv layout, and it computes what the main model computes
    fallback = b.vision_model(fallback=True)
    assert (fallback.file, fallback.layout, fallback.dtype) == (S.VISION_FALLBACK_RKNN, "conv", "fp16")
    tile, rows = b.reference_arrays()
    with open_vision_encoder(b, emulate=True, fallback=True) as encoder:
        got = encoder.encode(tile[None])[0]
    assert np.dot(got.ravel(), rows.ravel()) / (np.linalg.norm(got) * np.linalg.norm(rows)) > 0.9999
