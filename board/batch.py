"""`python -m board batch`: ask one question about every image of a folder; one JSON line per image.

    python -m board batch --bundle ~/smolvlm-256m --images ~/photos --prompt "Describe this image." --out photos.jsonl
    python -m board batch --bundle out/bundle --emulate --images 'scans/**/*.png' --prompt "..." --out scans.jsonl
    python -m board batch --server http://127.0.0.1:8000 --concurrency 6 --images ~/photos --prompt "..." \
        --out photos.jsonl

Each line: `image` (the path relative to the folder, or to the glob's fixed part), `answer`,
`finish_reason` (stop | length), `tiles`, `ms` (per-stage milliseconds), `tokens`, `error` (null, or
why the file could not be read: such a file gets its line and the batch goes on), then what the
line is keyed by: `size`, `mtime_ns` and `settings` (model, prompt, max_tiles, max_new_tokens, and
vision_fallback when it is used).

Why it is safe to stop and rerun: each line is appended (one write, flushed and fsynced) as its image
finishes, so the file only ever holds whole answers; a rerun skips the images whose path, size and
mtime already have a line made with the same settings and does the rest. A last line cut short by a
crash is dropped and its image done again. Ctrl-C stops after the image(s) in progress (a second
Ctrl-C abandons them). Rerunning into the same file with another prompt, model or limit is refused
(each line records its settings): use another --out, or --force to answer again, appended.

With --server the same work goes to an OpenAI-compatible endpoint (board/serve.py, or HAProxy in
front of several boards: scripts/fleet/haproxy.cfg) with --concurrency requests in flight. It uses
only the OpenAI HTTP API: GET /v1/models, then POST /v1/chat/completions with the image as a base64
data: URL, greedy (temperature 0). Images are decoded here first with the board's own loader, so an
unreadable file gets the same error line as without --server; 503/429 are retried after the
Retry-After the server sends, connection failures and other 5xx up to --retries times; any other
refusal (4xx) stops the batch with the server's message, since it would refuse every image alike.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import glob
import http.client
import json
import mimetypes
import os
import queue
import signal
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlparse

from tqdm import tqdm

from board.errors import ImageError, InputError, SmolVLMError
from board.image_io import load_image, read_bytes
from board.openai_schemas import API_KEY_ENV
from board.prompt import drop_leading_space
from board.tiles import check_tile_budget
from board.vision import NPU_CORE_MODES

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# What a folder is searched for (a glob takes whatever it matches): the formats board.image_io reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SETTING_KEYS = ("model", "prompt", "max_tiles", "max_new_tokens", "vision_fallback")  # the last only when set
MAX_RETRY_AFTER_S = 60.0


class BatchError(Exception):
    """A failure that stops the batch (the lines written so far stay); `status` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR):
        super().__init__(message)
        self.status = status


def one_line(err: BaseException) -> str:
    """An error's message (and hint) on one line, as it goes into a JSON line and onto stderr."""
    return " ".join(str(err).split())


# -- the images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    path: Path
    rel: str  # the path relative to the folder (or the glob's fixed part), with '/' separators
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.rel, self.size, self.mtime_ns)


