"""board/serve.py's processes, in emulation: the NPU worker killed mid-stream (503s, restart, /health,
the next request served), the per-request time cap, /metrics, the graceful stop on SIGTERM, and
start-up failures that must be one line before (or instead of) loading the model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from board.bundle import Bundle  # noqa: E402
from board.serve import model_slug  # noqa: E402
from support import ROOT, ServerProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_serve_soak import soak  # noqa: E402

MAX_REQUEST_S = 4
CACHE_MB = 0.1  # six one-tile images of the tiny model


@pytest.fixture(scope="module")
def server(bundle):
    """One server for the module; its last test stops it with SIGTERM mid-answer."""
    proc = ServerProcess(bundle, "--max-queue", "4", "--max-request-s", str(MAX_REQUEST_S), "--shutdown-grace-s", "1",
                         "--vision-cache-mb", str(CACHE_MB), "--quiet")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def model(bundle):
    return model_slug(Bundle.open(bundle, verify=False).model_id)


def long_story(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 3000, "stream": stream}).encode()


class Stream:
    """A streamed request on a raw socket, read event by event."""

    def __init__(self, server, body: bytes):
        self.sock = socket.create_connection(server.address, timeout=60)
        self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.reader = self.sock.makefile("rb")
        assert b" 200 " in self.reader.readline()
        while self.reader.readline() not in (b"\r\n", b""):  # the headers
            pass

    def events(self):
        """The `data:` payloads until [DONE] (chunked framing skipped); not until the socket closes,
        which a keep-alive connection does only seconds later."""
        for line in self.reader:
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    yield payload
                    return
                yield json.loads(payload)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def wait_for(condition, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_killing_the_worker_mid_stream_is_503_then_a_restart(server, model):
    before = server.health().json
    stream = Stream(server, long_story(model, True))
    events = stream.events()
    assert next(events)["choices"][0]["delta"]["role"] == "assistant"
    queued: dict = {}
    waiting = threading.Thread(target=lambda: queued.update(answer=server.request(
        "POST", "/v1/chat/completions", long_story(model, False), timeout=120)))
    waiting.start()
    wait_for(lambda: server.health().json["queued"] == 1)
    os.kill(before["worker_pid"], signal.SIGKILL)  # what a segfault in librkllmrt would do
    rest = list(events)
    stream.close()
    assert rest[-1] == b"[DONE]" and rest[-2]["error"]["code"] == "worker_crashed", rest[-3:]
    waiting.join(60)
    answer = queued["answer"]
    assert answer.status == 503 and answer.json["error"]["code"] == "worker_crashed"
    assert int(answer.headers["retry-after"]) >= 1
    during = server.health()
    assert during.status == 503 and during.json["status"] == "restarting" and "retry-after" in during.headers
    refused = server.request("POST", "/v1/chat/completions", long_story(model, False))
    assert refused.status == 503 and refused.json["error"]["code"] == "worker_restarting"
    wait_for(lambda: server.health().status == 200)
    after = server.health().json
    assert after["worker_restarts"] == before["worker_restarts"] + 1 and after["worker_pid"] != before["worker_pid"]
    ok = server.request("POST", "/v1/chat/completions", json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}).encode())
    assert ok.status == 200 and ok.json["choices"][0]["finish_reason"] in ("stop", "length")
    assert "NPU worker was restarted" in server.output()


def test_the_time_cap_ends_an_answer_like_max_tokens(bundle, model):
    """A server of its own with a 1 s cap: the tiny model writes the 3000 tokens asked for in under 4 s
    on a fast machine, so the module's 4 s cap did not always come first."""
    cap = 1.0
    proc = ServerProcess(bundle, "--max-request-s", str(cap), "--quiet").wait_ready()
    try:
        t0 = time.monotonic()
        answer = proc.request("POST", "/v1/chat/completions", long_story(model, False), timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        assert proc.stop() == 0, proc.output()
    assert answer.status == 200, answer.body
    assert answer.json["choices"][0]["finish_reason"] == "length"
    assert answer.json["usage"]["completion_tokens"] < 3000
    assert cap - 0.5 < elapsed < cap + 10, elapsed


def test_memory_levels_off_once_the_vision_cache_is_full(server):
    """The soak benchmark (scripts/bench_serve_soak.py), short: 10 distinct images through a cache that
    holds 6, so it is full and churning after a few requests; the worker's RSS must stop growing."""
    result = soak(*server.address, server.proc.pid, requests=30, images=10, every=5, tolerance_mb=8.0)
    assert result["statuses"] == {"200": 30} and result["worker_pid_unchanged"], result
    assert result["levels_off_at_request"] is not None and result["levels_off_at_request"] <= 15, result["samples"]
    assert result["server_rss_mb"]["last"] - result["server_rss_mb"]["first"] < 20, result["samples"]


def test_metrics_in_prometheus_text(server):
    answer = server.request("GET", "/metrics")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    text = answer.body.decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['smolvlm_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 2
    assert samples['smolvlm_http_requests_total{endpoint="/v1/chat/completions",status="503"}'] >= 2
    assert samples["smolvlm_worker_restarts_total"] == 1 and samples["smolvlm_worker_up"] == 1
    assert samples["smolvlm_queue_length"] == 0 and samples["smolvlm_completion_tokens_total"] > 0
    for stage in ("prefill", "decode", "total"):
        assert samples[f'smolvlm_stage_seconds_count{{stage="{stage}"}}'] >= 2, stage
    assert "smolvlm_queue_wait_seconds_bucket" in text


def test_sigterm_ends_the_running_stream_with_done_and_the_queue_with_503(server, model):
    """Last in the module: it stops the server."""
    stream = Stream(server, long_story(model, True))
    events = stream.events()
    next(events)
    queued: dict = {}
    waiting = threading.Thread(target=lambda: queued.update(answer=server.request(
        "POST", "/v1/chat/completions", long_story(model, False), timeout=60)))
    waiting.start()
    wait_for(lambda: server.health().json["queued"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(events)
    stream.close()
    waiting.join(60)
    assert rest[-1] == b"[DONE]" and rest[-2]["error"]["code"] == "server_shutting_down", rest[-3:]
    assert queued["answer"].status == 503 and queued["answer"].json["error"]["code"] == "server_shutting_down"
    assert "retry-after" in queued["answer"].headers
    assert server.proc.wait(60) == 0
    assert "Traceback" not in server.output(), server.output()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=5)


# -- start-up ----------------------------------------------------------------------------------------


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(ROOT / "board" / "serve.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


def test_a_busy_port_or_a_bad_address_fails_before_loading(bundle):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = _serve("--bundle", str(bundle), "--emulate", "--port", str(port), timeout=60)
    finally:
        taken.close()
    _one_error(result, f"cannot listen on 127.0.0.1:{port}")
    assert "bound to" not in result.stderr  # no worker was started
    _one_error(_serve("--bundle", str(bundle), "--emulate", "--host", "256.0.0.1", "--port", "0", timeout=60),
               "cannot listen on 256.0.0.1:0")


def test_a_malformed_manifest_is_one_line(bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["prompt_format"]["roles"] = 5
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = _serve("--bundle", str(broken), "--emulate", "--port", "0", timeout=60)
    _one_error(result, "manifest.prompt_format.roles")
    assert "bound to" not in result.stderr


def test_a_bundle_the_worker_cannot_load_ends_the_server_with_one_line(bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    onnx = next((broken / "host").rglob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")  # the sha256 check in the worker fails
    result = _serve("--bundle", str(broken), "--emulate", "--port", "0")
    _one_error(result, "does not match its checksum")
    assert "bound to" in result.stderr


def test_sigterm_while_loading_exits_0_at_once(bundle):
    proc = ServerProcess(bundle, "--quiet").wait_bound()
    assert proc.health().json["status"] == "loading"
    t0 = time.monotonic()
    assert proc.stop() == 0, proc.output()
    assert time.monotonic() - t0 < 10 and "Traceback" not in proc.output()


def test_vision_fallback_reaches_the_worker_or_fails_before_listening(bundle, tmp_path, monkeypatch):
    """--vision-fallback (what the board doctor may advise) is honoured by the server's worker; a bundle
    converted without the fallback model is refused in one line before the port opens. --embed-flash /
    --no-embed-flash reach the worker's spec the same way (None without either: the bundle's default)."""
    result = _serve("--bundle", str(bundle), "--emulate", "--vision-fallback", "--port", "0", timeout=60)
    _one_error(result, "no fallback vision model")
    assert "bound to" not in result.stderr

    from board import bundle_schema as S
    from board import serve

    with_fallback = tmp_path / "bundle"
    shutil.copytree(bundle, with_fallback)
    manifest = json.loads((with_fallback / "manifest.json").read_text())
    vision, F = manifest["vision"], S.VisionFallback
    # the server reads only the manifest before its worker starts: a fallback entry naming the main
    # model's files is enough to see where the option goes
    vision[S.Vision.FALLBACK] = {F.FILE: vision[S.Vision.FILE], F.ONNX: vision[S.Vision.ONNX], F.DTYPE: "fp16",
                                 F.LAYOUT: "conv"}
    (with_fallback / "manifest.json").write_text(json.dumps(manifest))
    specs = []

    class Refused:
        def __init__(self, config, spec, **kwargs):
            specs.append(spec)
            raise OSError("stop here")

    monkeypatch.setattr(serve, "Server", Refused)
    for flags, expected in (([], False), (["--vision-fallback"], True)):
        assert serve.main(["--bundle", str(with_fallback), "--emulate", "--port", "0", *flags]) == 1
        assert specs[-1].vision_fallback is expected
    for flags, expected in (([], None), (["--embed-flash"], True), (["--no-embed-flash"], False)):
        assert serve.main(["--bundle", str(with_fallback), "--emulate", "--port", "0", *flags]) == 1
        assert specs[-1].embed_flash is expected
