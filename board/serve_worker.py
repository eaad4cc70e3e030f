"""The NPU worker of board/serve.py: one child process owns the Pipeline, the server talks to it with
typed messages over a pipe, and a supervisor in the server restarts it when it dies.

Why a process (rkllama's design): librkllmrt and rknnlite are C libraries, and a segfault or an
abort() in one ends the process it runs in. In a child it ends only the worker: the server answers
the requests the worker held (and those queued behind them) with 503, starts a new worker, and
/health says so meanwhile. The NPU memory goes with the process. The child is started with the
"spawn" method (a fresh interpreter: no threads or event loop copied from the server).

The messages (dataclasses, pickled over one multiprocessing Pipe):

    server -> worker   Run(job, request)   Cancel(job)   Stop()
    worker -> server   Loaded(...) or LoadFailed(message), once;
                       per job: Started(job, prompt_tokens), Text(job, text)..., then Finished or Failed

Requests reach the worker validated (board/openai_schemas.ChatRequest: the body is parsed in the
server, never here). The queue is the server's: the worker gets a Run only when it is idle, so the
supervisor always knows which request was in the worker when it died, and which were waiting.
"""

from __future__ import annotations

import asyncio
import collections
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Deque, Optional, Union

from .errors import InputError, SmolVLMError
from .openai_schemas import APIError, AnswerText, ChatRequest

# A worker that was asked to stop a request (time cap, shutdown) and still holds it this much later is
# hung (in a C call that never returns): it is killed and restarted like a crashed one.
HANG_S = 30.0
RETRY_LOADING_S = 5  # Retry-After while the model loads or the worker restarts
RETRY_STOPPING_S = 10


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """How the worker opens its Pipeline (the server's options that concern the NPU side)."""

    bundle: str
    emulate: bool = False
    verify: bool = True
    npu_cores: str = "parallel"
    vision_fallback: bool = False
    max_tiles: Optional[int] = None
    control_tokens: str = "text"
    cache_bytes: int = 256 << 20
    embed_flash: Optional[bool] = None  # None: the bundle's default


@dataclass(frozen=True)
class Run:
    job: int
    request: ChatRequest


@dataclass(frozen=True)
class Cancel:
    job: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Loaded:
    pid: int
    max_context: int
    max_token_chars: int  # the longest token's text: a prompt of n tokens has at most n times this many characters


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Started:
    job: int
    prompt_tokens: int


@dataclass(frozen=True)
class Text:
    job: int
    text: str


@dataclass(frozen=True)
class Finished:
    job: int
    finish_reason: str  # stop | length | abort
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    job: int
    status: int
    message: str
    code: str
    retry_after: Optional[int] = None

    def error(self) -> APIError:
        return APIError(self.status, self.message, code=self.code, retry_after=self.retry_after)


ToWorker = Union[Run, Cancel, Stop]
FromWorker = Union[Loaded, LoadFailed, Started, Text, Finished, Failed]


# -- the child process ------------------------------------------------------------------------


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """The child process: load the Pipeline, then answer Runs until Stop (or the server is gone)."""
    # Ctrl-C and systemd's SIGTERM reach the whole process group: the server decides when the worker
    # stops (it sends Stop after the running answer has ended), so the worker ignores both.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if spec.emulate:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from .pipeline import Pipeline

        pipeline = Pipeline(spec.bundle, emulate=spec.emulate, verify=spec.verify, npu_cores=spec.npu_cores,
                            vision_fallback=spec.vision_fallback, max_tiles=spec.max_tiles,
                            control_tokens=spec.control_tokens, embed_flash=spec.embed_flash,
                            cache_bytes=spec.cache_bytes)
    except SmolVLMError as err:
        conn.send(LoadFailed(str(err)))
        return
    except Exception as err:  # noqa: BLE001 - reported to the server as one line, which exits with it
        conn.send(LoadFailed(f"{type(err).__name__}: {err}"))
        return
    try:
        _ChildWorker(pipeline, conn).run()
    except (OSError, EOFError):  # the server is gone
        pass
    finally:
        pipeline.close()
    # The runtimes are released; the interpreter's own teardown (torch, ONNX Runtime) would take
    # seconds and has nothing left to save, so a stop is not held up by it.
    os._exit(0)


def _message(err: SmolVLMError) -> str:
    return f"{err.message} ({err.hint})" if err.hint else err.message