def _glob_root(pattern: str) -> Path:
    """The fixed folder a glob starts from: its leading parts without wildcards."""
    fixed: list[str] = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def list_images(spec: str) -> tuple[list[ImageItem], int]:
    """The images a --images argument names, sorted by relative path, and how many files a folder
    held that are not images by their suffix (ignored). A folder is searched recursively, hidden
    files and folders left out; a glob (** for any depth) or a single file is taken as it is."""
    given = Path(spec).expanduser()
    ignored = 0
    if given.is_dir():
        root, files = given, []
        for folder, dirs, names in os.walk(given):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    files.append(Path(folder) / name)
                else:
                    ignored += 1
    elif glob.has_magic(spec):
        pattern = str(given)
        root = _glob_root(pattern)
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    elif given.is_file():
        root, files = given.parent, [given]
    else:
        raise BatchError(f"--images {spec}: no such folder or file (a glob needs quotes: --images 'photos/*.jpg')",
                         EXIT_USAGE)
    items = []
    for path in files:
        st = path.stat()
        items.append(ImageItem(path, path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(items, key=lambda item: item.rel), ignored


# -- the output file --------------------------------------------------------------------------


def make_record(item: ImageItem, settings: dict[str, Any], *, answer: Optional[str] = None,
                finish_reason: Optional[str] = None, tiles: Optional[int] = None,
                ms: Optional[dict[str, float]] = None, tokens: Optional[dict[str, int]] = None,
                error: Optional[str] = None) -> dict[str, Any]:
    """One output line (the same keys with and without --server, and for a file that could not be read)."""
    return {"image": item.rel, "answer": answer, "finish_reason": finish_reason, "tiles": tiles, "ms": ms or {},
            "tokens": tokens or {}, "error": error, "size": item.size, "mtime_ns": item.mtime_ns,
            "settings": settings}


def _is_record(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("image"), str) and isinstance(value.get("settings"), dict)
            and isinstance(value.get("size"), int) and isinstance(value.get("mtime_ns"), int))


class Results:
    """The JSONL output: the lines it already holds (read once, a crash's cut-short last line dropped)
    and lossless appends (one write per line, flushed and fsynced before the next image counts as done)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.notices: list[str] = []
        self._fd: Optional[int] = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise BatchError(f"--out {self.path} is not a file", EXIT_USAGE)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise BatchError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        keep = 0  # bytes of the file that are whole lines
        lines = data.split(b"\n")
        for number, line in enumerate(lines, 1):
            last = number == len(lines)
            if last and not line:
                break
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = False
            if record is None:  # a blank line
                keep += len(line) + (0 if last else 1)
                continue
            if record is False and not any(rest.strip() for rest in lines[number:]):
                self.notices.append(f"{self.path}: the last line was cut short (a run stopped while writing it); "
                                    "it is dropped and its image done again")
                break
            if not _is_record(record):
                raise BatchError(f"{self.path}: line {number} is not a batch result; is this the output of "
                                 "`python -m board batch`? (use another --out)")
            self.records.append(record)
            keep += len(line) + (0 if last else 1)
        try:
            if keep < len(data):
                os.truncate(self.path, keep)
            elif data and not data.endswith(b"\n"):  # a whole last line without its newline (edited by hand)
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        except OSError as exc:
            raise BatchError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    def done_keys(self, settings: dict[str, Any]) -> set[tuple[str, int, int]]:
        return {(r["image"], r["size"], r["mtime_ns"]) for r in self.records if r["settings"] == settings}

    def check_settings(self, settings: dict[str, Any], *, ignore: Sequence[str] = ()) -> None:
        """Refuse a file holding lines made with other settings (those in `ignore` not compared yet)."""
        for record in self.records:
            theirs = record["settings"]
            differ = [k for k in SETTING_KEYS if k not in ignore and theirs.get(k) != settings.get(k)]
            if differ:
                said = ", ".join(f"{k} {theirs.get(k)!r} (this run: {settings.get(k)!r})" for k in differ)
                raise BatchError(
                    f"{self.path} holds answers made with other settings: {said}. Use another --out, or --force "
                    "to answer every image again with these settings (appended; each line names its settings)",
                    EXIT_USAGE)

    def append(self, record: dict[str, Any]) -> None:
        try:
            text = json.dumps(record, ensure_ascii=False) + "\n"
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in an answer: escape it rather than lose the line
            data = (json.dumps(record) + "\n").encode("ascii")
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            raise BatchError(f"cannot write to {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# -- answering: on this machine ---------------------------------------------------------------


def _ms(timings: dict[str, Any]) -> dict[str, float]:
    """Per-stage milliseconds from the pipeline's Timings (as a dict): the stages that are there."""
    stages = {"image_decode": "image_decode_ms", "tiles": "tiles_ms", "vision": "vision_ms",
              "sequence": "sequence_ms", "prefill": "prefill_ms", "decode": "decode_ms", "ttft": "ttft_ms",
              "total": "total_ms"}
    return {name: timings[key] for name, key in stages.items() if isinstance(timings.get(key), (int, float))}


class LocalRunner:
    """Answers with a Pipeline in this process (the board's NPU, or --emulate), one image at a time."""

    concurrency = 1

    def __init__(self, pipeline: Any, prompt: str, *, max_tiles: Optional[int], max_new_tokens: int):
        from board.decoder import SamplingParams

        self.pipeline = pipeline
        self.prompt = prompt
        self.max_tiles = max_tiles
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens)
        self.model = pipeline.bundle.model_id
        self.describe = f"{self.model} ({'emulate' if pipeline.emulate else 'npu'})"

    def answer(self, item: ImageItem, settings: dict[str, Any], halt: threading.Event) -> Optional[dict[str, Any]]:
        """The image's line, or None when the answer was aborted (a second Ctrl-C): nothing is written."""
        try:
            answer = self.pipeline.ask(self.prompt, [str(item.path)], sampling=self.sampling,
                                       max_tiles=self.max_tiles).collect()
        except InputError as err:
            return make_record(item, settings, error=one_line(err))
        if answer.finish_reason == "abort":
            return None
        text = drop_leading_space(answer.text)  # as the server and the chat history show it
        timings = answer.timings.to_dict()
        return make_record(item, settings, answer=text, finish_reason=answer.finish_reason,
                           tiles=answer.tiles_per_image[0] if answer.tiles_per_image else None, ms=_ms(timings),
                           tokens={"prompt": timings["prompt_tokens"], "completion": len(answer.token_ids)})

    def abort(self) -> None:
        self.pipeline.abort()


