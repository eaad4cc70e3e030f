"""`python board/serve.py`: an OpenAI-compatible chat-completions server for a bundle (images included).

    python board/serve.py --bundle ~/smolvlm-256m                      # http://127.0.0.1:8080/v1
    SMOLVLM_API_KEY=secret python board/serve.py --bundle ~/smolvlm-256m --host 0.0.0.0
    python board/serve.py --bundle out/bundle --emulate --port 0      # x86; prints the port it took

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /v1/models/{id},
GET /health. Request rules (images, sampling, stop, limits) are in board/openai_schemas.py.

Why the standard library's ThreadingHTTPServer and no web framework: the board side stays a few
light packages, and the server's real constraint is not HTTP concurrency but the one NPU pipeline.
One worker thread owns the Pipeline and takes requests from a FIFO queue, so concurrent requests
are answered one after another in arrival order and the runtimes never see two calls at once
(librkllmrt and rknnlite contexts are not meant to be shared across threads). HTTP threads only
parse, validate (images' headers included, before queueing) and relay the worker's events. A client
that disconnects is noticed while its request waits or streams: a queued request is dropped, a
running one is aborted (after its images finish encoding: the vision stage is not interruptible).

Errors are OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 4xx for requests the
server refuses (board.errors.InputError included), 5xx for failures of the runtime, 503 when the
queue is full. It listens on 127.0.0.1 unless --host says otherwise; with an API key (--api-key or,
better, $SMOLVLM_API_KEY so it stays out of `ps`) every /v1 request needs `Authorization: Bearer KEY`
(/health does not: it tells only whether the server is up and busy).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import unquote, urlparse

if __package__ in (None, ""):  # run as a script (python board/serve.py): board/_script_path.py fixes sys.path
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_script_path.py")))

from board.decoder import SamplingParams  # noqa: E402
from board.errors import InputError, SmolVLMError  # noqa: E402
from board.openai_schemas import (  # noqa: E402
    APIError,
    AnswerText,
    ChatRequest,
    Limits,
    chat_chunk,
    chat_completion,
    completion_id,
    model_card,
    model_list,
    parse_chat_request,
    usage,
)
from board.tiles import check_tile_budget  # noqa: E402
from board.vision import NPU_CORE_MODES  # noqa: E402

API_KEY_ENV = "SMOLVLM_API_KEY"
SEQ_HEADER = "X-SmolVLM-Seq"  # the order in which the NPU worker started this request (1, 2, ...)
_POLL_S = 0.2  # how often a waiting HTTP thread checks whether its client is still there
# A refused request's body is read and dropped (up to this size and time) before the connection closes.
_DRAIN_BYTES, _DRAIN_S = 64 << 20, 10.0


@dataclass
class ServerConfig:
    """The server's options (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    model_name: Optional[str] = None  # the id /v1/models shows; default: the bundle's model id
    max_body_bytes: int = 32 << 20
    max_queue: int = 16
    default_sampling: SamplingParams = SamplingParams()
    max_tiles: Optional[int] = None
    limits: Limits = field(default_factory=Limits)
    quiet: bool = False


# -- the NPU queue ----------------------------------------------------------------------------


class Job:
    """One request on its way through the worker; the HTTP thread reads `events`:
    ("start", seq) once the prompt is built, ("text", str)..., then ("done", dict) or ("error", APIError)."""

    def __init__(self, request: ChatRequest):
        self.request = request
        self.events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.cancelled = threading.Event()


class Worker:
    """The single owner of the Pipeline: runs queued jobs one at a time, in arrival order."""

    def __init__(self, pipeline: Any, *, max_queue: int, max_tiles: Optional[int]):
        self.pipeline = pipeline
        self.max_tiles = max_tiles
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._current: Optional[Job] = None
        self._seq = 0
        self.counts = {"served": 0, "aborted": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="npu-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, "the server is busy (request queue full); retry later", type="server_error",
                           code="server_overloaded") from None

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if queued, abort it if running."""
        job.cancelled.set()
        with self._lock:
            if self._current is job:
                self.pipeline.abort()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self._current is not None, "queued": self._queue.qsize(), **self.counts}

    def stop(self, timeout: float = 30.0) -> None:
        """Abort the running job, drop the queued ones, and end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self.counts["aborted"] += 1
                job.events.put(("error", APIError(503, "the server is shutting down", type="server_error")))
        with self._lock:
            if self._current is not None:
                self._current.cancelled.set()
                self.pipeline.abort()
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.counts["aborted"] += 1
                continue
            with self._lock:
                self._seq += 1
                self._current = job
                seq = self._seq
            try:
                self._serve(job, seq)
            except APIError as err:
                self.counts["failed"] += 1
                job.events.put(("error", err))
            except InputError as err:
                self.counts["failed"] += 1
                job.events.put(("error", APIError(400, str(err), code=type(err).__name__)))
            except SmolVLMError as err:
                self.counts["failed"] += 1
                job.events.put(("error", APIError(500, str(err), type="server_error", code=type(err).__name__)))
            except Exception as err:  # noqa: BLE001 - a bug must not take the server down
                self.counts["failed"] += 1
                job.events.put(("error", APIError(500, f"unexpected {type(err).__name__}: {err}", type="server_error")))
            finally:
                with self._lock:
                    self._current = None

    def _serve(self, job: Job, seq: int) -> None:
        request, pipeline = job.request, self.pipeline
        max_tiles = request.max_tiles if request.max_tiles is not None else self.max_tiles
        reply = pipeline.generate(request.messages, request.images, sampling=request.sampling, max_tiles=max_tiles)
        job.events.put(("start", seq))
        shown = AnswerText(request.stop)
        for step in reply:  # drained to the end even after an abort, so the decoder is left idle
            if job.cancelled.is_set() or shown.stopped:
                pipeline.abort()
                continue
            text = shown.feed(step.text)
            if text:
                job.events.put(("text", text))
            if shown.stopped:
                pipeline.abort()
        answer = reply.answer
        tail = shown.flush()
        if tail:
            job.events.put(("text", tail))
        if job.cancelled.is_set():
            self.counts["aborted"] += 1
            return
        self.counts["served"] += 1
        finish = "stop" if shown.stopped else answer.finish_reason
        job.events.put(("done", {"finish_reason": finish, "prompt_tokens": len(reply.prompt),
                                 "completion_tokens": len(answer.token_ids), "timings": answer.timings.to_dict()}))