class _ChildWorker:
    """The worker's two threads: the main one runs jobs; a reader takes Cancel/Stop as they come, so an
    answer can be aborted while it is being generated."""

    def __init__(self, pipeline: Any, conn: Any):
        self.pipeline = pipeline
        self.conn = conn
        self.runs: "queue.Queue[Optional[Run]]" = queue.Queue()
        self.lock = threading.Lock()
        self.current: Optional[int] = None
        self.cancelled: set[int] = set()
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: stop as if told to
                message = Stop()
            if isinstance(message, Run):
                self.runs.put(message)
            elif isinstance(message, Cancel):
                with self.lock:
                    self.cancelled.add(message.job)
                    if self.current == message.job:
                        self.pipeline.abort()
            elif isinstance(message, Stop):
                with self.lock:
                    if self.current is not None:
                        self.cancelled.add(self.current)
                        self.pipeline.abort()
                self.runs.put(None)
                return

    def run(self) -> None:
        tokenizer = self.pipeline.tokenizer
        longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
        self.conn.send(Loaded(os.getpid(), self.pipeline.max_context, longest))
        while (run := self.runs.get()) is not None:
            with self.lock:
                self.current = run.job
            try:
                self.conn.send(self._serve(run))
            except InputError as err:
                self.conn.send(Failed(run.job, 400, _message(err), err.code))
            except SmolVLMError as err:
                self.conn.send(Failed(run.job, 500, _message(err), err.code))
            except Exception as err:  # noqa: BLE001 - a bug fails this request, not the worker
                self.conn.send(Failed(run.job, 500, f"internal error: {type(err).__name__}: {err}", "internal_error"))
            finally:
                with self.lock:
                    self.current = None
                    self.cancelled.discard(run.job)

    def _is_cancelled(self, job: int) -> bool:
        with self.lock:
            return job in self.cancelled

    def _serve(self, run: Run) -> Finished:
        job, request, pipeline = run.job, run.request, self.pipeline
        if self._is_cancelled(job):
            return Finished(job, "abort", 0, 0, {})
        reply = pipeline.generate(request.messages, request.images, sampling=request.sampling,
                                  max_tiles=request.max_tiles)
        if self._is_cancelled(job):  # a Cancel before generate() began its turn was cleared by it
            pipeline.abort()
        self.conn.send(Started(job, len(reply.prompt)))
        shown = AnswerText(request.stop)
        for step in reply:  # drained to the end even after an abort, so the decoder is left idle
            if shown.stopped:
                continue
            text = shown.feed(step.text)
            if text:
                self.conn.send(Text(job, text))
            if shown.stopped:
                pipeline.abort()
        answer = reply.answer
        tail = shown.flush()
        if tail:
            self.conn.send(Text(job, tail))
        finish = "stop" if shown.stopped else answer.finish_reason
        return Finished(job, finish, len(reply.prompt), len(answer.token_ids), answer.timings.to_dict())


