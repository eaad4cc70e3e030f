"""The fleet recipe for real: scripts/fleet/haproxy.cfg in a real HAProxy in front of three emulated
board/serve.py servers on loopback ports, `python -m board batch --server` through it, and one server
killed in the middle of the batch (a board losing power). Every image must still get exactly one line
and all three servers must have answered some (HAProxy's own statistics say which). That the lines a
server writes equal the pipeline's answers, and that retries never mix images up, is checked in
tests/test_batch.py. Skipped, with the reason, where the haproxy binary is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from support import ROOT, write_image  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts" / "fleet"))
import local_fleet  # noqa: E402

if local_fleet.haproxy_binary() is None:
    pytest.skip("haproxy is not installed (scripts/setup.sh installs it with apt-get where it can; "
                "or apt-get install haproxy)", allow_module_level=True)

Q = "Describe this image."
N_IMAGES, MAX_NEW = 24, 8


def test_template_is_valid_haproxy_config():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}  # the template's own defaults
    done = subprocess.run([local_fleet.haproxy_binary(), "-c", "-f", str(local_fleet.TEMPLATE)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = local_fleet.render_config(local_fleet.TEMPLATE.read_text(), [("board1", "127.0.0.1:1")])
    assert rendered.count("\n    server board") == 1 and "server board1 127.0.0.1:1\n" in rendered


def test_batch_through_haproxy_survives_a_server_dying(bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        write_image(folder / f"img{i:02d}.png", 80 + i, 100, 100 + i)
    out = tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with local_fleet.LocalFleet(bundle, 3) as fleet:
        proc = subprocess.Popen(
            [sys.executable, "-m", "board", "batch", "--server", fleet.url, "--concurrency", "6", "--images",
             str(folder), "--prompt", Q, "--out", str(out), "--max-tiles", "1", "--max-new-tokens", str(MAX_NEW)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # all three have answered at least once and most of the batch is still to come: pull one's plug
            fleet.wait_until(lambda stats: all(int(s["hrsp_2xx"] or 0) >= 1 for s in stats.values()),
                             "every server answering", timeout=180)
            done_at_kill = out.read_text().count("\n") if out.exists() else 0
            assert done_at_kill < N_IMAGES - 6, "the batch was nearly done before the kill: make it longer"
            fleet.kill("board2")
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stderr
        stats = fleet.wait_until(lambda s: s["board2"]["status"].startswith("DOWN"), "board2 DOWN in HAProxy")
    served = {name: int(s["hrsp_2xx"] or 0) for name, s in stats.items()}
    assert set(served) == {"board1", "board2", "board3"} and all(n >= 1 for n in served.values()), served

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == [f"img{i:02d}.png" for i in range(N_IMAGES)]  # one line each
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") and r["answer"] is not None
               and r["settings"]["max_new_tokens"] == MAX_NEW for r in records)
    print(f"served per board: {served}; lines at the kill: {done_at_kill}; {stderr.strip().splitlines()[-1]}")