# -- answering: against a server --------------------------------------------------------------


class _Abandoned(Exception):
    """The batch is stopping: this image is left for the next run."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def message(self) -> str:
        """The server's explanation: OpenAI's error.message, or the start of the body."""
        body = self.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
            return str(body["error"]["message"])
        text = self.body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200] or http.client.responses.get(self.status, "")


def retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), at most MAX_RETRY_AFTER_S."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class ServerClient:
    """HTTP to one OpenAI-compatible base URL; one kept-alive connection per thread."""

    def __init__(self, url: str, *, api_key: Optional[str], timeout: float):
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise BatchError(f"--server {url}: give an http(s) URL such as http://127.0.0.1:8080", EXIT_USAGE)
        self.url = url
        self._connection_class = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parsed.hostname, parsed.port
        base = parsed.path.rstrip("/")
        self.api = (base[:-3] if base.endswith("/v1") else base) + "/v1"  # the URL with or without its /v1
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._local = threading.local()

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> Response:
        """One request; a kept-alive connection the server had closed is reopened once, silently."""
        for attempt in (0, 1):
            connection = getattr(self._local, "connection", None)
            reused = connection is not None
            if connection is None:
                connection = self._connection_class(self._host, self._port, timeout=self.timeout)
                self._local.connection = connection
            try:
                connection.request(method, path, body=body, headers=self._headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if reused and attempt == 0:
                    continue
                raise
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                self._local.connection = None
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        raise AssertionError("unreachable")


class ServerRunner:
    """Answers through an OpenAI-compatible server, `concurrency` requests at a time."""

    def __init__(self, client: ServerClient, prompt: str, *, max_tiles: Optional[int], max_new_tokens: int,
                 concurrency: int, retries: int, model: Optional[str] = None):
        self.client = client
        self.prompt = prompt
        self.max_tiles = max_tiles
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        self.retries = retries
        self.counts = {"busy": 0, "failed": 0}  # 503/429 answers, and failed attempts that were retried
        self._counts_lock = threading.Lock()
        self.model = model or self._server_model()
        self.describe = f"{self.model} at {client.url}"

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self.counts[name] += 1

    def _send(self, method: str, path: str, body: Optional[bytes], halt: threading.Event, what: str) -> Response:
        """A request retried as the server asks: 503/429 after Retry-After (for as long as they last), a
        connection failure or another 5xx up to --retries times with a growing pause; any other answer returned."""
        failures = busy = 0
        while True:
            if halt.is_set():
                raise _Abandoned
            try:
                response = self.client.request(method, path, body)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"cannot reach {self.client.url}: {one_line(exc) or type(exc).__name__}"
                delay = None
            else:
                if response.status in (429, 503):
                    self._count("busy")
                    busy += 1
                    wait = retry_after(response.headers.get("retry-after"))
                    halt.wait(wait if wait is not None else min(2.0 ** min(busy - 1, 5), 30.0))
                    continue
                if response.status < 500 and response.status != 408:  # 408: a proxy's timeout, worth a retry
                    return response
                problem = f"the server answered {response.status} for {what}: {response.message()}"
                delay = retry_after(response.headers.get("retry-after"))
            failures += 1
            if failures > self.retries:
                raise BatchError(f"{problem} (failed {failures} time{'s' if failures > 1 else ''} in a row; "
                                 "rerun the same command to continue)")
            self._count("failed")
            halt.wait(delay if delay is not None else min(2.0 ** (failures - 1), 30.0))

    def _server_model(self) -> str:
        response = self._send("GET", f"{self.client.api}/models", None, threading.Event(), "GET /v1/models")
        body = response.json()
        if response.status != 200:
            raise BatchError(f"the server refused GET /v1/models ({response.status}): {response.message()}")
        try:
            return str(body["data"][0]["id"])
        except (TypeError, KeyError, IndexError):
            raise BatchError(f"{self.client.url} did not list a model at /v1/models; is it an OpenAI-compatible "
                             "server? (or give --model)") from None

    def request_body(self, data: bytes, item: ImageItem) -> bytes:
        mime = mimetypes.guess_type(item.path.name)[0] or "application/octet-stream"
        image_url: dict[str, str] = {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}
        if self.max_tiles == 1:
            image_url["detail"] = "low"  # the API's way to ask for one tile (no splitting)
        return json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": self.max_new_tokens, "stream": False,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                                      {"type": "text", "text": self.prompt}]}],
        }).encode()

    def answer(self, item: ImageItem, settings: dict[str, Any], halt: threading.Event) -> Optional[dict[str, Any]]:
        try:  # decoded here first, so an unreadable file gets the same line as without --server
            data = read_bytes(item.path)
            load_image(data)
        except ImageError as err:
            return make_record(item, settings, error=one_line(err))
        started = time.perf_counter()
        try:
            response = self._send("POST", f"{self.client.api}/chat/completions", self.request_body(data, item), halt,
                                  item.rel)
        except _Abandoned:
            return None
        request_ms = round((time.perf_counter() - started) * 1e3, 2)
        if response.status != 200:
            raise BatchError(f"the server refused {item.rel} ({response.status}): {response.message()}")
        body = response.json()
        try:
            choice = body["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
        except (TypeError, KeyError, IndexError):
            raise BatchError(f"the server's answer for {item.rel} is not an OpenAI chat completion") from None
        if body.get("model") not in (None, self.model):
            raise BatchError(f"the server answered {item.rel} with model '{body['model']}', not '{self.model}' "
                             "(boards with different bundles behind one address?)")
        timings = body.get("timings") if isinstance(body.get("timings"), dict) else {}  # this project's extension
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        tokens = {name: usage[key] for name, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens"))
                  if isinstance(usage.get(key), int)}
        tiles = timings.get("tiles")
        return make_record(item, settings, answer=text, finish_reason=finish,
                           tiles=tiles if isinstance(tiles, int) else None, ms={**_ms(timings), "request": request_ms},
                           tokens=tokens)

    def abort(self) -> None:
        pass  # requests in flight are abandoned when the process exits


# -- the batch --------------------------------------------------------------------------------


class Stop:
    """Ctrl-C (or SIGTERM): the first stops taking new images, the second abandons those in progress."""

    def __init__(self, runner: Any, say: Callable[[str], None]):
        self.runner = runner
        self.say = say
        self.halt = threading.Event()  # no new images (also set by a fatal error)
        self.now = threading.Event()  # abandon the images in progress
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.halt.is_set():
            self.halt.set()
            self.say("stopping after the image(s) in progress (Ctrl-C again to abandon them)")
        else:
            self.now.set()
            self.runner.abort()

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class Summary:
    answered: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output
    left: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_min(self) -> float:
        done = self.answered + self.errors
        return 60.0 * done / self.seconds if self.seconds > 0 else 0.0


def run_batch(runner: Any, items: Sequence[ImageItem], results: Results, settings: dict[str, Any], *,
              progress: bool = False, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Summary:
    """Answer every image of `items` that `results` does not hold yet, appending one line per image.
    Raises BatchError for a failure that stops the batch (the summary so far is on the exception)."""
    done = results.done_keys(settings)
    todo = [item for item in items if item.key not in done]
    summary = Summary(skipped=len(items) - len(todo), left=len(todo))
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True, disable=not progress,
               smoothing=0.1)
    stop = Stop(runner, lambda s: bar.write(s, file=sys.stderr) if progress else say(s))
    finished: "queue.Queue[tuple[ImageItem, Any]]" = queue.Queue()
    pending: "queue.Queue[ImageItem]" = queue.Queue()
    for item in todo:
        pending.put(item)

    def work() -> None:
        while not stop.halt.is_set():
            try:
                item = pending.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((item, runner.answer(item, settings, stop.halt)))
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, which decides
                finished.put((item, err))
                return

    def record(item: ImageItem, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            stop.halt.set()
            raise outcome if isinstance(outcome, (BatchError, SmolVLMError)) else BatchError(
                f"unexpected {type(outcome).__name__} on {item.rel}: {outcome}")
        if outcome is None:
            return
        results.append(outcome)
        summary.left -= 1
        if outcome["error"] is not None:
            summary.errors += 1
            (bar.write if progress else say)(f"error: {item.rel}: {outcome['error']}")
        else:
            summary.answered += 1
        bar.update(1)
        if summary.errors:
            bar.set_postfix(errors=summary.errors, refresh=False)

    started = time.perf_counter()
    failure: Optional[BaseException] = None
    try:
        with stop:
            if runner.concurrency == 1:  # in this thread: the pipeline is used where it was made
                while not stop.halt.is_set() and not pending.empty():
                    item = pending.get_nowait()
                    try:
                        outcome = runner.answer(item, settings, stop.halt)
                    except (BatchError, SmolVLMError) as err:
                        outcome = err
                    record(item, outcome)
            else:
                threads = [threading.Thread(target=work, name=f"batch-{i}", daemon=True)
                           for i in range(min(runner.concurrency, len(todo)))]
                for thread in threads:
                    thread.start()
                while not stop.now.is_set():
                    try:
                        record(*finished.get(timeout=0.2))
                    except queue.Empty:
                        if not any(thread.is_alive() for thread in threads) and finished.empty():
                            break
                    except BaseException as err:  # noqa: BLE001 - the others finish, then this is raised
                        failure = failure or err
                while not finished.empty():  # answers that arrived as the batch stopped are kept too
                    item, outcome = finished.get_nowait()
                    if not isinstance(outcome, BaseException):
                        record(item, outcome)
            summary.interrupted = stop.halt.is_set() and summary.left > 0 and failure is None
    except BaseException as err:
        failure = err
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    if failure is not None:
        failure.summary = summary  # type: ignore[attr-defined]
        raise failure
    return summary


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=textwrap.dedent("""\
            Ask one question about every image in a folder (or matching a glob) and write one JSON
            line per image to --out: on this board (--bundle), in x86 emulation (--bundle --emulate),
            or through an OpenAI-compatible server or a fleet of boards behind HAProxy (--server).
            Resumable: rerun the same command after a stop or a crash and only the missing images
            are done; every line that was written stays as it is."""),
        epilog=textwrap.dedent(f"""\
            Each line: image (relative path), answer, finish_reason (stop|length), tiles,
            ms (per-stage milliseconds), tokens, error (null, or why the file could not be read:
            it is reported, given its line, and the batch goes on), size, mtime_ns, settings.

            Resuming: images whose path, size and mtime already have a line with the same settings
            (model, prompt, --max-tiles, --max-new-tokens) are skipped; a changed file is done again
            (the newer line is last). A last line cut short by a crash is dropped and redone. Ctrl-C
            stops after the image(s) in progress; Ctrl-C again abandons them (left for the next run).
            A file made with other settings is refused unless --force.

            --server: images are decoded here first (an unreadable file gets the same error line),
            then sent as base64 data: URLs to POST /v1/chat/completions, greedy. 503/429 are retried
            after the server's Retry-After; connection failures and other 5xx --retries times; any
            other refusal stops the batch with the server's message. Key: --api-key or ${API_KEY_ENV}.

            Exit status: {EXIT_OK} every image has its line, {EXIT_ERROR} stopped by an error,
            {EXIT_USAGE} bad arguments or settings mismatch, {EXIT_INTERRUPTED} interrupted (rerun to continue)."""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", metavar="DIR", help="answer here with this bundle (made by host.convert)")
    where.add_argument("--server", metavar="URL", help="answer through this OpenAI-compatible server or load "
                       "balancer, e.g. http://127.0.0.1:8000 (with or without /v1)")
    parser.add_argument("--images", required=True, metavar="FOLDER_OR_GLOB",
                        help="a folder (searched recursively for .jpg .jpeg .png .webp .bmp .gif .tif .tiff; hidden "
                        "files left out), a quoted glob ('photos/**/*.jpg'), or one file")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the question asked about every image")
    parser.add_argument("--out", required=True, metavar="FILE", help="the JSON Lines file answers are appended to")
    parser.add_argument("--max-tiles", type=int, metavar="N", help="tile budget per image, global view included "
                        "(default: the model's full splitting; 1 = no splitting). With --server only 1 can be "
                        "asked per request (detail 'low'); otherwise the server's own --max-tiles applies")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length limit (512)")
    parser.add_argument("--force", action="store_true", help="--out holds lines made with other settings: answer "
                        "every image again with these, appended (the old lines stay)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="the progress bar on stderr (default: when stderr is a terminal)")
    local = parser.add_argument_group("with --bundle")
    local.add_argument("--emulate", action="store_true", help="x86 emulation (ONNX Runtime + PyTorch on the "
                       "bundle's host/ files)")
    local.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    local.add_argument("--npu-cores", choices=NPU_CORE_MODES, default="parallel",
                       help="vision NPU core mode (as board/run.py)")
    local.add_argument("--vision-fallback", action="store_true", help="the bundle's fallback vision model (fp16, "
                       "conv input layout) instead of the main one, as the board doctor may advise")
    remote = parser.add_argument_group("with --server")
    remote.add_argument("--concurrency", type=int, default=2, metavar="N", help="requests in flight (2: one "
                        "running, one uploaded and waiting; about 2 per board behind a load balancer)")
    remote.add_argument("--model", metavar="ID", help="the model id to ask for (default: the first in /v1/models)")
    remote.add_argument("--api-key", help=f"sent as 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")
    remote.add_argument("--retries", type=int, default=5, metavar="N", help="retries of a failed connection or "
                        "5xx answer per image, with 1, 2, 4... s pauses (5); 503/429 do not count")
    remote.add_argument("--timeout", type=float, default=600, metavar="S", help="seconds to wait for one "
                        "answer (600)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_new_tokens", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0 or args.timeout <= 0:
        parser.error("--retries must be 0 or more and --timeout positive")
    try:
        check_tile_budget(args.max_tiles)
    except InputError as err:
        parser.error(f"--max-tiles: {err}")
    if args.server and args.max_tiles not in (None, 1):
        parser.error("with --server, --max-tiles can only be 1 (the API's detail 'low'); the server's own "
                     "--max-tiles sets the budget otherwise")
    if args.bundle and (args.model or args.api_key):
        parser.error("--model and --api-key go with --server")
    if args.server and args.vision_fallback:
        parser.error("--vision-fallback goes with --bundle (a server chooses its vision model: serve.py "
                     "--vision-fallback)")
    if not args.prompt.strip():
        parser.error("--prompt is empty")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = (" (an unquoted glob? quote it: --images 'photos/*.jpg')"
                if any(not e.startswith("-") for e in extra) else "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    _check_args(parser, args)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results: Optional[Results] = None
    pipeline: Any = None
    try:
        items, ignored = list_images(args.images)
        if not items:
            raise BatchError(f"--images {args.images}: no images found", EXIT_USAGE)
        results = Results(Path(args.out).expanduser())
        for notice in results.notices:
            say(f"notice: {notice}")
        settings = {"model": None, "prompt": args.prompt, "max_tiles": args.max_tiles,
                    "max_new_tokens": args.max_new_tokens}
        if args.vision_fallback:  # only when set, so files written before the option still resume
            settings["vision_fallback"] = True
        if not args.force:
            results.check_settings(settings, ignore=("model",))  # before loading anything
        if args.server:
            client = ServerClient(args.server, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                                  timeout=args.timeout)
            runner: Any = ServerRunner(client, args.prompt, max_tiles=args.max_tiles,
                                       max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                                       retries=args.retries, model=args.model)
        else:
            if args.emulate:
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            from board.pipeline import Pipeline

            pipeline = Pipeline(args.bundle, emulate=args.emulate, verify=not args.no_verify,
                                npu_cores=args.npu_cores, max_tiles=args.max_tiles,
                                vision_fallback=args.vision_fallback)
            runner = LocalRunner(pipeline, args.prompt, max_tiles=args.max_tiles, max_new_tokens=args.max_new_tokens)
        settings["model"] = runner.model
        if not args.force:
            results.check_settings(settings)
        done = results.done_keys(settings)
        already = sum(item.key in done for item in items)
        others = f" ({ignored} other file{'s' if ignored > 1 else ''} ignored)" if ignored else ""
        say(f"batch: {len(items)} images in {args.images}{others}; {already} already in {args.out}, "
            f"{len(items) - already} to do; {runner.describe}")
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        try:
            summary = run_batch(runner, items, results, settings, progress=progress, say=say)
            status = EXIT_INTERRUPTED if summary.interrupted else EXIT_OK
        except (BatchError, SmolVLMError) as err:
            summary = err.summary  # type: ignore[attr-defined]
            say(f"error: {err}")
            status = err.status if isinstance(err, BatchError) else EXIT_ERROR
        _report(summary, args.out, getattr(runner, "counts", None), say)
        return status
    except BatchError as err:
        say(f"error: {err}")
        return err.status
    except SmolVLMError as err:
        say(f"error: {err}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        say("\n(interrupted)")
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not a user error: one line unless SMOLVLM_DEBUG asks for the traceback
        if os.environ.get("SMOLVLM_DEBUG"):
            raise
        say(f"error: unexpected {type(err).__name__}: {err} (set SMOLVLM_DEBUG=1 for the traceback)")
        return EXIT_ERROR
    finally:
        if results is not None:
            results.close()
        if pipeline is not None:
            pipeline.close()


def _report(summary: Summary, out: str, counts: Optional[dict[str, int]], say: Callable[[str], None]) -> None:
    retried = f"; retried {counts['busy']} busy (503/429), {counts['failed']} failed" if counts else ""
    rate = f", {summary.images_per_min:.1f} images/min" if summary.answered + summary.errors else ""
    state = (f"stopped: {summary.left} left, rerun the same command to continue" if summary.left
             else "done: every image has its line")
    say(f"{state}. {summary.answered} answered, {summary.errors} with an error line, {summary.skipped} already done"
        f"{rate}{retried}; results in {out}")


if __name__ == "__main__":
    sys.exit(main())