# -- the server side --------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request in the server process, from its submission to its last event (`events`: Started,
    Text..., Finished or Failed, the worker's messages or the supervisor's own Failed)."""

    id: int
    request: ChatRequest
    submitted: float = field(default_factory=time.monotonic)
    events: "asyncio.Queue[FromWorker]" = field(default_factory=asyncio.Queue)
    seq: Optional[int] = None  # the order in which the worker started it (1, 2, ...)
    dispatched: Optional[float] = None
    state: str = "queued"  # queued | running | done
    cancel_reason: Optional[str] = None  # client | timeout | shutdown


class Supervisor:
    """The worker process as the server sees it: its state, the FIFO queue in front of it, restarts.

    Runs on the server's event loop; a reader thread per worker turns the pipe's messages into calls
    on the loop. States: loading -> ready; ready -> restarting (the worker died) -> ready; any ->
    stopping -> stopped; loading -> failed (the bundle cannot be loaded: the server exits).
    """

    def __init__(self, spec: WorkerSpec, *, max_queue: int, max_request_s: float, metrics: Any = None,
                 on_loaded: Callable[[Loaded], None] = lambda info: None,
                 on_failed: Callable[[str], None] = lambda message: None):
        self.spec = spec
        self.max_queue = max_queue
        self.max_request_s = max_request_s
        self.metrics = metrics
        self.on_loaded, self.on_failed = on_loaded, on_failed
        self.state = "loading"
        self.restarts = 0
        self.counts = {"served": 0, "aborted": 0, "failed": 0}
        self._queue: Deque[Job] = collections.deque()
        self._running: Optional[Job] = None
        self._ids = 0
        self._seq = 0
        self._generation = 0
        self._process: Any = None
        self._loaded = False  # whether the current worker process has sent Loaded
        self._outbox: "queue.Queue[Optional[ToWorker]]" = queue.Queue()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._kill_reason: Optional[str] = None
        self._mean_s = 2.0  # a running mean of request times, for Retry-After when the queue is full
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- the process ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (call on the event loop); it loads the bundle while the server listens."""
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        here, there = context.Pipe()
        process = context.Process(target=worker_main, args=(there, self.spec), name="smolvlm-npu-worker",
                                  daemon=True)
        process.start()
        there.close()  # only the child holds its end now: the child's death is EOF on ours
        self._generation += 1
        self._process, self._kill_reason, self._loaded = process, None, False
        self._outbox = queue.Queue()
        threading.Thread(target=self._write, args=(here, self._outbox), name="worker-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(here, self._generation), name="worker-reader", daemon=True).start()
        if self.metrics is not None:
            self.metrics.worker_up.set(0)

    @staticmethod
    def _write(conn: Any, outbox: "queue.Queue[Optional[ToWorker]]") -> None:
        """Sends happen here, not on the event loop: a Run carries the images, megabytes to pickle."""
        while (message := outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the worker is gone: the reader reports it
                return

    def _read(self, conn: Any, generation: int) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except Exception:  # noqa: BLE001 - the worker is gone (EOFError, OSError) or sent an unreadable message
                break
            try:
                loop.call_soon_threadsafe(self._on_message, generation, message)
            except RuntimeError:  # the loop is closed: the server has ended
                return
        conn.close()
        try:
            loop.call_soon_threadsafe(self._on_exit, generation)
        except RuntimeError:
            pass

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def _send(self, message: ToWorker) -> None:
        self._outbox.put(message)

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: ChatRequest) -> Job:
        """Queue a request, or refuse it with a 503 that says why and when to retry."""
        if self.state == "loading":
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           retry_after=RETRY_LOADING_S)
        if self.state == "restarting":
            raise APIError(503, "the NPU worker is restarting after a failure; retry shortly", code="worker_restarting",
                           retry_after=RETRY_LOADING_S)
        if self.state != "ready":
            raise APIError(503, "the server is shutting down", code="server_shutting_down", retry_after=RETRY_STOPPING_S)
        if len(self._queue) >= self.max_queue:
            wait = (len(self._queue) + 1) * self._mean_s
            raise APIError(503, f"the server is busy ({len(self._queue)} requests waiting for the NPU); retry later",
                           code="server_overloaded", retry_after=max(1, math.ceil(wait)))
        self._ids += 1
        job = Job(self._ids, request)
        self._queue.append(job)
        self._dispatch()
        self._gauge()
        return job

    def cancel(self, job: Job, reason: str = "client") -> None:
        """Stop a job: a queued one leaves the queue, a running one is aborted (the worker finishes it)."""
        if job.state == "queued":
            self._queue.remove(job)
            self._finish(job, None, "aborted")
            self._gauge()
        elif job.state == "running" and job.cancel_reason is None:
            job.cancel_reason = reason
            self._send(Cancel(job.id))
            self._arm(job, HANG_S, self._hung)

    def _dispatch(self) -> None:
        if self.state not in ("ready", "stopping") or self._running is not None or not self._queue:
            return
        job = self._queue.popleft()
        self._seq += 1
        job.seq, job.state, job.dispatched = self._seq, "running", time.monotonic()
        self._running = job
        self._send(Run(job.id, job.request))
        self._arm(job, self.max_request_s, self._time_cap)
        if self.metrics is not None:
            self.metrics.queue_wait.observe(job.dispatched - job.submitted)

    def _arm(self, job: Job, seconds: float, then: Callable[[Job], None]) -> None:
        assert self._loop is not None
        old = self._timers.pop(job.id, None)
        if old is not None:
            old.cancel()
        self._timers[job.id] = self._loop.call_later(seconds, then, job)

    def _time_cap(self, job: Job) -> None:
        """--max-request-s passed while the job held the worker: its answer ends there, like max_tokens."""
        if job is self._running:
            self._timers.pop(job.id, None)
            self.cancel(job, "timeout")

    def _hung(self, job: Job) -> None:
        if job is self._running and self._process is not None:
            self._kill_reason = f"the NPU worker did not stop a request within {HANG_S:.0f} s; it was restarted"
            self._process.kill()

    def _finish(self, job: Job, event: Optional[FromWorker], outcome: str) -> None:
        """The job's last event (None: nobody is waiting for one) and its count."""
        job.state = "done"
        timer = self._timers.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        self.counts[outcome] += 1
        if event is not None:
            job.events.put_nowait(event)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self._queue))
            self.metrics.running.set(1 if self._running is not None else 0)

    # -- the worker's messages ------------------------------------------------------------------

    def _on_message(self, generation: int, message: FromWorker) -> None:
        if generation != self._generation:
            return
        if isinstance(message, Loaded):
            self._loaded = True
            if self.state in ("loading", "restarting"):
                self.state = "ready"
            if self.metrics is not None:
                self.metrics.worker_up.set(1)
            self.on_loaded(message)
            self._dispatch()
            return
        if isinstance(message, LoadFailed):
            self._fail_loading(message.message)
            return
        job = self._running
        if job is None or getattr(message, "job", None) != job.id:
            return
        if isinstance(message, (Started, Text)):
            if job.cancel_reason is None:
                job.events.put_nowait(message)
            return
        self._running = None
        if isinstance(message, Finished):
            self._record(job, message)
            cut = job.cancel_reason if message.finish_reason == "abort" else None  # else it ended on its own first
            if job.cancel_reason == "client":
                self._finish(job, None, "aborted")
            elif cut == "shutdown":
                self._finish(job, Failed(job.id, 503, "the server is shutting down; the answer was cut short",
                                         "server_shutting_down", RETRY_STOPPING_S), "aborted")
            elif cut == "timeout":
                self._finish(job, replace(message, finish_reason="length"), "served")
            else:
                self._finish(job, message, "served")
        else:
            self._finish(job, message, "failed")
        self._dispatch()
        self._gauge()

    def _record(self, job: Job, finished: Finished) -> None:
        if job.dispatched is not None:
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - job.dispatched)
        if self.metrics is not None:
            self.metrics.record_answer(finished)

    def _fail_loading(self, message: str) -> None:
        self.state = "failed"
        for job in list(self._queue):
            self._finish(job, Failed(job.id, 503, message, "model_load_failed"), "failed")
        self._queue.clear()
        self.on_failed(message)

    def _on_exit(self, generation: int) -> None:
        """The worker's pipe closed: it stopped (as asked) or died."""
        if generation != self._generation:
            return
        process = self._process
        process.join(5)
        self._outbox.put(None)
        if self.state in ("stopping", "stopped") and self._running is None:
            self.state = "stopped"
            return
        if self.state in ("loading", "failed"):
            if self.state == "loading":
                self._fail_loading(f"the NPU worker exited while loading the bundle ({_exit_text(process.exitcode)})")
            return
        reason = self._kill_reason or f"the NPU worker stopped unexpectedly ({_exit_text(process.exitcode)})"
        lost = ([self._running] if self._running is not None else []) + list(self._queue)
        self._running = None
        self._queue.clear()
        for job in lost:
            self._finish(job, Failed(job.id, 503, f"{reason}; retry", "worker_crashed", RETRY_LOADING_S), "failed")
        if self.metrics is not None:
            self.metrics.worker_restarts.inc()
        self._gauge()
        if self.state == "stopping":
            self.state = "stopped"
            return
        self.restarts += 1
        self.state = "restarting"
        self._spawn()

    # -- shutdown ---------------------------------------------------------------------------------

    def begin_shutdown(self, grace_s: float) -> None:
        """SIGTERM/SIGINT: refuse new requests, answer the queued ones 503, give the running one
        `grace_s` seconds to finish before it is cut (its stream then ends with an error event)."""
        if self.state in ("stopping", "stopped"):
            return
        self.state = "stopping"
        for job in list(self._queue):
            self._finish(job, Failed(job.id, 503, "the server is shutting down", "server_shutting_down",
                                     RETRY_STOPPING_S), "aborted")
        self._queue.clear()
        self._gauge()
        job = self._running
        if job is not None:
            self._arm(job, grace_s, lambda j: self.cancel(j, "shutdown"))

    async def stop(self, timeout: float = 30.0) -> None:
        """End the worker: Stop, then wait for it to release the NPU; killed if it does not."""
        self.begin_shutdown(0.0)
        process = self._process
        if process is None:
            return
        if not self._loaded and process.is_alive():  # still loading: it would read Stop only once loaded
            process.kill()
        self._send(Stop())
        self._outbox.put(None)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, process.join, timeout)
        if process.is_alive():
            process.kill()
            await loop.run_in_executor(None, process.join, 5)
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "running": self._running is not None, "queued": len(self._queue),
                **self.counts, "worker_restarts": self.restarts, "worker_pid": self.pid}


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
