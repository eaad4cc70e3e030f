"""board/bench.py in emulation: the JSON a board run prints has every documented key, labelled as
emulation, with positive numbers; the budgets file only names figures the JSON has; budget checks
name the stage that regressed. The numbers themselves mean nothing here (x86, tiny model).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from board.bench import (  # noqa: E402
    COUNT_KEYS,
    EMULATION_WARNING,
    RESULT_KEYS,
    SCHEMA,
    budget_entry,
    check_budget,
    clocks,
    lookup,
    synthetic_image,
)
from board.tiles import SplitSettings, plan_tiles  # noqa: E402
from board.vision import NPU_CORE_MODES  # noqa: E402
from support import ROOT  # noqa: E402

BUDGETS = json.loads((ROOT / "board" / "rk3588_budgets.json").read_text())
RUNS = 2


@pytest.fixture(scope="module")
def bench(bundle, tmp_path_factory):
    """`python board/bench.py --emulate --json` as a user runs it (short: 2 runs, 8 new tokens)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "board" / "bench.py"), "--bundle", str(bundle), "--emulate", "--json",
         "--runs", str(RUNS), "--warmup", "0", "--new-tokens", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(stdout=result.stdout, stderr=result.stderr, json=json.loads(result.stdout), out=out)


def _positive_stats(stats: dict, name: str) -> None:
    assert set(stats) == {"median", "min", "max"}, name
    assert 0 < stats["min"] <= stats["median"] <= stats["max"], (name, stats)


def test_emulation_json_has_every_documented_key(bench, bundle):
    r = bench.json
    assert bench.stdout.count("\n") == 1 and json.loads(bench.out.read_text()) == r  # one object, also in --out
    assert r["schema"] == SCHEMA and r["backend"] == "emulate" and r["warning"] == EMULATION_WARNING
    assert r["runtime"]["vision"] == "onnxruntime" and r["runtime"]["decoder"] == "TorchDecoder"
    assert set(r["results"]) == set(RESULT_KEYS) and set(r["counts"]) == set(COUNT_KEYS)
    assert set(r["results"]["vision_ms_per_tile"]) == set(NPU_CORE_MODES)
    for mode, stats in r["results"]["vision_ms_per_tile"].items():
        _positive_stats(stats, mode)
    for key in RESULT_KEYS[1:]:
        _positive_stats(r["results"][key], key)
    w = r["workload"]
    assert (w["tiles"], w["image_size"], w["text_tokens"], w["new_tokens"], w["runs"], w["sampling"]) == (
        17, [2048, 2048], 128, 8, RUNS, "greedy")
    assert r["counts"]["prompt_tokens"]["median"] > 17 * 64  # the image rows and the question
    assert 0 < r["counts"]["decode_tokens"]["max"] <= 8 and 0 < r["counts"]["text128_decode_tokens"]["max"] <= 8
    v = r["versions"]
    assert set(v) == {"board", "npu_driver", "librkllmrt", "librknnrt", "rknn_toolkit_lite2", "onnxruntime", "torch",
                      "bundle_toolkits"}
    assert v["npu_driver"] is None and v["librkllmrt"] is None and v["onnxruntime"] and v["torch"]
    assert v["bundle_toolkits"]["rknn-toolkit2"] == "2.5.0"
    assert r["bundle"]["path"] == str(Path(bundle).resolve()) and r["bundle"]["tile"] == 512
    assert set(r["system"]) == {"machine", "kernel", "python", "soc", "clocks"}


def test_budget_file_names_only_figures_the_bench_reports(bench):
    """A budget key that the JSON lacks would make a board run fail for the wrong reason."""
    for model in BUDGETS["models"]:
        for key, rule in model["budgets"].items():
            lookup(bench.json, key)
            assert set(rule) <= {"max", "min", "why"} and ("max" in rule) != ("min" in rule), key
            assert ("max" in rule) == (not key.endswith("tok_s")), f"{key}: speeds have a minimum, times a maximum"


def test_check_budget_names_the_stage_measured_and_budget(bench):
    result = copy.deepcopy(bench.json)
    assert check_budget(result, "ttft_ms", {"max": 1e9}) is None
    result["results"]["vision_ms_per_tile"]["single"] = {"median": 1234.5, "min": 1200.0, "max": 1300.0}
    message = check_budget(result, "vision_ms_per_tile.single", {"max": 1000, "why": "public figure"})
    assert message.startswith("vision_ms_per_tile.single: measured median 1234.5") and "at most 1000" in message
    assert f"{RUNS} runs" in message and "public figure" in message
    result["results"]["decode_tok_s"]["median"] = 10.0
    assert "below the budget of at least 50" in check_budget(result, "decode_tok_s", {"min": 50})
    with pytest.raises(KeyError):
        lookup(result, "vision_ms_per_tile.turbo")


