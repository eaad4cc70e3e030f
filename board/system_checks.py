"""Checks run before a model is loaded, so a missing piece is named in plain words, not in a crash.

On a board: the CPU is an RK3588, the NPU driver is new enough for librkllmrt 1.3.0 (>= 0.9.8),
librkllmrt 1.3.0 loads, and librknnrt + rknnlite (the vision runtime) are present. With
`--emulate` those are skipped and the x86 emulation's own needs (ONNX Runtime, PyTorch,
transformers) are checked instead.

Every path read is a field of `SystemPaths`, so tests point the checks at a fake /sys and /proc.
`python -m board.system_checks` prints them and exits with a status naming the first missing piece
(EXIT_CODES), so a script (scripts/board_setup.sh, the x86 rehearsal) can tell which one it is.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from . import rkllm_h
from .errors import RuntimeUnavailable

PLATFORM = "rk3588"  # the SoC every NPU model of a bundle is compiled for
MIN_NPU_DRIVER = (0, 9, 8)  # what librkllmrt 1.3.0 needs
RKNNRT_NAME = "librknnrt.so"
SOC_COMPATIBLE = (f"rockchip,{PLATFORM}", f"rockchip,{PLATFORM}s")

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

# Exit status of `python -m board.system_checks`: the first failed check, in the order a user meets
# (and fixes) them. 1 and 2 stay free for "unexpected error" and "bad arguments".
EXIT_READY, EXIT_UNEXPECTED = 0, 1
EXIT_CODES = {"cpu": 3, "npu driver": 4, "librknnrt": 5, "rknnlite": 6, "librkllmrt": 7}

_RKNNRT_HINT = (
    "get librknnrt.so 2.5.0 from Rockchip's airockchip/rknn-toolkit2 repository "
    "(rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so) and copy it to /usr/lib/ on the board"
)
_RKNNLITE_HINT = "pip install rknn-toolkit-lite2==2.5.0 (the wheel for this Python, aarch64 only)"


@dataclass(frozen=True)
class SystemPaths:
    """Where the checks look; the defaults are the real board's."""

    npu_debugfs_version: Path = Path("/sys/kernel/debug/rknpu/version")
    npu_module_version: Path = Path("/sys/module/rknpu/version")
    npu_procfs_version: Path = Path("/proc/rknpu/version")
    device_tree_compatible: Path = Path("/proc/device-tree/compatible")
    mounts: Path = Path("/proc/mounts")
    rknnrt_dirs: tuple[str, ...] = ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu", "/lib")


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome. `warn` means it could not be settled but need not stop the run."""

    name: str
    status: str
    message: str
    hint: Optional[str] = None

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        text = f"[{self.status:>4}] {self.name}: {self.message}"
        return text + (f"\n       hint: {self.hint}" if self.hint else "")


def parse_version(text: str) -> Optional[tuple[int, int, int]]:
    """(major, minor, patch) from e.g. 'RKNPU driver: v0.9.8'."""
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def package_version(name: str) -> Optional[str]:
    """The installed version of a Python distribution (e.g. 'rknn-toolkit-lite2'), or None.
    The board's bench and the host's bundle writer both record versions with it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_npu_driver_version(paths: SystemPaths = SystemPaths()) -> tuple[Optional[str], bool]:
    """The rknpu driver's version text from the first readable of debugfs (root only),
    /proc/rknpu/version (drivers built with procfs) and /sys/module/rknpu/version (world-readable,
    on kernels that export it), or None; and whether a file was there but not readable to us."""
    denied = False
    for source in (paths.npu_debugfs_version, paths.npu_procfs_version, paths.npu_module_version):
        try:
            return source.read_text(errors="replace").strip(), denied
        except PermissionError:
            denied = True
        except OSError:
            continue
    return None, denied


def soc_compatible(device_tree_compatible: Path) -> list[str]:
    """The device tree's compatible strings, most specific first (OSError when the file is missing)."""
    return [c.decode("ascii", "replace") for c in device_tree_compatible.read_bytes().split(b"\0") if c]


