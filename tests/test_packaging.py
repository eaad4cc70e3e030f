"""What a `pip install` of the project carries: package data, the board scripts, the license, and no
setuptools warnings; and each board command's --help names the command as it was typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the source tree (the build writes build/ and *.egg-info beside it)."""
    src = tmp_path_factory.mktemp("src") / "project"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                              "demo-bundle", "bundles", "out"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, cwd=src)
    assert build.returncode == 0, build.stderr[-2000:]
    return next(out.glob("smolvlm_rk3588-*.whl")), build.stdout + build.stderr


def test_the_wheel_carries_what_the_board_needs(wheel):
    path, _ = wheel
    names = set(zipfile.ZipFile(path).namelist())
    assert "board/rk3588_budgets.json" in names  # bench --budgets without a file
    assert "calibration/manifest.json" in names and any(n.startswith("calibration/images/") for n in names)
    data = "smolvlm_rk3588-0.1.0.data/data/share/smolvlm-rk3588/scripts/"
    for script in ("board_setup.sh", "board_clocks.sh", "smolvlm-server.service"):
        assert data + script in names, script
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_the_build_warns_about_nothing(wheel):
    _, log = wheel
    warnings = [line for line in log.splitlines()
                if "warn" in line.lower() and "byte-compiling is disabled" not in line]
    assert not warnings, warnings


@pytest.mark.parametrize("command,usage", [
    (["-m", "board", "checks", "--help"], "usage: python -m board checks"),
    (["-m", "board.system_checks", "--help"], "usage: python -m board.system_checks"),
    (["-m", "board", "bench", "--help"], "usage: python -m board bench"),
    (["board/run.py", "--help"], "usage: run.py"),
])
def test_help_names_the_command_as_typed(command, usage):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage), result.stdout[:200]
