"""The board's decoder: librkllmrt 1.3.0 (through board/rkllm_h.py) fed the whole sequence as EMBED input.

Ownership follows llama-cpp-python: `RKLLMDecoder` owns one LLMHandle from `rkllm_init` to
`rkllm_destroy` (exactly once: close() is idempotent, the context manager and __del__ call it), and
keeps alive everything the runtime may point into: the RKLLMParam (model path), the RKLLMCallback
and its CFUNCTYPE for the handle's life; the embeddings, input and infer structs for each run.

What the runtime decides, and what this binding checks because rkllm.h does not promise it:
- End of turn: the EOS token id(s) are stored in `decoder.rkllm` by rkllm-toolkit (from the
  checkpoint's generation config; 1.3.0 supports several) and `ignore_eos_token` stays off. As a
  guard, a token of the bundle's EOS set reaching the callback ends the run there (rkllm_abort),
  whether or not the runtime would have stopped. `skip_special_token` (on by default) keeps special
  tokens' text out of the stream.
- Chat template: the SDK wraps *text* input in the model's template; whether it touches EMBED input
  is undocumented (and rknn-llm issue #420 shows SmolVLM's template misparsed), so an empty template
  is set after init (a failure is a warning with the code). Then every run's `perf.prefill_tokens`
  must equal the rows fed: a runtime that added or dropped tokens raises PrefillMismatch naming both.
- KV cache across turns: `history_tokens` reports rkllm_get_kv_cache_size, so the pipeline can
  compare it with the history it expects (upstream demos all run keep_history=0; issues #278 and
  #446 report embed-mode cache trouble) and re-feed the conversation when they differ.
- NPU cores: fixed when the model is converted (rkllm-toolkit `num_npu_core`); the runtime API only
  chooses the CPU cores for its CPU-side work (`enabled_cpus`) and the NPU memory domain.
  `embed_flash` asks the runtime to read its own word-embedding table from flash instead of RAM
  (we feed embeddings, so it saves memory); RKLLM_LOG_LEVEL is the runtime's own log switch.

Streaming: `rkllm_run` is synchronous, so it runs in a worker thread while generate() reads the
callback's events from a queue. The callback copies what it needs (the text pointer is valid only
during the call) and never raises into C. The last run's embedding array stays referenced until
the next run or a cache clear, in case the runtime keeps a pointer into it with the history.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import rkllm_h as C
from .cpus import rkllm_cpus
from .decoder import DecodeStats, GenerationStep, SamplingParams, checked_embeddings, chosen_sampling
from .errors import BundleError, DecoderError, InputError, PrefillMismatch

# librkllmrt's log switch (read by the runtime at rkllm_init; 1 prints per-run timings)
LOG_LEVEL_ENV = "RKLLM_LOG_LEVEL"
# How often the waiting generator wakes so that Ctrl-C is handled promptly.
_POLL_S = 0.1


class _Utf8Joiner:
    """Turns the byte pieces of successive callbacks into text, holding back an incomplete character.

    Both readings of RKLLM_RUN_WAITING are handled: the partial bytes arrive in the WAITING call and
    the rest in the next one (joined here), or the next call repeats the whole character (then the
    held bytes are orphans: a piece starting with a non-continuation byte replaces them).
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, piece: bytes) -> str:
        if self._pending and piece and (piece[0] & 0xC0) != 0x80:
            self._pending = b""
        data = self._pending + piece
        cut = _complete_utf8_prefix(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """What is left when the run ends: an unfinished character becomes U+FFFD."""
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", errors="replace")


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of `data` without a trailing, still incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if (byte & 0xC0) == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return len(data) - back if need > back else len(data)
    return len(data)


# What one run reports to the generator reading its queue: the result callback's events, then _Done
# from the worker thread once rkllm_run has returned.


# enabled_cpus' default: board.cpus.rkllm_cpus(), the big cores (None: the runtime's own choice)
BIG_CORES: Sequence[int] = (-1,)


def add_embed_flash_option(parser: "argparse.ArgumentParser") -> None:
    """--embed-flash / --no-embed-flash, one wording for run.py and serve.py: None keeps the bundle's default."""
    parser.add_argument("--embed-flash", action=argparse.BooleanOptionalAction, default=None,
                        help="librkllmrt reads its word-embedding table from flash instead of RAM (saves memory; "
                             "the board feeds embeddings itself). Default: what the bundle records "
                             "(host.convert --embed-flash); no effect with --emulate")


@dataclass(frozen=True)
class _Token:
    """RKLLM_RUN_NORMAL / RKLLM_RUN_WAITING: a piece of text (bytes, maybe part of a character)."""

    text: bytes
    token_id: int  # -1 when the runtime gave none


@dataclass(frozen=True)
class _Finish:
    """RKLLM_RUN_FINISH, with the runtime's perf figures."""

    stats: DecodeStats


@dataclass(frozen=True)
class _Problem:
    """Something went wrong in the run: RKLLM_RUN_ERROR, or a state this binding does not know."""

    message: str


@dataclass(frozen=True)
class _CallbackFailed:
    """The result callback raised (kept, not formatted: the callback must not fail again in C)."""

    error: BaseException


@dataclass(frozen=True)
class _Done:
    """rkllm_run returned this code, or could not be called (the exception)."""

    outcome: Union[int, BaseException]


_Event = Union[_Token, _Finish, _Problem, _CallbackFailed, _Done]


class _Channel:
    """Where the C callback sends events: the queue of the current run, or nowhere between runs.

    Kept apart from the decoder so the CFUNCTYPE does not reference the decoder (no cycle; the
    decoder can be collected and closed)."""

    def __init__(self) -> None:
        self.queue: Optional["queue.SimpleQueue[_Event]"] = None


def _make_result_callback(channel: _Channel) -> Any:
    def on_result(result: Any, userdata: Optional[int], state: int) -> int:
        q = channel.queue
        if q is None:
            return 0
        try:
            if state in (C.LLMCallState.RKLLM_RUN_NORMAL, C.LLMCallState.RKLLM_RUN_WAITING):
                r = result.contents if result else None
                q.put(_Token((r.text or b"") if r else b"", r.token_id if r else -1))
            elif state == C.LLMCallState.RKLLM_RUN_FINISH:
                perf = result.contents.perf if result else C.RKLLMPerfStat()
                q.put(_Finish(DecodeStats(
                    prefill_tokens=perf.prefill_tokens, prefill_ms=perf.prefill_time_ms,
                    generate_tokens=perf.generate_tokens, generate_ms=perf.generate_time_ms,
                    memory_mb=perf.memory_usage_mb,
                )))
            elif state == C.LLMCallState.RKLLM_RUN_ERROR:
                q.put(_Problem("the runtime reported RKLLM_RUN_ERROR"))
            else:
                q.put(_Problem(f"the result callback got an unknown LLMCallState {state} (not a 1.3.0 runtime?)"))
        except BaseException as err:  # noqa: BLE001 - nothing may propagate into C
            q.put(_CallbackFailed(err))
        return 0

    return C.LLMResultCallback(on_result)


class _Run:
    """Everything one rkllm_run points into, kept alive until the run has returned."""

    def __init__(self, embeddings: np.ndarray, infer: C.RKLLMInferParam, sampling: C.RKLLMSamplingParam,
                 max_new_tokens: int, keep_history: bool):
        self.embeddings = embeddings
        self.sampling = sampling
        self.infer = infer
        self.max_new_tokens = max_new_tokens
        self.keep_history = keep_history
        self.input = C.RKLLMInput()
        self.input.role = b"user"
        self.input.enable_thinking = False
        self.input.input_type = C.RKLLMInputType.RKLLM_INPUT_EMBED
        self.input.embed_input.embed = embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.input.embed_input.n_tokens = embeddings.shape[0]
        self.queue: "queue.SimpleQueue[_Event]" = queue.SimpleQueue()


class RKLLMDecoder:
    """A `decoder.rkllm` loaded in librkllmrt 1.3.0; implements board.decoder.Decoder.

    `hidden_size` comes from the bundle manifest (the runtime cannot report it) and guards every
    call: embeddings of another width are refused before they reach C. `sampling` is the default
    for generate() calls that pass none. `enabled_cpus` picks CPU cores (default: the big cores,
    board.cpus; None: the runtime's default); `base_domain_id` is the NPU memory domain, 1 as
    Rockchip's multimodal demo uses on RK3588 so the decoder stays apart from the vision model's domain 0.
    `eos_token_ids` (the bundle's) arm the EOS guard; `log_level` sets RKLLM_LOG_LEVEL for rkllm_init
    (None: leave the environment alone). `notices` collects what the runtime would not do (e.g. the
    empty template).
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        *,
        hidden_size: int,
        max_context: int,
        sampling: SamplingParams = SamplingParams(),
        skip_special_token: bool = True,
        enabled_cpus: Optional[Sequence[int]] = BIG_CORES,
        base_domain_id: int = 1,
        eos_token_ids: Sequence[int] = (),
        embed_flash: bool = False,
        log_level: Optional[int] = None,
        library: Optional[C.RKLLMLibrary] = None,
        library_dirs: Sequence[Union[str, os.PathLike]] = (),
    ):
        self._handle: Optional[C.LLMHandle] = None  # first, so close()/__del__ work after any failure
        self._lock = threading.Lock()  # guards _handle and _run_active against close()/abort()
        self._busy = threading.Lock()  # one generate() at a time
        self._abort_requested = threading.Event()
        self._run_active = False
        self._worker: Optional[threading.Thread] = None
        self._history_kept = False
        self._last_run: Optional[_Run] = None  # its embeddings stay alive until the next run or a clear
        self.notices: List[str] = []
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.model_path = Path(model_path)
        self.hidden_size = int(hidden_size)
        self.max_context = int(max_context)
        self.sampling = sampling.checked()
        if self.hidden_size <= 0 or self.max_context <= 0:
            raise InputError(f"hidden_size and max_context must be positive, got {hidden_size} and {max_context}")
        if not self.model_path.is_file():
            raise BundleError(f"decoder model not found: {self.model_path}",
                              hint="the bundle folder must contain decoder.rkllm; copy the whole bundle again")
        self._lib = library if library is not None else C.load_library(library_dirs)

        param = self._lib.rkllm_createDefaultParam()
        param.model_path = os.fsencode(self.model_path)
        param.max_context_len = self.max_context
        param.max_new_tokens = self.sampling.max_new_tokens
        _apply_sampling(param, self.sampling)
        param.skip_special_token = skip_special_token
        param.ignore_eos_token = False
        param.is_async = False
        param.extend_param.n_batch = 1
        param.extend_param.base_domain_id = base_domain_id
        param.extend_param.embed_flash = 1 if embed_flash else 0
        if enabled_cpus is BIG_CORES:  # read now, not when this module was imported
            enabled_cpus = rkllm_cpus()
        if enabled_cpus is not None:
            cpus = sorted(set(int(c) for c in enabled_cpus))
            if not cpus or cpus[0] < 0 or cpus[-1] > 7:
                raise InputError(f"enabled_cpus must be CPU numbers 0..7, got {list(enabled_cpus)}")
            param.extend_param.enabled_cpus_num = len(cpus)
            param.extend_param.enabled_cpus_mask = sum(1 << c for c in cpus)
        self._param = param
        self._channel = _Channel()
        self._callbacks = C.RKLLMCallback()
        self._callbacks.result_callback = _make_result_callback(self._channel)

        if log_level is not None:
            os.environ[LOG_LEVEL_ENV] = str(int(log_level))
        handle = C.LLMHandle()
        rc = self._lib.rkllm_init(ctypes.byref(handle), ctypes.byref(self._param), ctypes.byref(self._callbacks))
        if rc != 0:
            # A failed init is not destroyed: whether the runtime hands out a handle then is
            # undocumented, and destroying a half-made one risks a double free.
            raise DecoderError(
                f"rkllm_init failed with code {rc} for {self.model_path}",
                hint="check that decoder.rkllm was converted by rkllm-toolkit 1.3.0 for this chip, that the "
                "NPU driver is >= 0.9.8, that max_context does not exceed the model's, and that memory is free",
            )
        if not handle.value:
            raise DecoderError(f"rkllm_init returned 0 but no handle for {self.model_path}")
        self._handle = handle
        self._clear_chat_template(handle)

    def _clear_chat_template(self, handle: C.LLMHandle) -> None:
        """No template around EMBED input: the rows are the whole templated sequence already."""
        rc = self._lib.rkllm_set_chat_template(handle, b"", b"", b"")
        if rc != 0:
            notice = (f"rkllm_set_chat_template with an empty template failed with code {rc}: the runtime may wrap "
                      "the embeddings in the model's chat template (the prefill-count check will tell)")
            self.notices.append(notice)
            warnings.warn(notice, stacklevel=3)

    # -- the Decoder protocol -------------------------------------------------------------------

    def generate(
        self, embeddings: np.ndarray, *, sampling: Optional[SamplingParams] = None, keep_history: bool = False
    ) -> Iterator[GenerationStep]:
        """Feed `embeddings` ([n_tokens, hidden_size]) and stream the continuation.

        Everything that can be checked without the runtime is checked here, before the iterator
        exists: the shape (width = hidden_size), finite values, and room in the context.
        """
        sampling = chosen_sampling(sampling, self.sampling)
        if sampling.seed is not None and not sampling.greedy:
            warnings.warn("librkllmrt has no sampling seed; this sampled output is not reproducible", stacklevel=2)
        handle = self._require_open()
        if self._busy.locked():
            raise DecoderError("generate() is already running on this decoder")
        cached = self._kv_cache_size(handle) if keep_history else 0
        emb = checked_embeddings(embeddings, self.hidden_size, cached, self.max_context)
        c_sampling = C.RKLLMSamplingParam()
        for name, _ in C.RKLLMSamplingParam._fields_:
            setattr(c_sampling, name, getattr(self._param, name))
        _apply_sampling(c_sampling, sampling)
        infer = C.RKLLMInferParam()
        infer.mode = C.RKLLMInferMode.RKLLM_INFER_GENERATE
        infer.sampling_params = ctypes.pointer(c_sampling)
        infer.keep_history = 1 if keep_history else 0
        infer.max_new_tokens = sampling.max_new_tokens
        return self._stream(_Run(emb, infer, c_sampling, sampling.max_new_tokens, keep_history))

    def abort(self) -> None:
        """Stop a running generate() (from any thread); its iterator ends with finish_reason 'abort'."""
        with self._lock:
            self._abort_requested.set()
            if self._run_active and self._handle is not None:
                _check(self._lib.rkllm_abort(self._handle), "rkllm_abort")

    def reset(self) -> None:
        """Forget the conversation: clear the whole KV cache."""
        if not self._busy.acquire(blocking=False):
            raise DecoderError("reset() while generate() is running; abort() it first")
        try:
            _check(self._lib.rkllm_clear_kv_cache(self._require_open(), 0, None, None), "rkllm_clear_kv_cache")
            self._history_kept = False
            self._last_run = None
        finally:
            self._busy.release()

    @property
    def history_tokens(self) -> int:
        """Positions the runtime's KV cache holds now (rkllm_get_kv_cache_size), to compare with what a
        conversation expects: every row fed and every token generated in its kept turns."""
        return self._kv_cache_size(self._require_open())

    def close(self) -> None:
        """Stop any run and destroy the handle; safe to call twice, from any thread."""
        if self._handle is None:
            return
        try:
            self.abort()
        finally:
            self._join_worker()
            with self._lock:
                handle, self._handle = self._handle, None
            if handle is not None:
                rc = self._lib.rkllm_destroy(handle)
                self._callbacks = None  # only now may the CFUNCTYPE go
                _check(rc, "rkllm_destroy")

    def __enter__(self) -> "RKLLMDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at collection time
            pass

    # -- internals ------------------------------------------------------------------------------

    def _require_open(self) -> C.LLMHandle:
        handle = self._handle
        if handle is None:
            raise DecoderError("the decoder is closed")
        return handle

    def _kv_cache_size(self, handle: C.LLMHandle) -> int:
        sizes = (ctypes.c_int * 1)()  # one entry per batch; n_batch is 1
        _check(self._lib.rkllm_get_kv_cache_size(handle, sizes), "rkllm_get_kv_cache_size")
        return sizes[0]

    def _stream(self, run: _Run) -> Iterator[GenerationStep]:
        if not self._busy.acquire(blocking=False):
            raise DecoderError("generate() is already running on this decoder")
        try:
            self._join_worker()  # a run left behind by an interrupted cleanup must end first
            handle = self._require_open()
            if not run.keep_history and self._history_kept:
                _check(self._lib.rkllm_clear_kv_cache(handle, 0, None, None), "rkllm_clear_kv_cache")
            self._history_kept = run.keep_history
            self._last_run = run
            self._abort_requested.clear()
            self._channel.queue = run.queue
            with self._lock:
                self._run_active = True
            self._worker = threading.Thread(target=self._run_worker, args=(handle, run), name="rkllm_run", daemon=True)
            self._worker.start()
            try:
                yield from self._events(run)
            except BaseException:  # Ctrl-C, generator closed early, a consumer's exception: stop the run
                self._abort_and_wait()
                raise
        finally:
            self._channel.queue = None
            self._busy.release()

    def _run_worker(self, handle: C.LLMHandle, run: _Run) -> None:
        outcome: Union[int, BaseException]
        try:
            outcome = self._lib.rkllm_run(handle, ctypes.byref(run.input), ctypes.byref(run.infer), None)
        except BaseException as err:  # noqa: BLE001 - reported by the consumer
            outcome = err
        with self._lock:
            self._run_active = False
        run.queue.put(_Done(outcome))

    def _abort_and_wait(self) -> None:
        try:
            self.abort()
        finally:
            self._join_worker()

    def _join_worker(self) -> None:
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def _events(self, run: _Run) -> Iterator[GenerationStep]:
        joiner = _Utf8Joiner()
        stats: Optional[DecodeStats] = None
        n_tokens = 0
        at_eos = False  # the EOS guard stopped the run: what the runtime streams after it is dropped
        problems: List[str] = []
        while True:
            try:
                event = run.queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(event, _Token):
                if self._abort_requested.is_set():
                    self.abort()  # an abort that reached the runtime before the run started is lost: repeat it
                    continue
                if at_eos:
                    continue
                n_tokens += 1
                if event.token_id in self.eos_token_ids:
                    at_eos = True
                    self._stop_runtime()
                yield GenerationStep(text=joiner.feed(event.text),
                                     token_id=event.token_id if event.token_id >= 0 else None)
            elif isinstance(event, _Finish):
                stats = event.stats
            elif isinstance(event, _Problem):
                if not at_eos:  # after the guard's rkllm_abort an error state is the runtime's answer to it
                    problems.append(event.message)
            elif isinstance(event, _CallbackFailed):
                problems.append(f"the result callback failed: {event.error!r}")
            elif isinstance(event, _Done):
                outcome = event.outcome
                break
        self._worker = None
        tail = joiner.flush()
        if self._abort_requested.is_set():
            yield GenerationStep(text=tail, finish_reason="abort", stats=stats or DecodeStats())
            return
        if isinstance(outcome, BaseException):
            raise DecoderError(f"rkllm_run could not be called: {outcome}") from outcome
        if outcome != 0 and at_eos and not problems:
            outcome = 0  # the runtime's answer to our own rkllm_abort at the EOS token
        if outcome != 0 or problems:
            self._history_kept = True  # the cache state is unknown: clear it before a fresh turn
            raise DecoderError(f"rkllm_run failed (code {outcome}): " + ("; ".join(problems) or "no detail given"))
        fed = int(run.embeddings.shape[0])
        if stats is not None and stats.prefill_tokens != fed:
            self._history_kept = True
            raise PrefillMismatch(
                f"the runtime prefilled {stats.prefill_tokens} tokens but {fed} embedding rows were fed: it added or "
                "dropped tokens (a chat template applied to EMBED input?)",
                hint="run `python -m board doctor --bundle DIR` and attach its --json output to a bug report",
            )
        finish = "stop" if at_eos or n_tokens < run.max_new_tokens else "length"
        yield GenerationStep(text=tail, finish_reason=finish, stats=stats or DecodeStats())

    def _stop_runtime(self) -> None:
        """rkllm_abort for the EOS guard: ends the run without it counting as the caller's abort."""
        with self._lock:
            if self._run_active and self._handle is not None:
                self._lib.rkllm_abort(self._handle)


def _check(rc: int, function: str) -> None:
    if rc != 0:
        raise DecoderError(f"{function} failed with code {rc}")


def _apply_sampling(target: Union[C.RKLLMParam, C.RKLLMSamplingParam], s: SamplingParams) -> None:
    """Copy our sampling settings into either struct; greedy becomes top_k = 1 (temperature 0 is
    our spelling of greedy, not a value to hand the runtime)."""
    target.top_k = 1 if s.greedy else s.top_k
    target.top_p = s.top_p
    target.temperature = s.temperature if s.temperature > 0 else 1.0
    target.repeat_penalty = s.repeat_penalty
