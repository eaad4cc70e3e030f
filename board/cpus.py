"""Which CPU cores the board's own work runs on: the big ones.

An RK3588 has four Cortex-A55 cores (cpu0-3) and four Cortex-A76 cores (cpu4-7), roughly twice as
fast. `os.cpu_count()` says 8, so a pool of 8 threads puts half its work on the A55s, which then set
the pace of every parallel step. The kernel says which cores are big: `cpu_capacity` (the scheduler's
relative capacity, 1024 for the fastest) or, where that is missing or flat, each core's highest clock
(`cpufreq/cpuinfo_max_freq`). `big_cores` reads that, one rule for:

- the front end (decoding and resampling): `frontend_pool()` runs as many threads as there are big
  cores this process may use, each pinned to them when the machine has slower cores too; on a machine
  whose cores are all alike (x86) it uses every allowed core and pins nothing;
- the RKLLM runtime's `enabled_cpus` (board.decoder_rkllm): `rkllm_cpus()`.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

from .system_checks import SOC_COMPATIBLE, SystemPaths, soc_compatible

CPU_ROOT = Path("/sys/devices/system/cpu")
DEVICE_TREE_COMPATIBLE = SystemPaths().device_tree_compatible
# The RK3588's Cortex-A76 cores, for a kernel that does not tell the clusters apart.
RK3588_BIG_CORES = (4, 5, 6, 7)
# What says how fast a core is, best first.
_SPEED_FILES = ("cpu_capacity", "cpufreq/cpuinfo_max_freq")
# A core this close to the fastest one is big too: an RK3588's two A76 clusters may be binned at
# 2.256 and 2.4 GHz, while its A55s reach 1.8 GHz (0.75) and a capacity of about half.
_BIG_SHARE = 0.85
_MAX_THREADS = 8

T = TypeVar("T")
R = TypeVar("R")


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_rk3588(device_tree: Path) -> bool:
    try:
        return any(c in SOC_COMPATIBLE for c in soc_compatible(device_tree))
    except OSError:
        return False


def big_cores(cpu_root: Path = CPU_ROOT, device_tree: Path = DEVICE_TREE_COMPATIBLE) -> Optional[tuple[int, ...]]:
    """The big cores (within _BIG_SHARE of the fastest) when the kernel shows that the cores differ;
    RK3588_BIG_CORES on an RK3588 whose kernel does not say; None where every core is alike (or
    nothing says)."""
    cpus = sorted(int(m.group(1)) for p in cpu_root.glob("cpu*") if (m := re.fullmatch(r"cpu(\d+)", p.name)))
    for name in _SPEED_FILES:
        speed = {cpu: _read_int(cpu_root / f"cpu{cpu}" / name) for cpu in cpus}
        known = [v for v in speed.values() if v is not None]
        if len(known) == len(cpus) > 0 and min(known) < _BIG_SHARE * max(known):
            return tuple(cpu for cpu in cpus if speed[cpu] >= _BIG_SHARE * max(known))
    return RK3588_BIG_CORES if _is_rk3588(device_tree) else None


def rkllm_cpus(cpu_root: Path = CPU_ROOT, device_tree: Path = DEVICE_TREE_COMPATIBLE) -> tuple[int, ...]:
    """The cores librkllmrt is given: the big cores; RK3588_BIG_CORES where none are told apart (the
    runtime runs on an RK3588 only, so elsewhere this only reaches the C test double)."""
    return big_cores(cpu_root, device_tree) or RK3588_BIG_CORES


def frontend_cpus(cpu_root: Path = CPU_ROOT, device_tree: Path = DEVICE_TREE_COMPATIBLE,
                  allowed: Optional[Iterable[int]] = None) -> tuple[tuple[int, ...], bool]:
    """(cores, pin) for the front end's threads: the big cores this process may use, pinned, when they
    are only some of its cores (a big.LITTLE board); otherwise every allowed core, unpinned."""
    allowed = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    big = set(big_cores(cpu_root, device_tree) or ())
    chosen = tuple(c for c in allowed if c in big)
    if chosen and len(chosen) < len(allowed):
        return chosen, True
    return tuple(allowed), False


def _single_threaded_blas() -> None:
    """Ask numpy's OpenBLAS for one thread per call: the front end already runs one product per big
    core, and OpenBLAS's own threads would oversubscribe them (and spill onto the A55s on a board).
    Looked up in the loaded libraries as threadpoolctl does; a BLAS that is not OpenBLAS is left alone."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.rsplit("/", 1)[-1].lower()})
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_"):
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter(1)
                break


_pool: Optional[ThreadPoolExecutor] = None
_pool_threads = 1
_pool_lock = threading.Lock()
_in_pool = threading.local()


def _pin(cpus: tuple[int, ...], pin: bool) -> None:
    _in_pool.active = True
    if pin:
        os.sched_setaffinity(0, cpus)  # 0: the calling thread


def frontend_pool() -> ThreadPoolExecutor:
    """The process's front-end threads (decoding, resampling), sized to and pinned as frontend_cpus says."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None:
            import numpy  # noqa: F401 - loads OpenBLAS, so that it can be found and limited

            cpus, pin = frontend_cpus()
            _single_threaded_blas()
            _pool_threads = max(1, min(_MAX_THREADS, len(cpus)))
            _pool = ThreadPoolExecutor(max_workers=_pool_threads,
                                       thread_name_prefix="smolvlm-frontend", initializer=_pin, initargs=(cpus, pin))
        return _pool


def frontend_threads() -> int:
    """How many front-end threads run at once."""
    frontend_pool()
    return _pool_threads


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """fn over items on the front-end threads, results in order; inline for a single item or when
    called from a front-end thread (a pool waiting on itself could deadlock)."""
    items = list(items)
    if len(items) <= 1 or getattr(_in_pool, "active", False):
        return [fn(item) for item in items]
    return list(frontend_pool().map(fn, items))


def submit(fn: Callable[..., R], *args: object) -> "Future[R]":
    """fn(*args) on a front-end thread; run at once (a finished Future) when called from one."""
    if getattr(_in_pool, "active", False):
        done: "Future[R]" = Future()
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the Future, like the pool does
            done.set_exception(exc)
        return done
    return frontend_pool().submit(fn, *args)
