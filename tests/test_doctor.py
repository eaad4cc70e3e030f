"""`python -m board doctor`: passes in emulation on a freshly converted tiny bundle, fails vision_reference when
the vision model is another checkpoint's and decoder_reference when the decoder is, and its decoder checks
catch each runtime misbehaviour of the librkllmrt C double (tests/c/fake_rkllmrt.c)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
from support import ROOT, compile_fake_rkllmrt, skip_without_rknn_toolkit  # noqa: E402

skip_without_rknn_toolkit()

from board import bundle_schema as S  # noqa: E402
from board import doctor as D  # noqa: E402
from board import rkllm_h  # noqa: E402
from board.bundle import Bundle, file_entries  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def cli(bundle):
    """The command as a user runs it, once: `python -m board doctor --bundle DIR --emulate --json`."""
    done = subprocess.run([sys.executable, "-m", "board", "doctor", "--bundle", str(bundle), "--emulate", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done


def _by_name(result):
    return {c["name"]: c for c in result["checks"]}


def test_passes_in_emulation_on_a_freshly_converted_bundle(cli):
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr
    result = json.loads(cli.stdout)
    assert set(result) >= {"ok", "checks", "versions", "clocks"} and result["ok"] is True
    assert [c["name"] for c in result["checks"]] == list(D.CHECKS)
    for check in result["checks"]:
        assert set(check) >= {"name", "ok", "detail"} and check["ok"] in (True, None), check
        assert check["detail"]
    checks = _by_name(result)
    assert checks["system"]["ok"] is None and "emulation" in checks["system"]["detail"]
    assert checks["vision_reference"]["cosine"] >= checks["vision_reference"]["threshold"] == 0.999
    assert checks["vision_cores"]["ok"] is None  # no NPU cores on x86: skipped, with the reason
    prompts = checks["decoder_reference"]["prompts"]
    assert set(prompts) == {"text", "image"} and all(p["agreement"] == 1.0 for p in prompts.values())
    assert checks["prefill_count"]["fed"] == checks["prefill_count"]["prefilled"] > 64  # the image prompt, 64 rows a tile
    assert checks["history"]["ok"] and checks["history"]["kept"] == checks["history"]["fresh"]
    assert checks["history"]["cache"] == checks["history"]["expected_cache"]
    assert checks["eos"]["ok"] is None and "ends none" in checks["eos"]["detail"]  # random weights never end
    assert checks["abort"]["finish_reason"] == "abort" and checks["abort"]["abort_to_end_s"] < D.ABORT_WITHIN_S
    assert checks["abort"]["next_run_same_ids"] is True
    assert result["versions"]["torch"] and result["versions"]["bundle_toolkits"]["rknn-toolkit2"]
    assert isinstance(result["clocks"], dict)


def test_readable_output_and_bad_arguments(bundle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "board", "doctor"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--bundle" in done.stderr
    done = subprocess.run([sys.executable, "-m", "board", "doctor", "--bundle", str(tmp_path / "nope"), "--emulate"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "[FAIL] bundle: bundle folder not found" in done.stdout and "[skip] vision_reference" in done.stdout


# -- another checkpoint's models, checksums rewritten --------------------------------------------------


@pytest.fixture(scope="module")
def other(tiny_checkpoint):
    from host.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_checkpoint("256m", seed=1))
    return ck, ck.load_model()


def _swapped(bundle: Path, tmp_path: Path, rel: str, write) -> Path:
    """A copy of the bundle whose `rel` (file or folder) is rewritten by write(path), its checksums updated."""
    copy = tmp_path / "swapped"
    shutil.copytree(bundle, copy)
    target = copy / rel
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    write(target)
    manifest = json.loads((copy / S.MANIFEST).read_text())
    files = manifest[S.Manifest.FILES]
    for name in [n for n in files if n == rel or n.startswith(rel + "/")]:
        del files[name]
    files.update(file_entries(copy, [rel]))
    (copy / S.MANIFEST).write_text(json.dumps(manifest, indent=2))
    Bundle.open(copy).verify_host_files(rel)  # the swap is invisible to the checksums
    return copy


def test_another_checkpoints_vision_model_fails_vision_reference(bundle, other, tmp_path, capsys):
    from host.vision_export import export_onnx, vision_tower

    ck, model = other
    settings = Bundle.open(bundle).split_settings
    tower = vision_tower(model.model.vision_model, model.model.connector, "patches", settings=settings)
    copy = _swapped(bundle, tmp_path, S.VISION_ONNX, lambda path: export_onnx(tower, path))
    code = D.main(["--bundle", str(copy), "--emulate", "--json", "--quiet"])
    result = json.loads(capsys.readouterr().out)
    checks = _by_name(result)
    assert code == 1 and result["ok"] is False
    assert checks["vision_reference"]["ok"] is False and checks["vision_reference"]["cosine"] < 0.9
    assert "another" in checks["vision_reference"]["hint"]
    assert checks["decoder_reference"]["ok"] is True  # the decoder checks use the stored rows: unaffected


def test_another_checkpoints_decoder_fails_decoder_reference(bundle, other, tmp_path):
    from host.decoder_export import export_decoder

    ck, model = other
    tokenizer = ck.load_tokenizer()
    eos = Bundle.open(bundle).eos_token_ids
    copy = _swapped(bundle, tmp_path, S.DECODER_HF, lambda path: export_decoder(model, tokenizer, path, eos_ids=eos))
    result = D.Doctor(copy, emulate=True).run()
    checks = _by_name(result)
    assert result["ok"] is False and checks["vision_reference"]["ok"] is True
    assert checks["decoder_reference"]["ok"] is False
    assert all(p["agreement"] < 1.0 for p in checks["decoder_reference"]["prompts"].values())


def test_board_judgement_of_the_decoder_allows_w8a8_drift_but_not_garbage():
    good = {"agreement": 1.0, "first_token": True, "garbage": False}
    drift = {"agreement": 0.25, "first_token": True, "garbage": False}
    wrong = {"agreement": 0.0, "first_token": False, "garbage": False}
    assert D.judge_decoder({"text": good, "image": drift}, exact=False)[::2] == (True, None)
    ok, _, warning = D.judge_decoder({"text": drift, "image": drift}, exact=False)
    assert ok and "below 0.5" in warning
    assert D.judge_decoder({"text": wrong, "image": drift}, exact=False)[0] is True
    assert D.judge_decoder({"text": wrong, "image": wrong}, exact=False)[0] is False
    assert D.judge_decoder({"text": good, "image": {**good, "garbage": True}}, exact=False)[0] is False
    assert D.judge_decoder({"text": good, "image": drift}, exact=True)[0] is False  # emulation: exact
    assert D.is_garbage([7, 7, 7, 7], [1, 2, 3, 4]) and not D.is_garbage([7, 7, 7, 7], [7, 7, 7, 7])
    assert not D.is_garbage([7, 7, 7], [1, 2, 3]) and D.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5


# -- the decoder checks against the librkllmrt C double ------------------------------------------------


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the librkllmrt test double")
    return compile_fake_rkllmrt(tmp_path_factory.mktemp("fake_rkllmrt") / "librkllmrt.so")


@pytest.fixture(scope="module")
def eos_bundle(bundle, tmp_path_factory):
    """The bundle with a reference eos prompt (the tiny model ends none): the text prompt, its ids ending in EOS."""
    copy = tmp_path_factory.mktemp("eos") / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / S.MANIFEST).read_text())
    reference = manifest[S.Manifest.REFERENCE]
    eos = manifest[S.Manifest.GENERATION][S.Generation.EOS_TOKEN_IDS][0]
    reference[S.Reference.EOS_PROMPT] = {**reference[S.Reference.PROMPTS][0], S.ReferencePrompt.NAME: "eos-test",
                                         S.ReferencePrompt.GREEDY_IDS: [5, eos], S.ReferencePrompt.STOPPED: True}
    (copy / S.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return copy


def _doctor_on_the_double(bundle_dir, fake_lib, scenario, tmp_path, monkeypatch):
    from board.decoder_rkllm import RKLLMDecoder

    monkeypatch.setenv(rkllm_h.LIB_ENV, str(fake_lib))
    monkeypatch.setenv("FAKE_RKLLM_SCENARIO", scenario)
    monkeypatch.setenv("FAKE_RKLLM_REPORT", str(tmp_path / "report.json"))
    monkeypatch.setenv("FAKE_RKLLM_TOKEN_BASE", "10")  # ids inside the tiny vocabulary
    b = Bundle.open(bundle_dir)
    model = tmp_path / "decoder.rkllm"
    model.write_bytes(b"the double only opens it")
    monkeypatch.setenv("FAKE_RKLLM_EOS", str(b.eos_token_ids[0]))
    decoder = RKLLMDecoder(model, hidden_size=b.hidden_size, max_context=b.max_context, eos_token_ids=b.eos_token_ids)
    return _by_name(D.Doctor(bundle_dir, emulate=True, decoder=decoder).run())


def test_a_runtime_that_behaves_as_documented_passes_the_runtime_checks(eos_bundle, fake_lib, tmp_path, monkeypatch):
    """stream: three tokens and the end-of-turn id, then it stops by itself."""
    checks = _doctor_on_the_double(eos_bundle, fake_lib, "stream", tmp_path, monkeypatch)
    assert checks["prefill_count"]["ok"] and checks["history"]["ok"], (checks["prefill_count"], checks["history"])
    assert checks["history"]["cache"] == checks["history"]["expected_cache"]
    assert checks["eos"]["ok"] and checks["eos"]["tokens"] == 4 and checks["eos"]["eos_streamed"]
    assert checks["decoder_reference"]["ok"] is False  # the double answers the same whatever it is fed


def test_the_eos_guard_ends_a_runtime_that_streams_past_the_end_of_turn(eos_bundle, fake_lib, tmp_path, monkeypatch):
    checks = _doctor_on_the_double(eos_bundle, fake_lib, "eos", tmp_path, monkeypatch)
    assert checks["eos"]["ok"] and checks["eos"]["tokens"] == 2 and checks["eos"]["eos_streamed"]
    assert checks["prefill_count"]["ok"]


def test_a_miscounted_prefill_fails_prefill_count(bundle, fake_lib, tmp_path, monkeypatch):
    checks = _doctor_on_the_double(bundle, fake_lib, "miscount", tmp_path, monkeypatch)
    fed = checks["prefill_count"]["fed"]
    assert checks["prefill_count"]["ok"] is False
    assert f"prefilled {fed + 1} tokens but {fed} embedding rows were fed" in checks["prefill_count"]["detail"]


def test_a_runtime_that_loses_the_cache_fails_history(bundle, fake_lib, tmp_path, monkeypatch):
    checks = _doctor_on_the_double(bundle, fake_lib, "loses_cache", tmp_path, monkeypatch)
    history = checks["history"]
    assert history["ok"] is False and history["cache"] == 0 and history["expected_cache"] > 0
    assert "holds 0 tokens where the conversation expects" in history["detail"]


def test_a_runtime_that_never_stops_fails_eos_and_abort_still_works(eos_bundle, fake_lib, tmp_path, monkeypatch):
    checks = _doctor_on_the_double(eos_bundle, fake_lib, "slow", tmp_path, monkeypatch)  # 20 ms a token, never EOS
    assert checks["eos"]["ok"] is False and "without stopping" in checks["eos"]["detail"]
    assert checks["abort"]["ok"] is True and checks["abort"]["finish_reason"] == "abort"
    assert checks["abort"]["abort_to_end_s"] < D.ABORT_WITHIN_S and checks["abort"]["tokens"] < 10
