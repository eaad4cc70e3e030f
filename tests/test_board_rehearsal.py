"""The rehearsal's own logic on x86: its verdict fails on any failed piece, parity catches a changed
tile or id, mounts are read right and guard every deletion. (The rehearsal itself: tests/rehearsal.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import pytest

from board.tiles import SplitSettings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/rehearsal"))
import frontend_cases  # noqa: E402


def _load_rehearsal():
    spec = importlib.util.spec_from_file_location("board_rehearsal", REPO / "scripts/board_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


R = _load_rehearsal()
SETTINGS = SplitSettings(longest_edge=64, tile=32)


def _case(classname: str, name: str, outcome: str = "passed", **props) -> str:
    inner = "".join(f'<property name="{k}" value={quoteattr(json.dumps(v))}/>' for k, v in props.items())
    extra = {"failed": '<failure message="boom"/>', "skipped": '<skipped message="why"/>'}.get(outcome, "")
    return f'<testcase classname="{classname}" name="{name}"><properties>{inner}</properties>{extra}</testcase>'


def _report(tmp_path: Path, *, check_outcome="passed", parity=True, ctypes_outcome="passed", torch=False) -> dict:
    cases = [
        _case("tests.rehearsal.test_install", "a", python="3.11.2", installed={"numpy": "2"}),
        _case("tests.rehearsal.test_install", "b", torch_installed=torch),
        _case("tests.rehearsal.test_frontend", "c", "passed" if parity else "failed", frontend={"parity": parity}),
        _case("tests.rehearsal.test_bundle_runtime", "d", rknn_load=0),
        _case("tests.rehearsal.test_board_checks", "e", check_outcome,
              check={"scenario": "s", "exit": 3, "expected_exit": 3, "message": "m"}),
        _case("tests.test_rkllm_abi", "f", ctypes_outcome),
        _case("tests.test_decoder_rkllm", "g", "skipped"),
    ]
    xml = tmp_path / "report.xml"
    xml.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    result: dict = {"board_setup": {"exit": 3, "traceback": False}}
    rehearsal = R.Rehearsal(tmp_path, "http://mirror", None, True, None, result, {})
    rehearsal.read_report(xml)
    return {"result": result, "ok": rehearsal.verdict()}


def test_report_fields_and_a_passing_verdict(tmp_path):
    out = _report(tmp_path)
    r = out["result"]
    assert out["ok"]
    assert r["python"] == "3.11.2" and r["torch_installed"] is False and r["rknn_load"] == 0
    assert r["frontend_parity"] is True and r["checks"][0]["ok"] is True
    assert r["ctypes_double"] == {"passed": 1, "failed": 0, "skipped": 1}
    assert r["tests"]["passed"] == 6 and r["tests"]["failures"] == []


@pytest.mark.parametrize("change", [
    {"check_outcome": "failed"}, {"parity": False}, {"ctypes_outcome": "failed"}, {"torch": True},
])
def test_any_failed_piece_fails_the_verdict(tmp_path, change):
    assert not _report(tmp_path, **change)["ok"]


def test_board_setup_with_another_exit_fails_the_verdict(tmp_path):
    xml_result = _report(tmp_path)["result"]
    rehearsal = R.Rehearsal(tmp_path, "m", None, True, None, {**xml_result, "board_setup": {"exit": 1}}, {})
    assert not rehearsal.verdict()


def test_parity_catches_a_changed_tile_or_id():
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = {"a.png/tiles": tiles, "a.png/grid": np.array([1, 1]), "a.png/ids": np.arange(10)}
    assert frontend_cases.compare(ref, dict(ref), SETTINGS)["parity"]
    moved = tiles.copy()
    moved[0, 0, 0, 0] ^= 0x80  # one pixel far off: max diff > 0.1
    report = frontend_cases.compare(ref, {**ref, "a.png/tiles": moved}, SETTINGS)
    assert not report["parity"] and not report["tiles_within_tolerance"]
    report = frontend_cases.compare(ref, {**ref, "a.png/ids": np.arange(1, 11)}, SETTINGS)
    assert not report["parity"] and not report["ids_identical"]
    assert not frontend_cases.compare(ref, {k: v for k, v in ref.items() if k != "a.png/ids"}, SETTINGS)["parity"]


def test_mounts_under_reads_escaped_mount_points(tmp_path):
    info = tmp_path / "mountinfo"
    root = tmp_path / "cache dir"
    info.write_text(
        f"22 27 0:21 / /proc rw - proc proc rw\n"
        f"90 27 0:50 / {str(root).replace(' ', chr(92) + '040')}/rootfs/proc rw - proc proc rw\n"
        f"91 90 0:51 / {str(root).replace(' ', chr(92) + '040')}/rootfs/proc/sub rw - tmpfs t rw\n"
        f"92 27 0:52 / {str(root).replace(' ', chr(92) + '040')}x/other rw - tmpfs t rw\n")
    assert R.mounts_under(root, info) == [f"{root}/rootfs/proc/sub", f"{root}/rootfs/proc"]


def test_safe_remove_refuses_while_something_is_mounted(tmp_path, monkeypatch):
    target = tmp_path / "rootfs"
    (target / "dev").mkdir(parents=True)
    monkeypatch.setattr(R, "unmount_all", lambda path: [str(target / "dev")])
    with pytest.raises(R.StepFailed, match="refusing to delete"):
        R.safe_remove(target)
    assert (target / "dev").is_dir()
    monkeypatch.setattr(R, "unmount_all", lambda path: [])
    R.safe_remove(target)
    assert not target.exists()


def test_cache_inside_the_repository_is_refused(capsys):
    assert R.main(["--cache", str(REPO / "rehearsal-cache")]) == R.EXIT_USAGE
    assert "outside the repository" in capsys.readouterr().err
