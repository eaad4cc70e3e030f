"""board.cpus: the big cores read from a fake sysfs, what the front end and librkllmrt are given, and the pinning."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from board import cpus
from board.cpus import RK3588_BIG_CORES, big_cores, frontend_cpus, parallel_map, rkllm_cpus, submit


def fake_sysfs(root: Path, capacity=None, max_freq=None, cpus_present=8) -> Path:
    """/sys/devices/system/cpu with per-core cpu_capacity and cpufreq/cpuinfo_max_freq (None: absent)."""
    base = root / "cpu"
    for cpu in range(cpus_present):
        (base / f"cpu{cpu}" / "cpufreq").mkdir(parents=True)
        if capacity is not None:
            (base / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity[cpu]}\n")
        if max_freq is not None:
            (base / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freq[cpu]}\n")
    (base / "cpufreq").mkdir()  # siblings the scan must ignore
    (base / "cpuidle").mkdir()
    return base


def device_tree(root: Path, *compatible: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "compatible"
    path.write_bytes(b"\0".join(c.encode() for c in compatible) + b"\0")
    return path


RK3588_CAPACITY = [530] * 4 + [1024] * 4  # capacity-dmips-mhz of Rockchip's device tree
RK3588_FREQ = [1800000] * 4 + [2400000, 2400000, 2256000, 2256000]  # two A76 clusters binned apart


def test_rk3588_big_cores_from_cpu_capacity(tmp_path):
    root = fake_sysfs(tmp_path, capacity=RK3588_CAPACITY, max_freq=RK3588_FREQ)
    assert big_cores(root, tmp_path / "none") == (4, 5, 6, 7)


def test_clock_speeds_when_capacity_is_flat_or_missing(tmp_path):
    flat = fake_sysfs(tmp_path / "flat", capacity=[1024] * 8, max_freq=RK3588_FREQ)
    assert big_cores(flat, tmp_path / "none") == (4, 5, 6, 7)  # both A76 clusters, not just the faster bin
    missing = fake_sysfs(tmp_path / "missing", max_freq=RK3588_FREQ)
    assert big_cores(missing, tmp_path / "none") == (4, 5, 6, 7)
    other = fake_sysfs(tmp_path / "other", capacity=[1024] * 6, max_freq=[3000000] * 2 + [1000000] * 4,
                       cpus_present=6)  # another big.LITTLE layout: the rule is read, not assumed
    assert big_cores(other, tmp_path / "none") == (0, 1)


def test_alike_cores_have_no_big_ones_except_on_an_rk3588(tmp_path):
    alike = fake_sysfs(tmp_path / "x86", capacity=[1024] * 8, max_freq=[3500000] * 8)
    assert big_cores(alike, tmp_path / "none") is None
    assert big_cores(fake_sysfs(tmp_path / "bare"), tmp_path / "none") is None
    rk = device_tree(tmp_path / "rk3588", "radxa,rock-5b", "rockchip,rk3588")
    assert big_cores(alike, rk) == RK3588_BIG_CORES  # a kernel that does not tell the clusters apart
    assert big_cores(alike, device_tree(tmp_path / "rk3568", "rockchip,rk3568")) is None


def test_the_front_end_pins_only_where_cores_differ(tmp_path):
    board = fake_sysfs(tmp_path / "board", capacity=RK3588_CAPACITY)
    assert frontend_cpus(board, tmp_path / "none", allowed=range(8)) == ((4, 5, 6, 7), True)
    assert frontend_cpus(board, tmp_path / "none", allowed=[0, 1, 2, 3]) == ((0, 1, 2, 3), False)  # taskset to A55s
    assert frontend_cpus(board, tmp_path / "none", allowed=[4, 5]) == ((4, 5), False)  # already on big cores
    x86 = fake_sysfs(tmp_path / "x86", capacity=[1024] * 8)
    assert frontend_cpus(x86, tmp_path / "none", allowed=range(8)) == (tuple(range(8)), False)


def test_librkllmrt_gets_the_same_big_cores(tmp_path):
    board = fake_sysfs(tmp_path / "board", capacity=RK3588_CAPACITY)
    assert rkllm_cpus(board, tmp_path / "none") == (4, 5, 6, 7)
    odd = fake_sysfs(tmp_path / "odd", capacity=[1024] * 6, max_freq=[3000000] * 2 + [1000000] * 4, cpus_present=6)
    assert rkllm_cpus(odd, tmp_path / "none") == (0, 1)
    # where no core is told apart (x86, the C test double) the runtime still gets the RK3588's A76s
    assert rkllm_cpus(fake_sysfs(tmp_path / "x86", capacity=[1024] * 8), tmp_path / "none") == RK3588_BIG_CORES


def test_pool_threads_pin_themselves(monkeypatch):
    calls = []
    monkeypatch.setattr(cpus.os, "sched_setaffinity", lambda pid, mask: calls.append((pid, tuple(mask))))
    seen = []

    def worker():
        cpus._pin((4, 5, 6, 7), True)
        seen.append(cpus._in_pool.active)
        cpus._pin((0, 1), False)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert calls == [(0, (4, 5, 6, 7))] and seen == [True]  # pid 0: the calling thread only


def test_parallel_map_and_submit_keep_order_and_do_not_deadlock_in_the_pool():
    assert parallel_map(lambda x: x * x, range(20)) == [x * x for x in range(20)]
    nested = submit(lambda: parallel_map(lambda x: x + 1, range(5))).result(timeout=10)
    assert nested == [1, 2, 3, 4, 5]  # run inline from a pool thread
    inner = submit(lambda: submit(lambda: 7).result(timeout=10)).result(timeout=10)
    assert inner == 7
    with pytest.raises(ZeroDivisionError):
        submit(lambda: submit(lambda: 1 / 0).result()).result(timeout=10)
