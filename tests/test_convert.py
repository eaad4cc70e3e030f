"""`python -m host.convert` end to end on the embedded tiny model, as a user runs it: the real rknn-toolkit2
build, the bundle the board opens, resumable stages, and plain errors (rkllm-toolkit absent here)."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from support import skip_without_rknn_toolkit  # noqa: E402

skip_without_rknn_toolkit()

from board import bundle as B  # noqa: E402
from board import bundle_schema as S  # noqa: E402
from host import convert  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rkllm_importable() -> bool:
    """Whether the toolkit's venv (.venv-rkllm, or $SMOLVLM_RKLLM_PYTHON) runs rkllm-toolkit here."""
    from board.errors import RuntimeUnavailable
    from host.decoder_rkllm import require_rkllm_toolkit

    try:
        require_rkllm_toolkit()
    except RuntimeUnavailable:
        return False
    return True


def run_convert(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "host.convert", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "demo-bundle"
    t0 = time.monotonic()
    result = run_convert("--tiny", "256m", "--out", str(out), "--skip-decoder")
    return {"out": out, "result": result, "seconds": time.monotonic() - t0}


def test_tiny_end_to_end_without_rkllm_toolkit(first_run):
    out, result = first_run["out"], first_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for stage in ("text", "decoder", "vision", "manifest", "self-check"):
        assert f"{stage} done in" in result.stderr, stage
    assert re.search(r"calibration +not run \(--skip-decoder\)", result.stderr) and "random-weight" in result.stderr

    bundle = B.Bundle.open(out)
    assert bundle.is_tiny and not bundle.has_decoder and bundle.max_context == convert.DEFAULT_MAX_CONTEXT
    assert bundle.vision["dtype"] == "fp16" and bundle.vision["accuracy"]["cosine_min"] >= 0.999
    assert bundle.vision["tokens_per_tile"] == bundle.prompt_format.image_seq_len == 64
    # the geometry tokens_per_tile derives from, which Bundle checks it against: 512px / 16px patches, 4x4 merged
    assert (bundle.vision[S.Vision.PATCH], bundle.vision[S.Vision.SCALE_FACTOR]) == (16, 4)
    assert bundle.manifest[S.Manifest.TARGET] == B.runtime_target()
    assert (out / B.VISION_ONNX).is_file() and (out / B.DECODER_HF / "config.json").is_file()
    assert bundle.verify_host_files(B.DECODER_HF) and bundle.verify_host_files(B.VISION_ONNX)
    assert not (out / B.DECODER_RKLLM).exists()

    report = json.loads((out / convert.REPORT).read_text())
    assert report["decoder_equivalence_max_abs_diff"] <= convert.DECODER_MAX_ABS_DIFF
    assert report["self_check"]["image_prompt_tokens"] > 64 and report["self_check"]["pixel_max_abs_diff"] < 0.1
    for stage in ("text", "decoder", "vision", "manifest", "self-check"):
        row = report["stages"][stage]
        assert row["status"] == "ran" and row["seconds"] >= 0 and row["peak_rss_mb"] > 0
    assert report["peak_rss_mb"] > 0 and report["total_seconds"] > 0


def test_second_run_skips_finished_stages(first_run):
    out = first_run["out"]
    assert first_run["result"].returncode == 0
    before = {rel: (out / rel).stat().st_mtime_ns for rel in (B.VISION_RKNN, B.EMBEDDINGS, B.VISION_ONNX)}
    result = run_convert("--tiny", "256m", "--out", str(out), "--skip-decoder")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("text", "decoder", "vision"):
        assert f"{stage}: done earlier with the same inputs, skipped" in result.stderr
    assert "self-check done in" in result.stderr
    assert before == {rel: (out / rel).stat().st_mtime_ns for rel in before}
    report = json.loads((out / convert.REPORT).read_text())
    assert report["stages"]["vision"]["status"] == "skipped" and report["stages"]["manifest"]["status"] == "ran"
    B.Bundle.open(out)


def test_changed_options_redo_only_what_they_affect(first_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(first_run["out"], out)
    # the context length only changes the manifest
    result = run_convert("--tiny", "256m", "--out", str(out), "--skip-decoder", "--max-context", "2048")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vision: done earlier" in result.stderr
    assert B.Bundle.open(out).max_context == 2048
    # a vision option redoes the vision stage, and nothing before it
    result = run_convert("--tiny", "256m", "--out", str(out), "--skip-decoder", "--vision-min-cosine", "0.99")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vision done in" in result.stderr and "decoder: done earlier" in result.stderr
    # --force redoes everything
    result = run_convert("--tiny", "256m", "--out", str(out), "--skip-decoder", "--force", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / convert.REPORT).read_text())
    assert all(report["stages"][s]["status"] == "ran" for s in ("text", "decoder", "vision"))


@pytest.mark.skipif(_rkllm_importable(), reason="rkllm-toolkit is installed here: the decoder builds")
def test_without_skip_decoder_says_how_to_get_rkllm_toolkit(tmp_path, capsys):
    code = convert.main(["--tiny", "256m", "--out", str(tmp_path / "b"), "--rkllm-python", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 1
    assert "rkllm-toolkit 1.3.0 has no venv here" in err and "(--rkllm-python) does not exist" in err
    for words in ("airockchip/rknn-llm", "rkllm-toolkit/packages/", "scripts/setup_rkllm_toolkit.sh", "torch==2.6.0",
                  "--skip-decoder"):
        assert words in err, words
    assert not (tmp_path / "b" / B.VISION_RKNN).exists(), "fails before any long stage starts"


def test_the_cli_fails_plainly(tmp_path):
    result = run_convert("--tiny", "256m", "--out", str(tmp_path / "b"), "--skip-decoder", "--max-context", "1000")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "multiple of 32" in result.stderr and "try --max-context 992" in result.stderr


@pytest.mark.parametrize("argv,message", [
    (["--max-context", "16384"], "exceeds the model's trained context (8192 positions)"),
    (["--max-context", "lots"], "must be a whole number"),
    (["--calibration", "{tmp}"], "no images"),
])
def test_bad_options(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = convert.main(["--tiny", "256m", "--out", str(tmp_path / "b"), "--skip-decoder", *argv])
    assert code == 1 and message in capsys.readouterr().err


def test_bad_model_path(tmp_path, capsys):
    code = convert.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b"), "--skip-decoder"])
    assert code == 1 and "not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    code = convert.main(["--tiny", "256m", "--out", str(tmp_path / "file"), "--skip-decoder"])
    assert code == 1 and "is not a folder" in capsys.readouterr().err


def test_help_and_exclusive_sources(capsys):
    with pytest.raises(SystemExit) as info:
        convert.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--tiny", "--out", "--skip-decoder", "--max-context", "--vision-dtype", "--calibration",
                 "--force", "rkllm-toolkit", "--rkllm-python", "--rkllm-optimization-level", "--decoder-calibration-layout",
                 "--vision-fallback", "--embed-flash"):
        assert flag in text, flag
    with pytest.raises(SystemExit) as info:
        convert.main(["--model", "x", "--tiny", "256m", "--out", "y"])
    assert info.value.code == 2


def test_vision_flags_are_the_build_flags_with_a_prefix():
    """host.convert's --vision-* flags are host.vision_rknn's, defined once: the same defaults
    (BuildOptions') and the same options from the same choices."""
    import argparse

    from host.vision_export import DEFAULT_LAYOUT
    from host.vision_rknn import BuildOptions, add_build_arguments, options_from_args

    own = argparse.ArgumentParser()
    add_build_arguments(own)
    defaults = convert.build_parser().parse_args(["--out", "x"])
    assert convert.vision_options(defaults) == options_from_args(own.parse_args([])) == BuildOptions()
    assert defaults.vision_layout == own.parse_args([]).layout == DEFAULT_LAYOUT
    flags = ["--layout", "conv", "--dtype", "int8", "--algorithm", "kl_divergence", "--quant-method", "layer",
             "--hybrid", "proposal", "--fp16-tensor", "a", "--fp16-tensor", "b", "--int8-outputs",
             "--auto-hybrid-cos-thresh", "0.9", "--min-cosine", "0.5", "--accuracy-analysis"]
    chosen = convert.build_parser().parse_args(["--out", "x", *(f.replace("--", "--vision-") for f in flags)])
    options = options_from_args(own.parse_args(flags))
    assert convert.vision_options(chosen) == options != BuildOptions()
    assert options.quant.fp16_tensors == ("a", "b") and not options.quant.float_outputs and options.accuracy_analysis
    assert chosen.vision_layout == "conv"


def test_self_check_refuses_a_bundle_that_does_not_reproduce_the_reference(first_run, tmp_path):
    """A prompt format that renders differently from the checkpoint's template must fail loudly."""
    import argparse

    out = tmp_path / "copy"
    shutil.copytree(first_run["out"], out)
    manifest = json.loads((out / B.MANIFEST).read_text())
    manifest[S.Manifest.PROMPT][S.Prompt.GENERATION_PROMPT] += " "
    (out / B.MANIFEST).write_text(json.dumps(manifest))
    args = argparse.Namespace(tiny="256m", model=None, revision=None, calibration=None)
    job = convert.Job(args, out, convert.Log(quiet=True))
    with pytest.raises(convert.SelfCheckError, match="token ids"):
        convert.stage_self_check(job)


def test_summary_says_what_the_answers_mean(tmp_path, capsys):
    """The label a built model carries (tiny: noise; demo: untrained vision) is the manifest's note and the
    first line of convert's summary; a published checkpoint has none."""
    from host.checkpoint import load_checkpoint
    from host.tiny_model import build_tiny_checkpoint

    ck = load_checkpoint(str(build_tiny_checkpoint(tmp_path / "tiny", "256m")))
    assert ck.is_tiny and "noise" in ck.note
    from host.bundle_writer import model_section

    assert model_section(ck)[S.Model.NOTE] == ck.note
    capsys.readouterr()  # the checkpoint builder's progress
    summary = {"bundle": "out", "board_mb": 1.0, "note": ck.note, "stages": {}, "total_seconds": 0.0,
               "peak_rss_mb": 1.0, "vision_accuracy": {"cosine_min": 1.0}, "decoder": "skipped"}
    convert.print_summary(summary)
    assert ck.note in capsys.readouterr().err.splitlines()[1]
    convert.print_summary({**summary, "note": None})
    assert capsys.readouterr().err.splitlines()[1] == "bundle: out  (1.0 MB for the board)"