def check_soc(paths: SystemPaths = SystemPaths()) -> CheckResult:
    """The device tree names the SoC; the NPU models in a bundle are compiled for the RK3588 only."""
    name = "cpu"
    try:
        compatible = soc_compatible(paths.device_tree_compatible)
    except OSError:
        return CheckResult(
            name, FAIL, f"{paths.device_tree_compatible} is missing: this is not a Rockchip board (or not Linux on one)",
            hint="run on an RK3588 board, or use --emulate on an x86 machine",
        )
    if any(c in SOC_COMPATIBLE for c in compatible):
        return CheckResult(name, OK, f"RK3588 ({compatible[0]})")
    return CheckResult(
        name, FAIL, f"this board is not an RK3588 (device tree: {', '.join(compatible) or 'empty'})",
        hint="the bundle's NPU models are compiled for rk3588; use an RK3588/RK3588S board",
    )


def _debugfs_mounted(paths: SystemPaths) -> Optional[bool]:
    try:
        return any(line.split()[2:3] == ["debugfs"] for line in paths.mounts.read_text().splitlines())
    except OSError:
        return None


def check_npu_driver(paths: SystemPaths = SystemPaths(), *, minimum: tuple[int, int, int] = MIN_NPU_DRIVER,
                     needed_by: str = f"librkllmrt {rkllm_h.RKLLM_VERSION}") -> CheckResult:
    """The rknpu kernel driver's version: librkllmrt 1.3.0 needs >= 0.9.8 (a bundle may name a later `minimum`).

    Read by read_npu_driver_version. It fails as missing only when debugfs could be searched and
    none of the three files exists; when they cannot be read it warns and says how to look, instead
    of refusing a board that may be fine.
    """
    name = "npu driver"
    need = ".".join(map(str, minimum))
    update_hint = (
        f"update the board's kernel/OS image to one with rknpu driver >= {need} "
        "(Rockchip's 5.10/6.1 BSP kernels of 2024 or later; check your board vendor's images)"
    )
    text, denied = read_npu_driver_version(paths)
    if text is None:
        how = f"run `sudo cat {paths.npu_debugfs_version}`"
        mounted = _debugfs_mounted(paths)
        if denied:
            why = f"{paths.npu_debugfs_version} is readable by root only"
        elif mounted is False:
            why = "debugfs is not mounted"
            how = f"run `sudo mount -t debugfs none /sys/kernel/debug` then `sudo cat {paths.npu_debugfs_version}`"
        elif mounted:
            return CheckResult(
                name, FAIL,
                f"no rknpu NPU driver is loaded ({paths.npu_debugfs_version}, {paths.npu_procfs_version} and "
                f"{paths.npu_module_version} do not exist)",
                hint=f"use a board OS image whose kernel has Rockchip's rknpu driver >= {need} "
                "(the vendor BSP kernels; a mainline kernel without it cannot run Rockchip's NPU runtimes)",
            )
        else:
            why = f"{paths.npu_debugfs_version} does not exist and {paths.mounts} cannot be read"
        return CheckResult(name, WARN, f"cannot read the NPU driver version: {why}",
                           hint=f"{how}; it must say v{need} or newer")
    version = parse_version(text)
    if version is None:
        return CheckResult(name, WARN, f"cannot parse the NPU driver version from {text!r}",
                           hint=f"it must be v{need} or newer")
    shown = ".".join(map(str, version))
    if version < minimum:
        return CheckResult(name, FAIL, f"NPU driver {shown} is too old; {needed_by} needs {need} or newer",
                           hint=update_hint)
    return CheckResult(name, OK, f"rknpu {shown}")


def check_rkllm_runtime(library_dirs: Sequence[Union[str, os.PathLike]] = ()) -> CheckResult:
    """librkllmrt 1.3.0 found, loadable, and of the 1.3.0 layout (board.rkllm_h's checks)."""
    try:
        lib = rkllm_h.load_library(library_dirs)
    except RuntimeUnavailable as err:
        return CheckResult("librkllmrt", FAIL, err.message, hint=err.hint)
    return CheckResult("librkllmrt", OK, str(lib.path))


def check_rknn_runtime(paths: SystemPaths = SystemPaths()) -> list[CheckResult]:
    """librknnrt.so (the NPU runtime rknnlite loads from /usr/lib) and the rknnlite package."""
    found = next((Path(d) / RKNNRT_NAME for d in paths.rknnrt_dirs if (Path(d) / RKNNRT_NAME).is_file()), None)
    if found is None:
        lib = CheckResult("librknnrt", FAIL, f"{RKNNRT_NAME} was not found in {', '.join(paths.rknnrt_dirs)}",
                          hint=_RKNNRT_HINT)
    else:
        try:
            ctypes.CDLL(str(found))
            lib = CheckResult("librknnrt", OK, str(found))
        except OSError as exc:
            lib = CheckResult("librknnrt", FAIL, f"found {found} but could not load it: {exc}", hint=_RKNNRT_HINT)
    try:
        importlib.import_module("rknnlite.api")
        lite = CheckResult("rknnlite", OK, "rknn-toolkit-lite2 importable")
    except ImportError as exc:
        lite = CheckResult("rknnlite", FAIL, f"rknnlite cannot be imported ({exc})", hint=_RKNNLITE_HINT)
    return [lib, lite]


