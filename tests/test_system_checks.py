"""Board checks against a fake /sys and /proc: each says in plain words what is missing and what to do."""

from __future__ import annotations

import ctypes.util
import shutil
from pathlib import Path

import pytest

from board import rkllm_h
from board import system_checks as S
from board.errors import RuntimeUnavailable


def fake_system(root: Path, *, compatible=None, debugfs_version=None, module_version=None, procfs_version=None,
                mounted=True, rknnrt: bytes | None = None) -> S.SystemPaths:
    """A board-shaped tree under `root`; None leaves a file out."""
    paths = S.SystemPaths(
        npu_debugfs_version=root / "sys/kernel/debug/rknpu/version",
        npu_module_version=root / "sys/module/rknpu/version",
        npu_procfs_version=root / "proc/rknpu/version",
        device_tree_compatible=root / "proc/device-tree/compatible",
        mounts=root / "proc/mounts",
        rknnrt_dirs=(str(root / "usr/lib"),),
    )
    for path, content in ((paths.device_tree_compatible, compatible), (paths.npu_debugfs_version, debugfs_version),
                          (paths.npu_module_version, module_version), (paths.npu_procfs_version, procfs_version)):
        if content is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    paths.mounts.parent.mkdir(parents=True, exist_ok=True)
    paths.mounts.write_text("proc /proc proc rw 0 0\n" + ("debugfs /sys/kernel/debug debugfs rw 0 0\n" if mounted else ""))
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    if rknnrt is not None:
        (root / "usr/lib" / S.RKNNRT_NAME).write_bytes(rknnrt)
    return paths


@pytest.mark.parametrize("compatible,status", [
    (b"radxa,rock-5b\0rockchip,rk3588\0", S.OK),
    (b"xunlong,orangepi-5\0rockchip,rk3588s\0", S.OK),
    (b"firefly,roc-rk3568-pc\0rockchip,rk3568\0", S.FAIL),
    (None, S.FAIL),
])
def test_soc(tmp_path, compatible, status):
    result = S.check_soc(fake_system(tmp_path, compatible=compatible))
    assert result.status == status
    if compatible is None:
        assert "not a Rockchip board" in result.message and "--emulate" in result.hint
    elif status == S.FAIL:
        assert "not an RK3588" in result.message and "rockchip,rk3568" in result.message


@pytest.mark.parametrize("text,status", [
    ("RKNPU driver: v0.9.8\n", S.OK),
    ("RKNPU driver: v0.9.7\n", S.FAIL),
    ("RKNPU driver: v0.8.2\n", S.FAIL),
    ("RKNPU driver: v1.0.0\n", S.OK),
    ("gibberish\n", S.WARN),
])
def test_npu_driver_version(tmp_path, text, status):
    result = S.check_npu_driver(fake_system(tmp_path, debugfs_version=text))
    assert result.status == status, result
    if status == S.FAIL:
        assert "too old" in result.message and "0.9.8" in result.message and "kernel" in result.hint


def test_npu_driver_from_sys_module_when_debugfs_is_closed(tmp_path):
    result = S.check_npu_driver(fake_system(tmp_path, module_version="0.9.8\n", mounted=False))
    assert result.status == S.OK and "0.9.8" in result.message


@pytest.mark.parametrize("where", ["debugfs_version", "procfs_version", "module_version"])
def test_bench_records_the_driver_version_the_check_reads(tmp_path, where):
    """board/bench.py reads the driver through the checks' reader (it once skipped /proc/rknpu/version)."""
    from board.bench import npu_driver_version

    paths = fake_system(tmp_path, **{where: "RKNPU driver: v0.9.8\n"})
    assert S.check_npu_driver(paths).message == "rknpu 0.9.8"
    assert npu_driver_version(paths) == "0.9.8"
    assert npu_driver_version(fake_system(tmp_path / "none")) is None


def test_package_version_of_installed_and_missing_distributions():
    import numpy

    assert S.package_version("numpy") == numpy.__version__
    assert S.package_version("no-such-distribution-smolvlm") is None


