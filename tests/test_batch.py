"""`python -m board batch`: one line per image, resumable and lossless, locally and against a server.

The answers a batch writes must be what the pipeline answers for the same image and settings (greedy),
whether asked here, through board/serve.py, or after an interrupted run was resumed. The server-mode
retry rules are checked against a scripted HTTP server (503 + Retry-After, 502, 401, a wrong model)
and against a real board/serve.py with a one-request queue, which answers 503 when it is full.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from board import batch  # noqa: E402
from board.batch import BatchError, ImageItem, LocalRunner, Results, list_images, make_record, run_batch  # noqa: E402
from board.decoder import SamplingParams  # noqa: E402
from board.errors import ImageError  # noqa: E402
from board.image_io import load_image  # noqa: E402
from board.openai_schemas import model_slug  # noqa: E402
from board.pipeline import Pipeline  # noqa: E402
from support import ROOT, write_image  # noqa: E402

Q = "What is in this image?"
MAX_NEW = 6
IMAGES = ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "sub/deeper/f.png"]


@pytest.fixture(scope="module")
def pipeline(bundle):
    with Pipeline(bundle, emulate=True) as p:
        yield p


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six distinct images (two in subfolders), a broken .jpg, a non-image and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    for i, rel in enumerate(IMAGES):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(root / rel, 90 + 7 * i, 120, 10 + i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".thumb.png", 20, 20, 99)
    return root


@pytest.fixture(scope="module")
def expected(pipeline, folder):
    """What the pipeline answers for each image, as a batch line shows it (one tile, MAX_NEW tokens)."""
    out = {}
    for rel in IMAGES:
        answer = pipeline.ask(Q, [str(folder / rel)], sampling=SamplingParams(max_new_tokens=MAX_NEW),
                              max_tiles=1).collect()
        out[rel] = answer.text[1:] if answer.text.startswith(" ") else answer.text
    try:
        load_image(folder / "broken.jpg")
    except ImageError as err:
        out["broken.jpg"] = batch.one_line(err)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_complete(path: Path, expected: dict, model: str) -> None:
    """Exactly one line per image; the broken file's line carries the loader's error; answers equal the pipeline's."""
    records = lines(path)
    assert sorted(r["image"] for r in records) == sorted(expected)
    for r in records:
        assert r["settings"] == {"model": model, "prompt": Q, "max_tiles": 1, "max_new_tokens": MAX_NEW}
        if r["image"] == "broken.jpg":
            assert r["answer"] is None and r["error"] == expected["broken.jpg"]
        else:
            assert r["error"] is None and r["answer"] == expected[r["image"]], r
            assert r["finish_reason"] in ("stop", "length") and r["tiles"] == 1
            assert r["tokens"]["completion"] >= 1 and r["ms"]["total"] > 0


def batch_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-m", "board", "batch", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# -- listing and the output file (no model) -----------------------------------------------------


def test_list_images_folder_glob_and_file(folder):
    items, ignored = list_images(str(folder))
    assert [i.rel for i in items] == sorted(IMAGES + ["broken.jpg"])  # recursive, hidden left out
    assert ignored == 1  # notes.txt
    assert items[0].size == (folder / items[0].rel).stat().st_size
    globbed, _ = list_images(str(folder / "**" / "*.png"))
    assert [i.rel for i in globbed] == sorted(IMAGES)  # relative to the glob's fixed part
    single, _ = list_images(str(folder / "sub" / "e.png"))
    assert [i.rel for i in single] == ["e.png"]
    with pytest.raises(BatchError, match="no such folder"):
        list_images(str(folder / "missing"))