def test_budget_entries_match_the_bundle_geometry(bundle):
    from board.bundle import Bundle

    assert budget_entry(BUDGETS, Bundle.open(bundle)) is None  # the tiny model has hidden size 64
    fake = SimpleNamespace(manifest={"model": {"family": "siglip-b16-512"}}, hidden_size=576)
    assert budget_entry(BUDGETS, fake)["name"] == "SmolVLM-256M"


def test_budgets_option_refuses_a_model_without_budgets_before_running(bundle):
    result = subprocess.run([sys.executable, str(ROOT / "board" / "bench.py"), "--bundle", str(bundle), "--emulate",
                             "--budgets", str(ROOT / "board" / "rk3588_budgets.json")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and "has no budgets for this model" in result.stderr
    assert "[bench] loading" not in result.stderr


def test_synthetic_image_is_fixed_and_makes_17_tiles_in_every_family():
    import cv2
    import numpy as np

    png = synthetic_image()
    assert hashlib.sha256(png).digest() == hashlib.sha256(synthetic_image()).digest()
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert rgb.shape == (2048, 2048, 3)
    for longest, tile in ((2048, 512), (1536, 384)):
        assert plan_tiles(2048, 2048, SplitSettings(longest_edge=longest, tile=tile)).n_tiles == 17


def test_clock_state_is_read_from_sysfs(tmp_path):
    def write(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text + "\n")

    write("devices/system/cpu/cpufreq/policy0/scaling_governor", "schedutil")
    write("devices/system/cpu/cpufreq/policy0/scaling_cur_freq", "1800000")
    write("devices/system/cpu/cpufreq/policy4/scaling_governor", "performance")
    write("class/devfreq/fdab0000.npu/governor", "userspace")
    write("class/devfreq/fdab0000.npu/cur_freq", "1000000000")
    write("class/devfreq/dmc/governor", "dmc_ondemand")
    write("class/devfreq/fb000000.gpu/governor", "simple_ondemand")
    assert clocks(tmp_path) == {
        "cpu_policy0": {"governor": "schedutil", "cur_khz": "1800000"},
        "cpu_policy4": {"governor": "performance", "cur_khz": None},
        "npu": {"governor": "userspace", "cur_hz": "1000000000"},
        "ddr": {"governor": "dmc_ondemand", "cur_hz": None},
    }


def test_console_entry_points_are_declared():
    cfg = (ROOT / "setup.cfg").read_text()
    assert "smolvlm-bench = board.bench:main" in cfg and "smolvlm-server = board.serve:main" in cfg


def test_simulated_npu_reports_the_overlap(bundle):
    """--emulate --simulate-npu-ms: a scheduling model (3 cores, MS per tile each), labelled as such."""
    from board.bench import SIMULATION_NOTE, run_bench

    ms = 40.0
    r = run_bench(bundle, emulate=True, runs=2, warmup=1, photo=(1024, 768), new_tokens=1, simulate_npu_ms=ms)
    sim, w = r["simulated_npu"], r["workload"]
    assert r["runtime"]["vision"] == "simulated-npu" and sim["note"] == SIMULATION_NOTE
    assert (w["tiles"], w["image_size"], w["npu_cores_used"], sim["cores"]) == (13, [768, 1024], 3, 3)
    assert sim["npu_alone_ms"]["min"] >= 5 * ms  # 13 tiles on 3 cores: 5 rounds at least
    for key in ("image_encode_ms", "frontend_alone_ms"):
        _positive_stats(r["results"][key], key)
    encode, alone = r["results"]["image_encode_ms"]["median"], r["results"]["frontend_alone_ms"]["median"]
    hidden = (sim["npu_alone_ms"]["median"] + alone - encode) / alone
    assert sim["hidden_fraction"] == pytest.approx(hidden, abs=2e-3) and sim["target_met"] == (hidden >= 0.5)
    assert isinstance(sim["overruns"], int) and sim["overruns"] >= 0


def test_simulated_npu_needs_emulation(bundle, capsys):
    from board.bench import main

    with pytest.raises(SystemExit) as exit_:
        main(["--bundle", str(bundle), "--simulate-npu-ms", "100"])
    assert exit_.value.code == 2 and "--simulate-npu-ms needs --emulate" in capsys.readouterr().err


def test_versions_take_the_open_encoders_runtime_report_instead_of_loading_the_model_again(bundle, monkeypatch):
    """On a board the vision encoder has already read librknnrt's version: asking again would load
    vision.rknn into a second runtime. Without that report the model is loaded to ask."""
    from board import bench as B
    from board.bundle import Bundle

    loaded = []
    monkeypatch.setattr(B, "rknn_sdk_version", lambda path: loaded.append(path) or "asked the runtime")
    b = Bundle.open(bundle)
    assert B.versions(b, False, "2.3.2 (from the encoder)")["librknnrt"] == "2.3.2 (from the encoder)"
    assert loaded == []
    assert B.versions(b, False)["librknnrt"] == "asked the runtime"
    assert len(loaded) == 1