# -- HTTP -------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: ServerConfig, worker: Worker, model: str, aliases: Sequence[str], backend: str):
        self.config, self.worker, self.model, self.backend = config, worker, model, backend
        self.model_ids = {model, *aliases}
        self.created = int(time.time())
        super().__init__((config.host, config.port), Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "smolvlm-rk3588"
    timeout = 120  # seconds a client may take to send a request (or sit idle on a kept-alive connection)
    server: Server

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.config.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: APIError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        self._send_json(err.status, err.body(), headers)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, body: Any) -> None:
        payload = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        self._chunk(f"data: {payload}\n\n".encode())

    def _client_gone(self) -> bool:
        """True when the client closed its end (readable with nothing to read) or reset it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorize(self) -> None:
        key = self.server.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            self.close_connection = True  # the body, if any, is not read
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def _drain_body(self) -> None:
        """Read and drop the body of a request refused before reading it (bounded in bytes and time), so a
        client that sends its whole body before reading the answer gets the error, not a broken pipe."""
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if left > _DRAIN_BYTES:
            return
        deadline = time.monotonic() + _DRAIN_S
        try:
            self.connection.settimeout(_DRAIN_S)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise APIError(411, "send the request body with a Content-Length header", code="length_required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "invalid Content-Length header") from None
        if size > self.server.config.max_body_bytes:
            self.close_connection = True
            raise APIError(413, f"the request body is {size} bytes; this server takes at most "
                           f"{self.server.config.max_body_bytes}", code="request_too_large")
        data = self.rfile.read(size)
        self._body_read = True
        if len(data) != size:
            self.close_connection = True
            raise APIError(400, "the request body ended early")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlparse(self.path).path.rstrip("/")
        try:
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model, "backend": self.server.backend,
                                      **self.server.worker.status()})
                return
            self._authorize()
            if path == "/v1/models":
                self._send_json(200, model_list(self.server.model, self.server.created))
            elif path.startswith("/v1/models/"):
                wanted = unquote(path[len("/v1/models/"):])
                if wanted not in self.server.model_ids:
                    raise APIError(404, f"the model '{wanted}' does not exist on this server", code="model_not_found",
                                   param="model")
                self._send_json(200, model_card(self.server.model, self.server.created))
            else:
                raise APIError(404, f"no such endpoint: GET {path}", code="not_found")
        except APIError as err:
            self._send_error(err)

    def do_POST(self) -> None:
        path = urlparse(self.path).path.rstrip("/")
        self._body_read = False
        try:
            if path != "/v1/chat/completions":
                self.close_connection = True
                raise APIError(404, f"no such endpoint: POST {path}", code="not_found")
            self._authorize()
            body = self._read_json()
            config = self.server.config
            request = parse_chat_request(body, default_sampling=config.default_sampling, limits=config.limits)
            if request.model not in self.server.model_ids:
                raise APIError(404, f"the model '{request.model}' does not exist on this server; it serves "
                               f"'{self.server.model}'", code="model_not_found", param="model")
            self._complete(request)
        except APIError as err:
            self._send_error(err)
            if not self._body_read:
                self._drain_body()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug: answer 500 and keep serving
            self.close_connection = True
            self._send_error(APIError(500, f"unexpected {type(err).__name__}: {err}", type="server_error"))

    def _next_event(self, job: Job) -> Optional[tuple[str, Any]]:
        """The job's next event, or None (and the job cancelled) once the client has gone."""
        while True:
            try:
                return job.events.get(timeout=_POLL_S)
            except queue.Empty:
                if self._client_gone():
                    self.server.worker.cancel(job)
                    self.close_connection = True
                    return None

    def _complete(self, request: ChatRequest) -> None:
        job = Job(request)
        self.server.worker.submit(job)
        cid, created, model = completion_id(), int(time.time()), self.server.model
        event = self._next_event(job)
        if event is None:
            return
        kind, value = event
        if kind == "error":
            raise value
        seq = value
        if not request.stream:
            pieces: list[str] = []
            while (event := self._next_event(job)) is not None:
                kind, value = event
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    raise value
                else:
                    self._send_json(200, chat_completion(
                        cid, created, model, "".join(pieces), value["finish_reason"],
                        usage(value["prompt_tokens"], value["completion_tokens"]), value["timings"]),
                        {SEQ_HEADER: str(seq)})
                    return
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header(SEQ_HEADER, str(seq))
        self.end_headers()
        try:
            self._event(chat_chunk(cid, created, model, {"role": "assistant", "content": ""}))
            while (event := self._next_event(job)) is not None:
                kind, value = event
                if kind == "text":
                    self._event(chat_chunk(cid, created, model, {"content": value}))
                    continue
                if kind == "error":  # headers are sent: report it in the stream, as OpenAI does
                    self._event(value.body())
                else:
                    self._event(chat_chunk(cid, created, model, {}, value["finish_reason"]))
                    if request.include_usage:
                        self._event(chat_chunk(cid, created, model,
                                               usage_counts=usage(value["prompt_tokens"], value["completion_tokens"])))
                    self._event("[DONE]")
                self._chunk(b"")
                return
        except (BrokenPipeError, ConnectionResetError):
            self.server.worker.cancel(job)
            self.close_connection = True


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"API key: --api-key or ${API_KEY_ENV} (preferred: it stays out of the process list). "
        "Images: base64 data: URLs; local files only under --image-dir; remote URLs are never fetched.",
    )
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder made by host.convert")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation (ONNX Runtime + PyTorch on the "
                        "bundle's host/ files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 = every "
                        "interface: set an API key)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (8080; 0 = any free port, printed)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")
    parser.add_argument("--model-name", metavar="ID", help="the model id clients use (default: the bundle's)")
    parser.add_argument("--image-dir", metavar="DIR", help="allow image_url file:// URLs and paths inside DIR")
    parser.add_argument("--max-body-mb", type=float, default=32, metavar="MB", help="request body limit (32)")
    parser.add_argument("--max-images", type=int, default=4, metavar="N", help="images per request (4)")
    parser.add_argument("--max-image-mp", type=float, default=50, metavar="MP",
                        help="pixels per image, in megapixels (50)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N", help="requests waiting for the NPU "
                        "before the server answers 503 (16)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="answer length when the request gives no max_tokens (512)")
    parser.add_argument("--max-tiles", type=int, metavar="N", help="tile budget per image (default: the model's "
                        "full splitting; detail 'low' in a request means 1)")
    parser.add_argument("--npu-cores", choices=NPU_CORE_MODES, default="parallel", help="vision NPU core mode")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    return parser


def config_from_args(args: argparse.Namespace, max_context: int) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name, max_body_bytes=int(args.max_body_mb * (1 << 20)), max_queue=args.max_queue,
        default_sampling=SamplingParams(max_new_tokens=args.max_new_tokens), max_tiles=args.max_tiles,
        limits=Limits(max_images=args.max_images, max_image_pixels=int(args.max_image_mp * 1e6),
                      max_image_bytes=int(args.max_body_mb * (1 << 20)), max_new_tokens=max_context,
                      image_dir=Path(args.image_dir).expanduser().resolve() if args.image_dir else None),
        quiet=args.quiet,
    )


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # serve_forever() returns through the finally below


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_images", "max_queue", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        check_tile_budget(args.max_tiles)
    except InputError as err:
        parser.error(f"--max-tiles: {err}")
    if args.image_dir and not Path(args.image_dir).expanduser().is_dir():
        parser.error(f"--image-dir {args.image_dir} is not a folder")
    if args.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from board.pipeline import Pipeline

        pipeline = Pipeline(args.bundle, emulate=args.emulate, verify=not args.no_verify, npu_cores=args.npu_cores,
                            max_tiles=args.max_tiles)
    except SmolVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    config = config_from_args(args, pipeline.max_context)
    model = config.model_name or pipeline.bundle.model_id
    worker = Worker(pipeline, max_queue=config.max_queue, max_tiles=config.max_tiles)
    try:
        server = Server(config, worker, model, [pipeline.bundle.model_id], "emulate" if args.emulate else "npu")
    except OSError as err:
        worker.stop()
        pipeline.close()
        print(f"error: cannot listen on {config.host}:{config.port}: {err.strerror}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop)
    host, port = server.server_address[:2]
    print(f"serving '{model}' ({server.backend}), listening on http://{host}:{port} "
          f"(OpenAI base URL http://{host}:{port}/v1)", file=sys.stderr, flush=True)
    if not config.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host} without an API key: anyone on the network can use it "
              f"(set ${API_KEY_ENV})", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the NPU release short
        server.server_close()
        worker.stop()
        pipeline.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