def test_results_file_rules(tmp_path):
    item = ImageItem(tmp_path / "x.png", "x.png", 10, 123)
    settings = {"model": "m", "prompt": Q, "max_tiles": None, "max_new_tokens": 8}
    whole = json.dumps(make_record(item, settings, answer="a cat", finish_reason="stop"))
    out = tmp_path / "r.jsonl"

    out.write_text(whole + "\n" + whole[:25])  # a crash while writing the second line
    results = Results(out)
    assert len(results.records) == 1 and "cut short" in results.notices[0]
    assert out.read_text() == whole + "\n"  # the cut-short line is gone, the whole one untouched
    assert results.done_keys(settings) == {("x.png", 10, 123)}
    assert results.done_keys({**settings, "prompt": "other"}) == set()
    with pytest.raises(BatchError, match="prompt 'What is in this image.' \\(this run: 'other'\\).*--force") as err:
        results.check_settings({**settings, "prompt": "other"})
    assert err.value.status == batch.EXIT_USAGE
    results.check_settings({**settings, "model": None}, ignore=("model",))

    with pytest.raises(BatchError, match="vision_fallback None \\(this run: True\\)"):
        results.check_settings({**settings, "vision_fallback": True})  # another vision model: other answers
    assert results.done_keys({**settings, "vision_fallback": True}) == set()

    out.write_text(whole)  # a whole last line without its newline (edited by hand) is kept
    assert len(Results(out).records) == 1 and out.read_text() == whole + "\n"

    out.write_text(whole + "\nnot json\n" + whole + "\n")
    with pytest.raises(BatchError, match="line 2 is not a batch result"):
        Results(out)
    out.write_text('{"some": "other file"}\n')
    with pytest.raises(BatchError, match="line 1 is not a batch result"):
        Results(out)


