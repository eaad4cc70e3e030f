"""`python board/serve.py`: an OpenAI-compatible chat-completions server for a bundle (images included).

    python board/serve.py --bundle ~/smolvlm-256m                      # http://127.0.0.1:8080/v1
    SMOLVLM_API_KEY=secret python board/serve.py --bundle ~/smolvlm-256m --host 0.0.0.0
    python board/serve.py --bundle out/bundle --emulate --port 0      # x86; prints the port it took

Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models, GET /v1/models/{id},
GET /health, GET /metrics (Prometheus text). Request rules (images, sampling, stop, limits) are in
board/openai_schemas.py.

Process model. uvicorn (HTTP/1.1: connections, backlog, keep-alive, IPv6, graceful shutdown) runs a
thin Starlette app in this process, which reads, parses and validates every request (images'
headers included) before it queues. One NPU worker *process* (board/serve_worker.py) owns the
Pipeline and answers queued requests one after another in arrival order: the runtimes never see
two calls at once, and a crash in a Rockchip library ends only the worker, which is restarted (the
requests it held and those queued get 503). The socket is bound before the worker loads the
bundle, so a busy port fails at once, and /health answers 503 {"status": "loading"} until the
model is ready. A client that disconnects loses its place in the queue or has its answer aborted.

Errors are OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a stable snake_case
code, for every 4xx/5xx (routing's 404/405 and uvicorn's own 400/408 included); every 503 carries
Retry-After. It listens on 127.0.0.1 unless --host says otherwise; with an API key (--api-key or,
better, $SMOLVLM_API_KEY so it stays out of `ps`) every /v1 request and /metrics need
`Authorization: Bearer KEY` (/health does not: it tells only whether the server is up and busy).

SIGTERM or Ctrl-C: the server stops accepting connections, answers the queued requests 503, gives
the running answer --shutdown-grace-s to finish (then cuts it: a stream ends with an error event
and [DONE]), stops the worker and exits 0. A second Ctrl-C does not wait.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python board/serve.py): board/_script_path.py fixes sys.path
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_script_path.py")))

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.background import BackgroundTask  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from board.decoder import SamplingParams  # noqa: E402
from board.decoder_rkllm import add_embed_flash_option  # noqa: E402
from board.errors import InputError, SmolVLMError  # noqa: E402
from board.openai_schemas import (  # noqa: E402
    API_KEY_ENV,
    APIError,
    ChatRequest,
    Limits,
    chat_chunk,
    chat_completion,
    completion_id,
    model_card,
    model_list,
    model_slug,
    parse_chat_request,
    usage,
)
from board.prompt import CONTROL_TOKEN_POLICIES  # noqa: E402
from board.serve_http import BODY_CUT, Protocol  # noqa: E402
from board.serve_metrics import Metrics  # noqa: E402
from board.serve_worker import (  # noqa: E402
    HANG_S,
    RETRY_LOADING_S,
    Failed,
    Finished,
    Job,
    Loaded,
    Started,
    Supervisor,
    Text,
    WorkerSpec,
)
from board.tiles import check_tile_budget  # noqa: E402
from board.vision import NPU_CORE_MODES  # noqa: E402

SEQ_HEADER = "X-SmolVLM-Seq"  # the order in which the NPU worker started this request (1, 2, ...)
# A request refused before its body was read has the body read and dropped (up to this size and
# time) before the connection closes, so a client that sends it all before reading gets the error.
_DRAIN_BYTES, _DRAIN_S = 64 << 20, 10.0
# Message text that could not fit the context: characters > max_context x longest token x this
# (2: room for normalizers that merge characters), refused before the worker tokenizes it.
_PROMPT_CHARS_SLACK = 2
_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


@dataclass
class ServerConfig:
    """The server's options (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    model_name: Optional[str] = None  # the id /v1/models shows; default: a slug of the bundle's model name
    max_body_bytes: int = 32 << 20
    max_queue: int = 16
    max_request_s: float = 120.0
    read_timeout_s: float = 10.0
    shutdown_grace_s: float = 20.0
    default_sampling: SamplingParams = SamplingParams()
    limits: Limits = field(default_factory=Limits)
    quiet: bool = False


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


# -- the app ----------------------------------------------------------------------------------


