"""Run a command on a faked board: what board/system_checks.py reads, put there on private tmpfs mounts.

    python fake_board.py --compatible rockchip,rk3588 --npu-version "RKNPU driver: v0.9.8" \\
        -- python -m board.system_checks

It first moves itself into a new, private mount namespace (root only), so the mounts it makes never
reach the rest of the system and vanish with the command. There, fresh tmpfs mounts over /sys,
/usr/local/lib and /proc (last) hold only what the options name: the device tree's compatible list,
debugfs and the rknpu driver's version, a librknnrt.so stand-in.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

RKNNRT_DIR = Path("/usr/local/lib")  # one of system_checks.SystemPaths.rknnrt_dirs, empty on Debian
CLONE_NEWNS = 0x00020000


def _private_mount_namespace() -> None:
    """unshare(CLONE_NEWNS), then make every mount private so nothing propagates back out."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed (fake_board.py must run as root)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


def _tmpfs(where: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "fakeboard", where], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compatible", action="append", default=[],
                        help="one of the device tree's compatible strings (repeat; default: no device tree)")
    parser.add_argument("--debugfs", action="store_true", help="debugfs is mounted at /sys/kernel/debug")
    parser.add_argument("--npu-version", metavar="TEXT", help="/sys/kernel/debug/rknpu/version (implies --debugfs)")
    parser.add_argument("--rknnrt", type=Path, metavar="LIB", help=f"a library copied to {RKNNRT_DIR}/librknnrt.so")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        _private_mount_namespace()
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"fake_board.py: cannot make a private mount namespace: {err}", file=sys.stderr)
        return 2
    _tmpfs("/sys")
    if args.debugfs or args.npu_version is not None:
        debug = Path("/sys/kernel/debug")
        debug.mkdir(parents=True)
        if args.npu_version is not None:
            (debug / "rknpu").mkdir()
            (debug / "rknpu/version").write_text(args.npu_version + "\n")
    _tmpfs(str(RKNNRT_DIR))
    if args.rknnrt:
        shutil.copy(args.rknnrt, RKNNRT_DIR / "librknnrt.so")
    _tmpfs("/proc")  # last: mount(8) itself reads /proc
    mounts = "/ / ext4 rw 0 0\nproc /proc proc rw 0 0\nsysfs /sys sysfs rw 0 0\n"
    if args.debugfs or args.npu_version is not None:
        mounts += "debugfs /sys/kernel/debug debugfs rw 0 0\n"
    Path("/proc/mounts").write_text(mounts)
    if args.compatible:
        Path("/proc/device-tree").mkdir()
        Path("/proc/device-tree/compatible").write_bytes(
            b"".join(c.encode() + b"\0" for c in args.compatible))
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