def test_help_explains():
    done = subprocess.run([sys.executable, "-m", "board", "batch", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for words in ("FOLDER_OR_GLOB", "--server", "--concurrency", "Retry-After", "Resuming", "--force", "Exit status"):
        assert words in done.stdout
    listed = subprocess.run([sys.executable, "-m", "board", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "python -m board batch" in listed.stdout


def test_vision_fallback_is_a_local_option_the_bundle_must_have(bundle, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    refused = subprocess.run([sys.executable, "-m", "board", "batch", "--server", "http://127.0.0.1:9",
                              "--vision-fallback", "--images", str(folder), "--prompt", Q, "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == batch.EXIT_USAGE and "--vision-fallback goes with --bundle" in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "board", "batch", "--bundle", str(bundle), "--emulate",
                              "--vision-fallback", "--images", str(folder), "--prompt", Q, "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == batch.EXIT_ERROR and "Traceback" not in missing.stderr
    assert "no fallback vision model" in missing.stderr and not out.exists()


# -- on this machine --------------------------------------------------------------------------


def test_local_batch_and_force(pipeline, folder, expected, tmp_path):
    items, _ = list_images(str(folder))
    out = tmp_path / "r.jsonl"
    settings = {"model": pipeline.bundle.model_id, "prompt": Q, "max_tiles": 1, "max_new_tokens": MAX_NEW}
    runner = LocalRunner(pipeline, Q, max_tiles=1, max_new_tokens=MAX_NEW)
    results = Results(out)
    summary = run_batch(runner, items, results, settings)
    results.close()
    assert (summary.answered, summary.errors, summary.left, summary.interrupted) == (6, 1, 0, False)
    check_complete(out, expected, pipeline.bundle.model_id)

    again = Results(out)  # the same settings: nothing left to do, nothing written
    assert run_batch(runner, items, again, settings).skipped == 7
    assert len(lines(out)) == 7

    other = {**settings, "prompt": "Describe it."}  # what --force does: the old lines stay, new ones appended
    first = out.read_bytes()
    forced = Results(out)
    runner = LocalRunner(pipeline, "Describe it.", max_tiles=1, max_new_tokens=MAX_NEW)
    summary = run_batch(runner, items, forced, other)
    forced.close()
    assert summary.answered == 6 and out.read_bytes().startswith(first)
    assert sorted(r["image"] for r in lines(out) if r["settings"] == other) == sorted(expected)


def test_cli_interrupt_resume_and_prompt_refusal(bundle, folder, expected, pipeline, tmp_path):
    """Ctrl-C stops after the current image with whole lines; a crash's half line is redone; the rerun
    appends exactly the missing images; another prompt into the same file is refused."""
    out = tmp_path / "r.jsonl"
    args = ["--bundle", str(bundle), "--emulate", "--images", str(folder), "--prompt", Q, "--out", str(out),
            "--max-tiles", "1", "--max-new-tokens", str(MAX_NEW)]
    proc = batch_cli(*args)
    deadline = time.monotonic() + 180
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == batch.EXIT_INTERRUPTED, stderr
    assert "stopping after the image(s) in progress" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    first = out.read_bytes()
    done_first = lines(out)
    assert first.endswith(b"\n") and 2 <= len(done_first) < 7

    with open(out, "ab") as f:  # what a crash mid-write leaves behind
        f.write(b'{"image": "sub/e.png", "answer": "half')
    proc = batch_cli(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "cut short" in stderr and f"{len(done_first)} already in" in stderr
    assert out.read_bytes().startswith(first)  # the first run's lines are untouched
    check_complete(out, expected, pipeline.bundle.model_id)

    before = out.read_bytes()
    proc = batch_cli(*[a if a != Q else "Describe it." for a in args])
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == batch.EXIT_USAGE
    assert "other settings" in stderr and "--force" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == before


# -- against a server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_server(bundle):
    """board/serve.py --emulate with a one-request queue: more than two requests at once get 503."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "board" / "serve.py"), "--bundle", str(bundle), "--emulate",
                             "--port", "0", "--max-queue", "1", "--quiet"], stderr=subprocess.PIPE, text=True, env=env)
    output: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            output.append(line)
            if "listening on http://" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(output))
    url = next(line for line in output if "listening on" in line).split("listening on ")[1].split()[0]
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def test_server_mode_retries_busy_and_equals_local(busy_server, folder, expected, pipeline, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    status = batch.main(["--server", busy_server + "/v1", "--concurrency", "4", "--images", str(folder), "--prompt", Q,
                         "--out", str(out), "--max-tiles", "1", "--max-new-tokens", str(MAX_NEW)])
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    check_complete(out, expected, model_slug(pipeline.bundle.model_id))  # the server names its model by the slug
    busy = int(stderr.split("retried ")[1].split(" busy")[0])
    assert busy >= 1, stderr  # four in flight, one running + one queued: the server said 503 and we retried
    assert all("request" in r["ms"] for r in lines(out) if r["error"] is None)


class Scripted(BaseHTTPRequestHandler):
    """An OpenAI-shaped server whose POST answers follow `server.script` (then 200): each answer is the
    sha256 of the image it was sent, so a line can be matched to its image."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        with self.server.lock:
            self.server.log.append((time.monotonic(), digest))
            step = self.server.script.pop(0) if self.server.script else None
        time.sleep(self.server.delay)
        if step is not None and step[0] != 200:
            status, headers = step
            self._send(status, {"error": {"message": f"scripted {status}", "type": "server_error", "param": None,
                                          "code": None}}, headers)
            return
        self._send(200, {"id": "x", "object": "chat.completion", "model": self.server.model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": digest},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    server.lock, server.log, server.script, server.model = threading.Lock(), [], [], "scripted-model"
    server.delay = 0.0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(server=server, url=f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def scripted_batch(scripted, folder, out, *extra: str) -> int:
    return batch.main(["--server", scripted.url, "--images", str(folder), "--prompt", Q, "--out", str(out),
                       "--max-new-tokens", "4", *extra])


def test_server_mode_honours_retry_after_and_retries_5xx(scripted, folder, expected, tmp_path, capsys):
    scripted.server.script = [(503, {"Retry-After": "1"}), (502, {})]
    out = tmp_path / "r.jsonl"
    assert scripted_batch(scripted, folder, out, "--concurrency", "1", "--retries", "1") == 0
    stderr = capsys.readouterr().err
    assert "retried 1 busy (503/429), 1 failed" in stderr
    records = {r["image"]: r for r in lines(out)}
    assert sorted(records) == sorted(expected)
    assert records["broken.jpg"]["error"] == expected["broken.jpg"]  # decoded here, same line as locally
    for rel in IMAGES:  # every line holds its own image's answer
        data = (folder / rel).read_bytes()
        url = f"data:{mimetypes.guess_type(rel)[0]};base64,{base64.b64encode(data).decode()}"
        assert records[rel]["answer"] == hashlib.sha256(url.encode()).hexdigest()[:16]
        assert records[rel]["settings"]["model"] == "scripted-model" and records[rel]["tiles"] is None
    log = scripted.server.log
    assert log[0][1] == log[1][1] and log[1][0] - log[0][0] >= 0.95  # the 503's Retry-After: 1 was waited for
    assert log[1][1] == log[2][1]  # the 502 was retried for the same image
    assert len(log) == len(IMAGES) + 2


def test_server_mode_gives_up_and_stops_cleanly(scripted, folder, tmp_path, capsys):
    scripted.server.script = [(200, None), (500, {}), (500, {})]
    out = tmp_path / "r.jsonl"
    assert scripted_batch(scripted, folder, out, "--concurrency", "1", "--retries", "1") == batch.EXIT_ERROR
    stderr = capsys.readouterr().err
    assert "answered 500 for b.png: scripted 500 (failed 2 times in a row" in stderr
    assert "Traceback" not in stderr and "rerun the same command" in stderr
    assert [r["image"] for r in lines(out)] == ["a.png"]  # what was done before the failure stays

    scripted.server.script = [(401, {})]  # a refusal that every image would get: stop at once
    assert scripted_batch(scripted, folder, out, "--concurrency", "1") == batch.EXIT_ERROR
    assert "refused b.png (401): scripted 401" in capsys.readouterr().err

    scripted.server.model = "another-model"  # boards with different bundles behind one address
    assert scripted_batch(scripted, folder, out, "--concurrency", "2") == batch.EXIT_ERROR
    assert "with model 'another-model', not 'scripted-model'" in capsys.readouterr().err
    assert [r["image"] for r in lines(out) if r["error"] is None] == ["a.png"]


def test_server_mode_ctrl_c_keeps_answers_in_flight(scripted, folder, expected, tmp_path, capsys):
    """Ctrl-C with two requests in flight: both answers are written, nothing else; the rerun does the rest."""
    scripted.server.delay = 0.4
    out = tmp_path / "r.jsonl"

    def interrupt_after_first_answer() -> None:
        while not (out.exists() and out.read_text().count('"error": null') >= 1):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_answer, daemon=True).start()
    assert scripted_batch(scripted, folder, out, "--concurrency", "2") == batch.EXIT_INTERRUPTED
    assert "stopping after the image(s) in progress" in capsys.readouterr().err
    first = lines(out)
    asked = len(scripted.server.log)
    assert len(first) < len(expected) and asked == sum(r["error"] is None for r in first)  # none lost in flight
    scripted.server.delay = 0.0
    assert scripted_batch(scripted, folder, out, "--concurrency", "2") == 0
    assert sorted(r["image"] for r in lines(out)) == sorted(expected)  # each image once
    assert len(scripted.server.log) == asked + len(IMAGES) - sum(r["error"] is None for r in first)


def test_server_mode_arguments(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        batch.main(["--server", "http://127.0.0.1:9", "--images", str(folder), "--prompt", Q, "--out",
                    str(tmp_path / "r.jsonl"), "--max-tiles", "5"])
    assert "--max-tiles can only be 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unquoted glob the shell expanded
        batch.main(["--server", "http://127.0.0.1:9", "--images", "a.png", "b.png", "--prompt", Q, "--out", "r"])
    assert "quote it" in capsys.readouterr().err
    status = batch.main(["--server", "http://127.0.0.1:9", "--retries", "0", "--images", str(folder), "--prompt", Q,
                         "--out", str(tmp_path / "r.jsonl")])
    assert status == batch.EXIT_ERROR and "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