def check_emulation() -> list[CheckResult]:
    """What --emulate needs on x86: ONNX Runtime for vision, PyTorch + transformers for the decoder."""
    results = []
    for module, hint in (
        ("onnxruntime", "pip install onnxruntime"),
        ("torch", "pip install torch==2.13.0 (the CPU build), or run scripts/setup.sh"),
        ("transformers", "pip install 'transformers>=5,<6', or run scripts/setup.sh"),
    ):
        try:
            importlib.import_module(module)
            results.append(CheckResult(module, OK, "importable"))
        except ImportError as exc:
            results.append(CheckResult(module, FAIL, f"--emulate needs {module}: {exc}", hint=hint))
    return results


def run_checks(
    *,
    emulate: bool = False,
    need_decoder: bool = True,
    library_dirs: Iterable[Union[str, os.PathLike]] = (),
    paths: SystemPaths = SystemPaths(),
) -> list[CheckResult]:
    """All checks for this mode, in the order a user meets them: the board, its kernel driver, the
    vision runtime (first to load), then the language-model runtime."""
    if emulate:
        skipped = [CheckResult(n, SKIP, "not needed with --emulate") for n in EXIT_CODES]
        return skipped + check_emulation()
    results = [check_soc(paths), check_npu_driver(paths), *check_rknn_runtime(paths)]
    if need_decoder:
        results.append(check_rkllm_runtime(list(library_dirs)))
    return results


def exit_status(results: Sequence[CheckResult]) -> int:
    """EXIT_READY, or the EXIT_CODES entry of the first failed check."""
    return next((EXIT_CODES.get(r.name, EXIT_UNEXPECTED) for r in results if r.failed), EXIT_READY)


def require(results: Sequence[CheckResult]) -> None:
    """Raise one RuntimeUnavailable naming every failed check (the hint of the first)."""
    failed = [r for r in results if r.failed]
    if not failed:
        return
    lines = "; ".join(f"{r.name}: {r.message}" for r in failed)
    hints = " | ".join(r.hint for r in failed if r.hint)
    raise RuntimeUnavailable(f"this machine cannot run the model: {lines}", hint=hints or None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m board.system_checks`: print every check, then what to do; exit with exit_status()."""
    codes = ", ".join(f"{code} {name}" for name, code in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        description="Check that this board can run a bundle: RK3588, NPU driver, librknnrt + rknnlite, librkllmrt.",
        epilog=f"Exit status: {EXIT_READY} ready; {EXIT_UNEXPECTED} unexpected error; 2 bad arguments; "
        f"otherwise the first check that failed: {codes}.",
    )
    parser.add_argument("--bundle", metavar="DIR", help="the bundle folder (librkllmrt.so may be kept there)")
    parser.add_argument("--no-decoder", action="store_true",
                        help="leave librkllmrt out (a bundle converted with --skip-decoder)")
    args = parser.parse_args(argv)
    try:
        results = run_checks(library_dirs=[args.bundle] if args.bundle else [], need_decoder=not args.no_decoder)
    except Exception as err:  # a bug, not a missing piece: one line, no traceback
        print(f"error: the board checks failed unexpectedly: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_UNEXPECTED
    for result in results:
        print(result.line())
    failed = [r.name for r in results if r.failed]
    warned = [r.name for r in results if r.status == WARN]
    if warned:
        print(f"\nnot settled: {', '.join(warned)} (see the hints above; reading the NPU driver version may need sudo)")
    if failed:
        print(f"\nmissing: {', '.join(failed)}. Nothing was downloaded from Rockchip: fetch the files named in the "
              "hints yourself, copy them where they say, and run the checks again.")
    else:
        print("\nthe board is ready: python board/run.py --bundle DIR --image photo.jpg 'What is in this image?'")
    return exit_status(results)


if __name__ == "__main__":
    sys.argv[0] = "python -m board.system_checks"  # the usage line names the command as typed
    sys.exit(main())