def test_npu_driver_unreadable_says_how_to_read_it(tmp_path, monkeypatch):
    paths = fake_system(tmp_path, debugfs_version="RKNPU driver: v0.9.8\n")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == paths.npu_debugfs_version:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    result = S.check_npu_driver(paths)
    assert result.status == S.WARN and "root" in result.message
    assert f"sudo cat {paths.npu_debugfs_version}" in result.hint


def test_npu_driver_debugfs_not_mounted(tmp_path):
    result = S.check_npu_driver(fake_system(tmp_path, mounted=False))
    assert result.status == S.WARN and "debugfs is not mounted" in result.message
    assert "mount -t debugfs" in result.hint


def test_npu_driver_missing_when_debugfs_shows_none(tmp_path):
    result = S.check_npu_driver(fake_system(tmp_path, mounted=True))
    assert result.status == S.FAIL and "no rknpu NPU driver is loaded" in result.message
    assert "0.9.8" in result.hint and "kernel" in result.hint


def test_npu_driver_from_procfs(tmp_path):
    result = S.check_npu_driver(fake_system(tmp_path, procfs_version="RKNPU driver: v0.9.8\n"))
    assert result.status == S.OK and "0.9.8" in result.message


def test_npu_driver_mounts_unreadable_warns(tmp_path):
    paths = fake_system(tmp_path)
    paths.mounts.unlink()
    result = S.check_npu_driver(paths)
    assert result.status == S.WARN and "cannot be read" in result.message


def test_rknn_runtime(tmp_path):
    missing = S.check_rknn_runtime(fake_system(tmp_path / "a"))
    assert missing[0].status == S.FAIL and "was not found" in missing[0].message and "/usr/lib" in missing[0].hint
    broken = S.check_rknn_runtime(fake_system(tmp_path / "b", rknnrt=b"not a library"))
    assert broken[0].status == S.FAIL and "could not load" in broken[0].message
    libm = ctypes.util.find_library("m")
    if libm:  # any loadable shared object stands in for the file check (the NPU itself is not touched)
        lib_dir = tmp_path / "c" / "usr/lib"
        paths = fake_system(tmp_path / "c")
        source = next(p for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                                  "/lib/aarch64-linux-gnu") if (p := Path(d) / libm).exists())
        shutil.copy(source, lib_dir / S.RKNNRT_NAME)
        assert S.check_rknn_runtime(paths)[0].status == S.OK
    lite = missing[1]
    try:
        import rknnlite.api  # noqa: F401
        assert lite.status == S.OK
    except ImportError:
        assert lite.status == S.FAIL and "rknn-toolkit-lite2" in lite.hint


def test_rkllm_runtime_missing(monkeypatch, tmp_path):
    monkeypatch.delenv(rkllm_h.LIB_ENV, raising=False)
    monkeypatch.setattr(rkllm_h, "SYSTEM_LIB_DIRS", (str(tmp_path / "usr/lib"),))
    result = S.check_rkllm_runtime([tmp_path / "bundle"])
    assert result.status == S.FAIL and "was not found" in result.message
    assert str(tmp_path / "bundle" / "librkllmrt.so") in result.message and "release" in result.hint


def test_run_checks_on_a_good_board_shape(tmp_path, monkeypatch):
    monkeypatch.delenv(rkllm_h.LIB_ENV, raising=False)
    monkeypatch.setattr(rkllm_h, "SYSTEM_LIB_DIRS", ())
    paths = fake_system(tmp_path, compatible=b"rockchip,rk3588\0", debugfs_version="RKNPU driver: v0.9.8")
    results = {r.name: r for r in S.run_checks(paths=paths, library_dirs=[tmp_path])}
    assert list(results) == ["cpu", "npu driver", "librknnrt", "rknnlite", "librkllmrt"]
    assert results["cpu"].status == results["npu driver"].status == S.OK
    with pytest.raises(RuntimeUnavailable) as err:
        S.require(list(results.values()))
    message = str(err.value)
    assert "librkllmrt" in message and "librknnrt" in message and "cpu:" not in message
    no_decoder = [r.name for r in S.run_checks(paths=paths, need_decoder=False)]
    assert "librkllmrt" not in no_decoder


