"""The board checks name each missing piece in plain words, in the order a user meets them.

Each scenario is the previous one with one more piece in place, faked by fake_board.py on private
mounts: no device tree, an RK3568, an RK3588 without the NPU driver, with an old one, the RK3588
device tree alone, a good driver without librknnrt.so, then librkllmrt.so missing, of the wrong
release, and present. The two libraries are stand-ins (any aarch64 library for librknnrt.so, which
the checks only load; the C test double of librkllmrt built here): nothing of Rockchip's is used.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

pytestmark = pytest.mark.rehearsal

HERE = Path(__file__).resolve().parent
C_DIR = HERE.parent / "c"
RK3588 = ("--compatible", "radxa,rock-5b", "--compatible", "rockchip,rk3588")


@dataclass(frozen=True)
class Scenario:
    name: str
    expect_exit: int
    says: str  # in the output
    board: tuple[str, ...] = ()  # fake_board.py options
    rknnrt: bool = False  # put the librknnrt.so stand-in in place
    rkllmrt: Optional[str] = None  # RKLLM_LIB: "abi_1_2" or "v1_3_0", a build of the test double


SCENARIOS = [
    Scenario("no device tree (this rootfs as it is)", 3, "is missing: this is not a Rockchip board"),
    Scenario("an RK3568 board", 3, "this board is not an RK3588",
             ("--compatible", "firefly,roc-rk3568-pc", "--compatible", "rockchip,rk3568")),
    Scenario("RK3588, no NPU driver", 4, "no rknpu NPU driver is loaded", (*RK3588, "--debugfs")),
    Scenario("RK3588, NPU driver 0.9.7", 4, "NPU driver 0.9.7 is too old; librkllmrt 1.3.0 needs 0.9.8",
             (*RK3588, "--npu-version", "RKNPU driver: v0.9.7")),
    Scenario("RK3588 device tree only", 5, "librknnrt.so was not found", RK3588),
    Scenario("RK3588, NPU driver 0.9.8, no librknnrt.so", 5, "librknnrt.so was not found",
             (*RK3588, "--npu-version", "RKNPU driver: v0.9.8")),
    Scenario("+ librknnrt.so (stand-in), no librkllmrt.so", 7, "librkllmrt.so (Rockchip's RKLLM runtime 1.3.0) "
             "was not found", (*RK3588, "--npu-version", "RKNPU driver: v0.9.8"), rknnrt=True),
    Scenario("+ a librkllmrt.so of the 1.2 ABI (test double)", 7, "is not librkllmrt 1.3.0",
             (*RK3588, "--npu-version", "RKNPU driver: v0.9.8"), rknnrt=True, rkllmrt="abi_1_2"),
    Scenario("+ a librkllmrt.so of the 1.3.0 ABI (test double)", 0, "the board is ready",
             (*RK3588, "--npu-version", "RKNPU driver: v0.9.8"), rknnrt=True, rkllmrt="v1_3_0"),
]


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, Path]:
    """The librkllmrt test double in both ABIs (gcc here, aarch64), and a librknnrt.so stand-in."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing in the rehearsal userland (scripts/board_rehearsal installs it)")
    out = tmp_path_factory.mktemp("libs")
    libs = {}
    for name, defines in (("v1_3_0", []), ("abi_1_2", ["-DFAKE_ABI_1_2"])):
        libs[name] = out / f"librkllmrt_{name}.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-pthread", *defines, f"-I{C_DIR}",
                        str(C_DIR / "fake_rkllmrt.c"), "-o", str(libs[name])], check=True, capture_output=True)
    libm = ctypes.util.find_library("m")
    libs["rknnrt"] = next(p for d in ("/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu")
                          if (p := Path(d) / str(libm)).is_file())
    return libs


def _summary(stdout: str, stderr: str) -> str:
    """The first failed check's line, or the last line said (the board is ready, or an error)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    failed = [line.split("] ", 1)[1] for line in lines if line.startswith("[fail]")]
    return failed[0] if failed else (lines[-1] if lines else stderr.strip())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_checks_name_the_missing_piece(rehearsal, libraries, record_property, scenario):
    board = list(scenario.board) + (["--rknnrt", str(libraries["rknnrt"])] if scenario.rknnrt else [])
    env = {k: v for k, v in os.environ.items() if k != "RKLLM_LIB"}
    if scenario.rkllmrt:
        env["RKLLM_LIB"] = str(libraries[scenario.rkllmrt])
    command = [rehearsal.python, str(HERE / "fake_board.py"), *board,
               "--", rehearsal.python, "-m", "board.system_checks", "--bundle", str(rehearsal.bundle)]
    done = subprocess.run(command, cwd=rehearsal.dest, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    record_property("check", json.dumps({
        "scenario": scenario.name, "exit": done.returncode, "expected_exit": scenario.expect_exit,
        "message": _summary(done.stdout, done.stderr),
        "traceback": "Traceback" in output,
    }))
    assert "Traceback" not in output, output
    assert done.returncode == scenario.expect_exit, output
    assert scenario.says in output, output
