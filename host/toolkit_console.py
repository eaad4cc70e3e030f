"""What both Rockchip toolkits need around them: the platform they run on, their chatter kept in a
log, and a sign of life on the console while their native code works for minutes."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from board.errors import RuntimeUnavailable


def require_conversion_host(tool: str) -> None:
    """Raise RuntimeUnavailable unless this is x86_64 Linux, the only host rknn-toolkit2 and rkllm-toolkit ship for."""
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        raise RuntimeUnavailable(
            f"{tool} converts models only on x86_64 Linux; this machine is {system} {machine}",
            hint="run the conversion on an x86_64 Linux host and copy the bundle to the board",
        )


@contextlib.contextmanager
def toolkit_output(log_path: Path, title: str) -> Iterator[int]:
    """Send fds 1 and 2 (Python and native writes alike) to log_path; yield a dup of the real stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, f"\n===== {title} ({time.strftime('%Y-%m-%d %H:%M:%S')}) =====\n".encode())
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield saved_err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)


@contextlib.contextmanager
def heartbeat(fd: int, tag: str, what: str, every_s: int, since_s: int = 0) -> Iterator[None]:
    """A '[tag  Ns]   what: still running (Ms)' line on fd every `every_s` seconds while the body runs.

    A tiny shell loop, not a thread: the toolkits' native code holds the GIL for minutes at a time. It
    also stops by itself when this process is gone, so it never outlives a killed build.
    """
    if every_s <= 0:
        yield
        return
    beat = subprocess.Popen(
        ["sh", "-c", 'e=0; while sleep "$H" && kill -0 "$P" 2>/dev/null; do e=$((e + H)); '
                     'printf "[%s %6ss]   %s: still running (%ss)\\n" "$T" $((B + e)) "$W" $e; done'],
        env={"H": str(int(every_s)), "B": str(int(since_s)), "T": tag, "W": what, "P": str(os.getpid()),
             "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdout=fd, stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        beat.terminate()
        beat.wait()