@pytest.mark.parametrize("failing,status", [
    ((), 0), (("cpu", "librknnrt"), 3), (("npu driver",), 4), (("librknnrt", "librkllmrt"), 5),
    (("rknnlite",), 6), (("librkllmrt",), 7),
])
def test_exit_status_names_the_first_failed_check(failing, status):
    results = [S.CheckResult(n, S.FAIL if n in failing else S.OK, "m") for n in S.EXIT_CODES]
    assert S.exit_status(results) == status
    assert S.exit_status([S.CheckResult("npu driver", S.WARN, "m")]) == 0


def test_checks_command_exit_status_and_words(monkeypatch, capsys, tmp_path):
    paths = fake_system(tmp_path, compatible=b"rockchip,rk3588\0", debugfs_version="RKNPU driver: v0.9.8")
    real = S.run_checks
    monkeypatch.setattr(S, "run_checks", lambda **kw: real(paths=paths, **kw))
    monkeypatch.delenv(rkllm_h.LIB_ENV, raising=False)
    monkeypatch.setattr(rkllm_h, "SYSTEM_LIB_DIRS", ())
    status = S.main(["--bundle", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == S.EXIT_CODES["librknnrt"]
    assert "[fail] librknnrt: librknnrt.so was not found" in out and "missing: librknnrt" in out
    assert "[fail] librkllmrt" in out and "Traceback" not in out


def test_checks_command_unexpected_error_is_one_line(monkeypatch, capsys):
    def broken(**kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(S, "run_checks", broken)
    assert S.main([]) == S.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "Traceback" not in err


def test_emulate_skips_the_board_checks():
    results = S.run_checks(emulate=True)
    board = [r for r in results if r.name in ("cpu", "npu driver", "librkllmrt", "librknnrt", "rknnlite")]
    assert len(board) == 5 and all(r.status == S.SKIP for r in board)
    S.require(results)  # this machine has what emulation needs
    assert {r.name for r in results if r.status == S.OK} == {"onnxruntime", "torch", "transformers"}


def test_parse_version():
    assert S.parse_version("RKNPU driver: v0.9.8") == (0, 9, 8)
    assert S.parse_version("0.10.1") == (0, 10, 1) > S.MIN_NPU_DRIVER
    assert S.parse_version("v1") is None


def test_cli_checks_flag(capsys):
    from board.run import main

    assert main(["--bundle", "unused", "--checks", "--emulate"]) == 0
    out = capsys.readouterr().out
    assert "[skip] npu driver" in out and "[  ok] onnxruntime" in out


def test_cli_checks_flag_exits_with_the_first_missing_piece(monkeypatch, tmp_path, capsys):
    """`board/run.py --checks` and `python -m board checks` give the same status as the checks command."""
    from board import __main__ as board_main
    from board.run import main

    paths = fake_system(tmp_path, compatible=b"rockchip,rk3588\0", debugfs_version="RKNPU driver: v0.9.8")
    real = S.run_checks
    monkeypatch.setattr("board.run.run_checks", lambda **kw: real(paths=paths, **kw))
    monkeypatch.setattr(S, "run_checks", lambda **kw: real(paths=paths, **kw))
    monkeypatch.setattr(rkllm_h, "SYSTEM_LIB_DIRS", ())
    monkeypatch.delenv(rkllm_h.LIB_ENV, raising=False)
    assert main(["--bundle", str(tmp_path), "--checks"]) == S.EXIT_CODES["librknnrt"]
    assert board_main.main(["checks", "--bundle", str(tmp_path)]) == S.EXIT_CODES["librknnrt"]
    assert capsys.readouterr().out.count("[fail] librknnrt") == 2


def test_pipeline_reports_the_board_before_the_bundle(tmp_path):
    """On a board missing pieces, a user first hears about the board, even if the bundle is incomplete too."""
    from board.pipeline import Pipeline

    with pytest.raises(RuntimeUnavailable, match="cpu"):
        Pipeline(tmp_path, system_paths=fake_system(tmp_path / "sys", compatible=None))


def test_python_m_board_dispatches_and_explains(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    ok = subprocess.run([sys.executable, "-m", "board", "run", "--help"], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0 and "--bundle" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "board", "nope"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "run, serve, bench, checks" in bad.stderr and "Traceback" not in bad.stderr