class App:
    """The HTTP side: routes, request reading and the translation of worker events into responses."""

    def __init__(self, config: ServerConfig, supervisor: Supervisor, metrics: Metrics, *, model: str,
                 display_name: str, backend: str):
        self.config, self.supervisor, self.metrics = config, supervisor, metrics
        self.model, self.display_name, self.backend = model, display_name, backend
        self.model_ids = {model, display_name}
        self.limits = config.limits
        self.created = int(time.time())
        routes = [
            Route("/health", self._endpoint(self.health), methods=["GET"]),
            Route("/metrics", self._endpoint(self.prometheus), methods=["GET"]),
            Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._endpoint(self.model_card), methods=["GET"]),
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
        ]
        self.starlette = Starlette(routes=routes, exception_handlers={HTTPException: self._routing_error})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry: Starlette, with each answer counted by endpoint and status for /metrics."""
        if scope["type"] != "http":
            return await self.starlette(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.starlette(scope, receive, counted)

    def loaded(self, info: Loaded) -> None:
        """The worker's tokenizer bounds the text a prompt that fits can have."""
        self.limits = replace(self.limits, max_prompt_chars=info.max_context * info.max_token_chars * _PROMPT_CHARS_SLACK)

    # -- plumbing ---------------------------------------------------------------------------------

    def _endpoint(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as err:
                return await self.error(request, err)
            except _ClientGone:
                return Response(status_code=204)  # nobody reads it
            except Exception as err:  # noqa: BLE001 - a bug: one line in the log, a 500 to the client
                say(f"error: internal error answering {request.method} {request.url.path}: {type(err).__name__}: {err}")
                return await self.error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))

        return run

    async def _routing_error(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            err = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
            return await self.error(request, err, dict(exc.headers or {}))
        if exc.status_code == 404:
            return await self.error(request, APIError(404, f"no such endpoint: {request.method} {request.url.path}",
                                                      code="not_found"))
        return await self.error(request, APIError(exc.status_code, str(exc.detail)))

    async def error(self, request: Request, err: APIError, headers: Optional[dict[str, str]] = None) -> Response:
        """The OpenAI-shaped answer to a refused request (its unread body drained first, boundedly)."""
        headers = dict(headers or {})
        if err.retry_after is not None:
            headers["Retry-After"] = str(err.retry_after)
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        close = err.close
        if not getattr(request.state, "body_done", False) and _has_body(request):
            await self._drain(request)
            close = True
        if close:
            headers["Connection"] = "close"
        data = json.dumps(err.body()).encode()  # ASCII: an error may quote whatever the client sent
        return Response(data, status_code=err.status, headers=headers, media_type="application/json")

    async def _drain(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > _DRAIN_BYTES):
            return
        loop = asyncio.get_running_loop()
        deadline, read = loop.time() + _DRAIN_S, 0
        while read <= _DRAIN_BYTES:
            try:
                message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The body, read while it arrives: at most --max-body-mb, no pause longer than --read-timeout-s,
        all of it within --max-request-s."""
        config = self.config
        declared: Optional[int] = None
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "invalid Content-Length header", code="invalid_content_length", close=True)
            declared = int(length)
        limit = config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server takes ({limit} bytes)",
                             code="request_too_large")
        if declared is not None and declared > limit:
            raise too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.max_request_s
        chunks: list[bytes] = []
        size = 0
        while True:
            wait = min(config.read_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(request.receive(), max(0.0, wait))
            except asyncio.TimeoutError:
                request.state.body_done = True  # no more waiting for it: the connection closes
                raise APIError(408, f"the request body stopped arriving ({size} bytes in; the server waits "
                               f"{config.read_timeout_s:g} s between parts and {config.max_request_s:g} s in all)",
                               code="request_timeout", close=True) from None
            if message["type"] != "http.request":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        request.state.body_done = True
        if request.scope.get(BODY_CUT):
            got = f"{size} of {declared} bytes" if declared is not None else f"{size} bytes, before its last chunk"
            raise APIError(400, f"the request body ended early ({got}): the client closed its side",
                           code="incomplete_body", close=True)
        return b"".join(chunks)

    def _parse(self, data: bytes) -> ChatRequest:
        """JSON and the request rules (run in a thread: large bodies and image headers take a while)."""
        try:
            body = json.loads(data)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply to be a chat request", code="invalid_json") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer with too many digits
            raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        return parse_chat_request(body, default_sampling=self.config.default_sampling, limits=self.limits)

    # -- routes -----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        status = self.supervisor.status()
        ready = status["state"] == "ready"
        body = {"status": "ok" if ready else status["state"], "model": self.model, "backend": self.backend, **status}
        headers = None if ready else {"Retry-After": str(RETRY_LOADING_S)}
        return _json(body, 200 if ready else 503, headers)

    async def prometheus(self, request: Request) -> Response:
        self._authorize(request)
        data, content_type = self.metrics.render()
        return Response(data, headers={"Content-Type": content_type})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return _json(model_list(self.model, self.created, self.display_name))

    async def model_card(self, request: Request) -> Response:
        self._authorize(request)
        wanted = request.path_params["model"]
        if wanted not in self.model_ids:
            raise APIError(404, f"the model '{wanted}' does not exist on this server", code="model_not_found",
                           param="model")
        return _json(model_card(self.model, self.created, self.display_name))

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        data = await self._read_body(request)
        chat = await run_in_threadpool(self._parse, data)
        if chat.model not in self.model_ids:
            raise APIError(404, f"the model '{chat.model}' does not exist on this server; it serves '{self.model}'",
                           code="model_not_found", param="model")
        job = self.supervisor.submit(chat)
        gone = asyncio.ensure_future(_disconnected(request))
        handed_over = False
        try:
            first = await _next_event(job, gone)
            if isinstance(first, Failed):
                raise first.error()
            assert isinstance(first, Started)
            cid, created, headers = completion_id(), int(time.time()), {SEQ_HEADER: str(job.seq)}
            if chat.stream:
                gone.cancel()  # from here Starlette's StreamingResponse watches for the disconnect
                handed_over = True
                return StreamingResponse(self._stream(job, chat, cid, created), headers={
                    **headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no"}, background=BackgroundTask(self._settle, job))
            pieces: list[str] = []
            while True:
                event = await _next_event(job, gone)
                if isinstance(event, Text):
                    pieces.append(event.text)
                elif isinstance(event, Failed):
                    raise event.error()
                elif isinstance(event, Finished):
                    return _json(chat_completion(cid, created, self.model, "".join(pieces), event.finish_reason,
                                                 usage(event.prompt_tokens, event.completion_tokens), event.timings),
                                 headers=headers)
        finally:
            gone.cancel()
            if not handed_over and job.state != "done":
                self.supervisor.cancel(job)

    async def _settle(self, job: Job) -> None:
        """After a stream (run even when the client left before it began): a job still going is cancelled."""
        if job.state != "done":
            self.supervisor.cancel(job)

    async def _stream(self, job: Job, chat: ChatRequest, cid: str, created: int) -> AsyncIterator[bytes]:
        """The SSE events of a streamed answer; it ends with [DONE] after the final or an error event."""
        model = self.model
        ended = False
        try:
            yield _event(chat_chunk(cid, created, model, {"role": "assistant", "content": ""}))
            while True:
                event = await job.events.get()
                if isinstance(event, Text):
                    yield _event(chat_chunk(cid, created, model, {"content": event.text}))
                    continue
                if isinstance(event, Finished):
                    yield _event(chat_chunk(cid, created, model, {}, event.finish_reason))
                    if chat.include_usage:
                        yield _event(chat_chunk(cid, created, model,
                                                usage_counts=usage(event.prompt_tokens, event.completion_tokens)))
                elif isinstance(event, Failed):  # the headers are sent: report it in the stream, as OpenAI does
                    yield _event(event.error().body())
                ended = True
                yield b"data: [DONE]\n\n"
                return
        finally:
            if not ended:
                self.supervisor.cancel(job)


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers


def _json(body: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False).encode(), status_code=status, headers=headers,
                    media_type="application/json")


def _event(body: Any) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body, receive() has nothing else to say)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, gone: "asyncio.Future[None]") -> Any:
    if not job.events.empty():
        return job.events.get_nowait()
    getter = asyncio.ensure_future(job.events.get())
    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    raise _ClientGone


# -- running it ---------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling us when a signal starts the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            self._on_signal()


def _log_config(quiet: bool) -> dict[str, Any]:
    """uvicorn's messages as plain lines on stderr: warnings always, the access log unless --quiet."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                    "uvicorn.access": {"handlers": [] if quiet else ["stderr"], "level": "INFO", "propagate": False}},
    }


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket for host:port (IPv4 or IPv6; '::' takes IPv4 too), or OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server:
    """Everything one `serve.py` run owns: the socket, the worker's supervisor, the app, uvicorn."""

    def __init__(self, config: ServerConfig, spec: WorkerSpec, *, model: str, display_name: str, backend: str):
        self.config = config
        self.sock = bind(config.host, config.port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.metrics = Metrics()
        self.supervisor = Supervisor(spec, max_queue=config.max_queue, max_request_s=config.max_request_s,
                                     metrics=self.metrics, on_loaded=self._loaded, on_failed=self._failed)
        self.app = App(config, self.supervisor, self.metrics, model=model, display_name=display_name, backend=backend)
        self.exit_status = 0
        self._uvicorn: Optional[_Uvicorn] = None
        self._loads = 0

    def _loaded(self, info: Loaded) -> None:
        self.app.loaded(info)
        self._loads += 1
        url = _url(self.host, self.port)
        if self._loads == 1:
            say(f"serving '{self.app.model}' ({self.app.backend}), listening on {url} (OpenAI base URL {url}/v1)")
        else:
            say(f"the NPU worker was restarted (pid {info.pid}); serving again")

    def _failed(self, message: str) -> None:
        say(f"error: {message}")
        self.exit_status = 1
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True

    def _signal(self) -> None:
        say("shutting down: no new requests; the running answer may finish "
            f"(at most {self.config.shutdown_grace_s:g} s)")
        self.supervisor.begin_shutdown(self.config.shutdown_grace_s)

    async def run(self) -> int:
        protocol = type("Protocol", (Protocol,), {"head_timeout_s": self.config.read_timeout_s})
        uv_config = uvicorn.Config(
            self.app, http=protocol, lifespan="off", log_config=_log_config(self.config.quiet),
            access_log=not self.config.quiet, timeout_keep_alive=5, server_header=False,
            headers=[("server", "smolvlm-rk3588")],
            timeout_graceful_shutdown=int(self.config.shutdown_grace_s + HANG_S + 5))
        self._uvicorn = _Uvicorn(uv_config, self._signal)
        self.supervisor.start()
        try:
            await self._uvicorn.serve(sockets=[self.sock])
        finally:
            await self.supervisor.stop()
            self.sock.close()
        return self.exit_status


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"API key: --api-key or ${API_KEY_ENV} (preferred: it stays out of the process list). "
        "Images: base64 data: URLs; local files only under --image-dir; remote URLs are never fetched. "
        "SIGTERM / Ctrl-C stop gracefully (exit status 0).",
    )
    parser.add_argument("--bundle", required=True, metavar="DIR", help="the bundle folder made by host.convert")
    parser.add_argument("--emulate", action="store_true", help="x86 emulation (ONNX Runtime + PyTorch on the "
                        "bundle's host/ files)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 = every "
                        "IPv4 interface, :: = every interface: set an API key)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (8080; 0 = any free port, printed)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV})")
    parser.add_argument("--model-name", metavar="ID", help="the model id clients use (default: the bundle's model "
                        "name as a slug)")
    parser.add_argument("--image-dir", metavar="DIR", help="allow image_url file:// URLs and paths inside DIR "
                        "(regular files only)")
    parser.add_argument("--control-tokens", choices=CONTROL_TOKEN_POLICIES, default="text",
                        help="what special-token strings in request text become: 'text' (default) keeps them "
                        "text, so a client cannot forge turns; 'special' tokenizes them as the model's control "
                        "tokens, as transformers does")
    parser.add_argument("--max-body-mb", type=float, default=32, metavar="MB", help="request body limit (32)")
    parser.add_argument("--max-images", type=int, default=4, metavar="N", help="images per request (4)")
    parser.add_argument("--max-image-mp", type=float, default=50, metavar="MP",
                        help="pixels per image, in megapixels (50)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N", help="requests waiting for the NPU "
                        "before the server answers 503 (16)")
    parser.add_argument("--max-request-s", type=float, default=120, metavar="S", help="longest time a request "
                        "may hold the NPU: its answer ends there, finish_reason 'length' (120); also the "
                        "longest a request body may take to arrive")
    parser.add_argument("--read-timeout-s", type=float, default=10, metavar="S", help="a request's head must "
                        "arrive within S seconds and its body may pause no longer (10); else 408")
    parser.add_argument("--shutdown-grace-s", type=float, default=20, metavar="S", help="on SIGTERM, how long the "
                        "running answer may go on before it is cut (20; keep it below systemd's TimeoutStopSec)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                        help="answer length when the request gives no max_tokens (512)")
    parser.add_argument("--max-tiles", type=int, metavar="N", help="tile budget per image (default: the model's "
                        "full splitting; detail 'low' in a request means 1)")
    parser.add_argument("--vision-cache-mb", type=float, default=256, metavar="MB",
                        help="memory for the encodings of recently seen images (256)")
    parser.add_argument("--npu-cores", choices=NPU_CORE_MODES, default="parallel", help="vision NPU core mode")
    parser.add_argument("--vision-fallback", action="store_true", help="use the bundle's fallback vision model "
                        "(fp16, Rockchip's conv input layout; host.convert --vision-fallback) instead of the main "
                        "one, as the board doctor may advise")
    add_embed_flash_option(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    return parser


def config_from_args(args: argparse.Namespace, max_context: int) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        model_name=args.model_name, max_body_bytes=int(args.max_body_mb * (1 << 20)), max_queue=args.max_queue,
        max_request_s=args.max_request_s, read_timeout_s=args.read_timeout_s, shutdown_grace_s=args.shutdown_grace_s,
        default_sampling=SamplingParams(max_new_tokens=args.max_new_tokens),
        limits=Limits(max_images=args.max_images, max_image_pixels=int(args.max_image_mp * 1e6),
                      max_image_bytes=int(args.max_body_mb * (1 << 20)), max_new_tokens=max_context,
                      image_dir=Path(args.image_dir).expanduser().resolve() if args.image_dir else None),
        quiet=args.quiet,
    )


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_images", "max_queue", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_body_mb", "max_image_mp", "max_request_s", "read_timeout_s", "vision_cache_mb"):
        if not 0 < getattr(args, name) < float("inf"):
            parser.error(f"--{name.replace('_', '-')} must be a positive number")
    if not 0 <= args.shutdown_grace_s < float("inf"):
        parser.error("--shutdown-grace-s must be 0 or more")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        check_tile_budget(args.max_tiles)
    except InputError as err:
        parser.error(f"--max-tiles: {err}")
    if args.image_dir and not Path(args.image_dir).expanduser().is_dir():
        parser.error(f"--image-dir {args.image_dir} is not a folder")
    if args.model_name is not None and (not args.model_name or model_slug(args.model_name) != args.model_name):
        parser.error(f"--model-name must be one word of letters, digits and ._:/- (e.g. {model_slug(args.model_name)!r})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from board.bundle import Bundle

    try:  # the manifest only (the worker verifies and loads the files): a bad bundle fails before listening
        bundle = Bundle.open(args.bundle, verify=False, need_decoder=not args.emulate)
        bundle.vision_model(args.vision_fallback)  # a --vision-fallback the bundle cannot honour fails here
    except SmolVLMError as err:
        say(f"error: {err}")
        return 1
    except Exception as err:  # noqa: BLE001 - a manifest this code did not foresee: still one line
        say(f"error: cannot read the bundle {args.bundle}: {type(err).__name__}: {err}")
        return 1
    config = config_from_args(args, bundle.max_context)
    spec = WorkerSpec(str(Path(args.bundle).expanduser().resolve()), emulate=args.emulate, verify=not args.no_verify,
                      npu_cores=args.npu_cores, vision_fallback=args.vision_fallback, max_tiles=args.max_tiles,
                      control_tokens=args.control_tokens, embed_flash=args.embed_flash,
                      cache_bytes=int(args.vision_cache_mb * (1 << 20)))
    try:
        server = Server(config, spec, model=config.model_name or model_slug(bundle.model_id),
                        display_name=bundle.model_id, backend="emulate" if args.emulate else "npu")
    except OSError as err:
        say(f"error: cannot listen on {config.host}:{config.port}: {err.strerror or err}")
        return 1
    url = _url(server.host, server.port)
    say(f"loading {bundle.model_id} from {args.bundle}; bound to {url} (/health answers 503 until the model is ready)")
    if not config.api_key and server.host not in ("127.0.0.1", "::1", "localhost"):
        say(f"warning: listening on {server.host} without an API key: anyone on the network can use it "
            f"(set ${API_KEY_ENV})")
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn handles them while it runs and re-raises them after
        signal.signal(sig, lambda signum, frame: None)
    return asyncio.run(server.run())


if __name__ == "__main__":
    sys.exit(main())
