"""The board runtime as one object: images -> tiles -> vision rows -> sequence -> decoder -> text.

    with Pipeline("bundle/") as vlm:                       # or Pipeline(..., emulate=True) on x86
        answer = vlm.ask("What is in this image?", ["cat.jpg"]).collect()
        chat = vlm.chat()
        for step in chat.send("Describe it.", ["cat.jpg"]): print(step.text, end="")
        chat.send("And the colours?").collect()           # feeds only the new turn's rows

On the board the stages are RKNNLite (vision, NPU) and librkllmrt (decoder, EMBED input); with
`emulate=True` they are ONNX Runtime and PyTorch on the bundle's host/ files. Everything between
them (image decoding, splitting, prompt, embedding sequence, chat state) is the same code.

Multi-turn chat keeps the decoder's KV cache. After an answer that ended with the end-of-turn token
the cache holds [conversation so far, answer tokens, end-of-turn token]; the re-templated
conversation continues with the rest of the template's end-of-turn piece (the newline after
`<end_of_utterance>`) and the new user message, so exactly that text is tokenized and fed, and the
sequence the model has seen equals the reference's full conversation (with the answer as the tokens
the model generated). After an answer cut by max_new_tokens the whole end-of-turn piece is fed.
After an abort, an error, or a turn of another conversation, the cache state is not known (or not
ours) and the next turn re-feeds the whole re-templated conversation instead.

The history is also checked, because the runtime's KV cache across turns is what rkllm.h does not
promise (Rockchip's demos all run keep_history=0): before a turn continues a conversation, the
decoder's `history_tokens` (librkllmrt's rkllm_get_kv_cache_size) must equal what the conversation
fed and generated; if not, the cache is cleared and the whole conversation re-fed, with a notice the
first time.

Context length: upstream's rule is max_context > history + prompt + max_new_tokens. A turn whose
rows leave no room for an answer next to the history raises `ContextFull` and changes nothing;
`Chat.send(..., on_overflow="reset")` instead starts the conversation over with just the new message
and says so in `Answer.notices` (the CLI does that). A single message too long for the context on
its own is ContextLengthExceeded (a PromptError). A max_new_tokens larger than the room left is capped to it (a notice says
so; the answer then ends with finish_reason "length").
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import bundle_schema as S
from .bundle import DECODER_HF, DECODER_RKLLM, Bundle
from .decoder import Decoder, GenerationStep, SamplingParams
from .errors import BundleError, ContextLengthExceeded, DecoderError, InputError
from .image_io import image_from_array, read_bytes
from .prompt import CONTROL_TOKEN_POLICIES, Prompt, build_prompt, drop_leading_space
from .sequence import build_sequence, stack_rows
from .system_checks import CheckResult, SystemPaths, require, run_checks
from .tiles import Decoding, TilePlan, budget_settings, check_tile_budget, plan_tiles, start_decode, stream_tiles
from .vision import (EncodedImage, EncodeJob, OnnxVisionEncoder, RKNNVisionEncoder, VisionCache, VisionEncoder,
                     image_key)

ImageInput = Union[str, Path, bytes, bytearray, memoryview, np.ndarray]
Message = Mapping[str, Any]


class ContextFull(ContextLengthExceeded):
    """The new turn does not fit next to the conversation's history in the model's context."""


@dataclass
class Timings:
    """Where one turn's time went (milliseconds), plus the model load and the process's peak memory."""

    load_ms: float = 0.0
    images: int = 0
    images_cached: int = 0
    image_decode_ms: float = 0.0
    tiles: int = 0
    tiles_ms: float = 0.0
    vision_tiles: int = 0  # tiles encoded in this turn (cached images cost none)
    vision_ms: float = 0.0  # waiting for vision rows after the last tile was cut (NPU time not hidden)
    npu_ms: float = 0.0  # from the first tile handed to the vision encoder to the last row back
    sequence_ms: float = 0.0
    history_tokens: int = 0  # what the decoder already held
    prompt_tokens: int = 0  # rows fed in this turn
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # from the start of the turn (images included) to the first token
    decode_tokens: int = 0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def vision_ms_per_tile(self) -> float:
        return self.npu_ms / self.vision_tiles if self.vision_tiles else 0.0

    @property
    def image_encode_ms(self) -> float:
        """Wall time from the first image's bytes to the last vision row (the front end and the wait)."""
        return self.image_decode_ms + self.tiles_ms + self.vision_ms

    @property
    def prefill_tok_s(self) -> float:
        return 1e3 * self.prompt_tokens / self.prefill_ms if self.prefill_ms > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return 1e3 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(vision_ms_per_tile=self.vision_ms_per_tile, image_encode_ms=self.image_encode_ms,
                 prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


@dataclass
class Answer:
    """A finished turn."""

    text: str
    token_ids: list[int]  # generated ids, the end-of-turn token included when the decoder reports it
    finish_reason: str  # stop | length | abort
    timings: Timings
    tiles_per_image: list[int] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "tiles_per_image": self.tiles_per_image, "timings": self.timings.to_dict(), "notices": self.notices}


def peak_rss_mb() -> float:
    """The process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Turn:
    """One request from its start: its clock, where its time goes, and notices for the user.

    `Pipeline.begin_turn()` makes one (an abort requested from then on stops this turn) and
    `Pipeline.reply()` streams its answer; a Chat fills it in between.
    """

    started: float
    timings: Timings
    notices: list[str] = field(default_factory=list)


def host_file(bundle: Bundle, rel: str, verify: bool) -> Path:
    """A file of the bundle's host/ folder (what emulation runs), checksum-verified unless `verify` is off."""
    if verify:
        return bundle.verify_host_files(rel)
    path = bundle.path(rel)
    if not path.exists():
        raise BundleError(f"the bundle has no {rel}; emulation needs the host/ folder that host.convert writes",
                          hint="run --emulate on the machine that converted the bundle, or copy its host/ folder too")
    return path


def open_vision_encoder(bundle: Bundle, *, emulate: bool, npu_cores: str = "parallel",
                        verify: bool = True, fallback: bool = False) -> VisionEncoder:
    """The bundle's vision encoder: vision.rknn in RKNNLite (`npu_cores` mode) on the board, or the
    host/ ONNX model in ONNX Runtime with `emulate` (x86 has no NPU cores: the mode is ignored);
    `fallback`: the opt-in fp16 conv model instead (board.vision.vision_model chooses the file).
    The Pipeline, board/bench.py and board/doctor.py open it here."""
    model = bundle.vision_model(fallback)
    kwargs = dict(tokens_per_tile=bundle.prompt_format.image_seq_len, hidden_size=bundle.hidden_size,
                  layout=model.layout)
    if emulate:
        if model.onnx is None:
            raise BundleError(f"the bundle names no ONNX model for {model.file}; emulation needs it", hint=S.REBUILD_HINT)
        return OnnxVisionEncoder(host_file(bundle, model.onnx, verify), settings=bundle.split_settings, **kwargs)
    return RKNNVisionEncoder(bundle.path(model.file), tile=bundle.split_settings.tile, cores=npu_cores,
                             built_with=bundle.built_with.get(S.Toolkits.RKNN_TOOLKIT2), **kwargs)


class _MediaEncoding:
    """One turn's images (and video frames) on their way through the front end and the vision encoder.

    The caller's thread decodes and cuts one image after the other (board.tiles.stream_tiles; the pixel
    work runs on the big cores, board.cpus) and hands each tile to the encoder's job as soon as it
    exists, noting where in the job each of the image's tiles is (the stream may send a tile early and
    again later; the later one counts); the encoder's workers run the NPU meanwhile. `finish()` waits
    for every row and fills the session cache. Timings: image_decode_ms (to the end of the whole
    decode) and tiles_ms (from there to the last tile) are the front end's time, vision_ms the wait for rows
    after the last tile was cut (the NPU time the front end did not hide), npu_ms the span from the
    first tile handed over to the last row back.
    """

    def __init__(self, pipeline: "Pipeline", timings: Timings):
        self.pipeline = pipeline
        self.timings = timings
        self.job: Optional[EncodeJob] = None  # every tile of the turn, in prompt order
        self.first_tile_at: Optional[float] = None
        # per image in prompt order: (plan, cache key, where its tiles are in the job, or its cached encoding)
        self.entries: list[tuple[TilePlan, Optional[str], Union[list[int], EncodedImage]]] = []
        self.pending: dict[str, int] = {}  # cache key -> entry index, for images of this turn still encoding

    def _add(self, tiles: np.ndarray) -> None:
        if self.job is None:
            vision = self.pipeline.vision
            if vision is None:
                raise DecoderError("the pipeline is closed")
            self.job = vision.start()
            self.first_tile_at = time.perf_counter()
        self.job.add(tiles)

    def image(self, source: ImageInput, budget: Optional[int]) -> None:
        p, t = self.pipeline, self.timings
        t0 = time.perf_counter()
        data: Any = image_from_array(source) if isinstance(source, np.ndarray) else read_bytes(source)
        key = image_key(data, p.settings, f"max_tiles={budget}")
        t.images += 1
        hit = p.cache.get(key)
        if hit is None and key in self.pending:  # the same image again in this turn: encoded once
            plan = self.entries[self.pending[key]][0]
            hit = EncodedImage(plan, None, cached=True)  # rows filled in by finish()
        if hit is not None:
            t.images_cached += 1
            t.tiles += hit.plan.n_tiles
            self.entries.append((hit.plan, key, hit))
            return
        if isinstance(data, np.ndarray):
            settings = budget_settings(p.settings, data.shape[0], data.shape[1], budget)
            decoding = Decoding(plan_tiles(data.shape[0], data.shape[1], settings), settings, pixels=data)
        else:
            decoding = start_decode(data, p.settings, budget)
        plan = decoding.plan
        places = [0] * plan.n_tiles  # where each tile of the plan is in the job (the last one sent for a place)
        for place, tile in stream_tiles(decoding):
            places[place] = len(self.job) if self.job is not None else 0
            self._add(tile[None])
        done = time.perf_counter()
        decoded = decoding.decoded_at or done
        t.image_decode_ms += (decoded - t0) * 1e3
        t.tiles_ms += (done - decoded) * 1e3
        t.tiles += plan.n_tiles
        t.vision_tiles += plan.n_tiles
        self.pending[key] = len(self.entries)
        self.entries.append((plan, key, places))

    def video(self, path: Union[str, Path]) -> list[dict[str, Any]]:
        """Sample and decode the video, then cut and hand over one tile per frame; returns its items."""
        from .video import VideoSettings, frame_plan, frame_tile, read_video, video_items

        p, t = self.pipeline, self.timings
        settings = VideoSettings.from_manifest(p.bundle.video)
        t0 = time.perf_counter()
        video = read_video(path, settings)
        t1 = time.perf_counter()
        for frame in video.frames:
            first = len(self.job) if self.job is not None else 0
            self._add(frame_tile(frame, settings, p.settings)[None])
            self.entries.append((frame_plan(frame, p.settings), None, [first]))
        t.image_decode_ms += (t1 - t0) * 1e3
        t.tiles_ms += (time.perf_counter() - t1) * 1e3
        t.images += len(video.frames)
        t.tiles += len(video.frames)
        t.vision_tiles += len(video.frames)
        return video_items(video, settings)

    def finish(self) -> list[EncodedImage]:
        """Wait for the rows; the encodings in prompt order (new images also go into the cache)."""
        p, t = self.pipeline, self.timings
        rows = None
        if self.job is not None:
            t0 = time.perf_counter()
            rows = self.job.result()
            done = time.perf_counter()
            t.vision_ms += (done - t0) * 1e3
            t.npu_ms += (done - self.first_tile_at) * 1e3
        encoded: list[EncodedImage] = []
        for plan, key, where in self.entries:
            if isinstance(where, list):
                image = EncodedImage(plan, rows[where])
                if key is not None:
                    p.cache.put(key, image)
            elif where.rows is None:  # a repeat of an image encoded in this turn
                image = EncodedImage(plan, rows[self.entries[self.pending[key]][2]], cached=True)
            else:
                image = where
            encoded.append(image)
        return encoded

    def cancel(self) -> None:
        """Drop the tiles not started (after an error or Ctrl-C in the front end)."""
        if self.job is not None:
            self.job.cancel()


class Reply:
    """A streamed answer: iterate for GenerationSteps (text pieces, then one with finish_reason);
    `answer` is set when the stream is done. Preparation (images, prompt) already happened."""

    def __init__(self, pipeline: "Pipeline", steps: Iterator[GenerationStep], prompt: Prompt, turn: Turn,
                 on_done: Callable[[Optional[Answer]], None]):
        self._pipeline = pipeline
        self._steps = steps
        self._timings = turn.timings
        self._started = turn.started
        self._on_done = on_done
        self.prompt = prompt  # what this turn fed (after the decoder's history, if any)
        self.notices = turn.notices
        self.answer: Optional[Answer] = None
        self._consumed = False

    def __iter__(self) -> Iterator[GenerationStep]:
        if self._consumed:
            raise DecoderError("this reply has already been streamed")
        self._consumed = True
        text: list[str] = []
        ids: list[int] = []
        finish, stats = "stop", None
        timings = self._timings
        pipeline = self._pipeline
        try:
            if pipeline.abort_requested:
                finish = "abort"
                yield GenerationStep(finish_reason="abort")
            else:
                for step in self._steps:
                    if step.token_id is not None:
                        if not ids:
                            timings.ttft_ms = (time.perf_counter() - self._started) * 1e3
                        ids.append(step.token_id)
                    text.append(step.text)
                    if step.finish_reason is not None:
                        finish, stats = step.finish_reason, step.stats
                    yield step
                    if pipeline.abort_requested and step.finish_reason is None:
                        pipeline.abort()  # repeated: an abort before the decoder started is lost
        except BaseException:
            self._on_done(None)
            raise
        if stats is not None:
            timings.prefill_ms = stats.prefill_ms
            timings.decode_tokens, timings.decode_ms = stats.generate_tokens, stats.generate_ms
        timings.total_ms = (time.perf_counter() - self._started) * 1e3
        timings.peak_rss_mb = peak_rss_mb()
        self.answer = Answer("".join(text), ids, finish, timings, list(self.prompt.tiles_per_image), self.notices)
        self._on_done(self.answer)

    def collect(self) -> Answer:
        """Run the whole answer and return it."""
        for _ in self:
            pass
        assert self.answer is not None
        return self.answer


class Pipeline:
    """A loaded bundle: vision encoder, decoder, tokenizer, embedding table and a vision cache.

    One request at a time (the decoder holds one conversation); a server queues requests in front.
    `max_tiles` is the default tile budget per image (None: the checkpoint's full splitting).
    `vision_fallback` opens the bundle's opt-in conv vision model; `embed_flash` (None: the bundle's
    setting) and `rkllm_log_level` (None: RKLLM_LOG_LEVEL as it is) go to librkllmrt.

    A turn is `begin_turn()`, then the images (`encode_media`) and the prompt (`full_prompt` or
    `continuation_prompt`), then `reply()`. The decoder's KV cache holds at most one conversation's
    history: `reply(..., history=owner)` gives it to `owner` and `holds_history(owner)` says whether
    it still has it, so a Chat knows when it may feed only its new turn.
    """

    def __init__(
        self,
        bundle: Union[str, Path, Bundle],
        *,
        emulate: bool = False,
        verify: bool = True,
        npu_cores: str = "parallel",
        max_tiles: Optional[int] = None,
        sampling: SamplingParams = SamplingParams(),
        check_system: bool = True,
        system_paths: SystemPaths = SystemPaths(),
        vision: Optional[VisionEncoder] = None,
        decoder: Optional[Decoder] = None,
        cache_bytes: int = 256 << 20,
        vision_fallback: bool = False,
        embed_flash: Optional[bool] = None,
        rkllm_log_level: Optional[int] = None,
        control_tokens: str = "special",
    ):
        t0 = time.perf_counter()
        if control_tokens not in CONTROL_TOKEN_POLICIES:
            raise InputError(f"control_tokens must be one of {', '.join(CONTROL_TOKEN_POLICIES)}, got {control_tokens!r}")
        self.control_tokens = control_tokens  # what special-token strings in message text become (board/prompt.py)
        self.vision: Optional[VisionEncoder] = None
        self.decoder: Any = None
        self.emulate = emulate
        self.checks: list[CheckResult] = []
        if check_system and (vision is None or decoder is None):  # the board first: what a fresh board lacks
            root = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
            self.checks = run_checks(emulate=emulate, library_dirs=[root], paths=system_paths)
            require(self.checks)
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify, need_decoder=not emulate)
        if self.checks and not emulate:  # the bundle's target (SoC, NPU driver minimum) against this board
            require(self.bundle.check_board(system_paths))
        self.max_tiles = check_tile_budget(max_tiles)
        self.sampling = sampling
        self.format = self.bundle.prompt_format
        self.settings = self.bundle.split_settings
        self.tokenizer = self.bundle.tokenizer()
        self.table = self.bundle.embeddings()
        self.image_token_id = self.bundle.image_token_id
        self.eos_token_ids = set(self.bundle.eos_token_ids)
        self.max_context = self.bundle.max_context
        self.cache = VisionCache(cache_bytes)
        self._abort = threading.Event()
        self._history_owner: Optional[object] = None  # whose conversation the decoder's cache holds
        self._history_reported = False  # a lost KV cache is reported once
        self.vision_fallback = vision_fallback
        try:
            self.vision = vision if vision is not None else open_vision_encoder(
                self.bundle, emulate=emulate, npu_cores=npu_cores, verify=verify, fallback=vision_fallback)
            self.decoder = decoder if decoder is not None else self._open_decoder(
                verify, self.bundle.embed_flash if embed_flash is None else embed_flash, rkllm_log_level)
        except BaseException:
            self.close()
            raise
        self.load_ms = (time.perf_counter() - t0) * 1e3

    # -- loading ----------------------------------------------------------------------------------

    def _open_decoder(self, verify: bool, embed_flash: bool, log_level: Optional[int]) -> Decoder:
        if self.emulate:
            from .decoder_torch import TorchDecoder

            return TorchDecoder(host_file(self.bundle, DECODER_HF, verify), tokenizer=self.tokenizer,
                                eos_token_ids=sorted(self.eos_token_ids), max_context=self.max_context,
                                hidden_size=self.bundle.hidden_size, sampling=self.sampling)
        from .decoder_rkllm import RKLLMDecoder

        return RKLLMDecoder(self.bundle.path(DECODER_RKLLM), hidden_size=self.bundle.hidden_size,
                            max_context=self.max_context, sampling=self.sampling, library_dirs=[self.bundle.root],
                            eos_token_ids=sorted(self.eos_token_ids), embed_flash=embed_flash, log_level=log_level)

    def close(self) -> None:
        """Release the NPU runtimes / models; safe to call twice."""
        vision, self.vision = self.vision, None
        decoder, self.decoder = self.decoder, None
        try:
            if vision is not None:
                vision.close()
        finally:
            if decoder is not None:
                decoder.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def abort(self) -> None:
        """Stop the running answer (from a signal handler or another thread); it ends with 'abort'."""
        self._abort.set()
        if self.decoder is not None:
            self.decoder.abort()

    @property
    def abort_requested(self) -> bool:
        """Whether abort() was called since the current turn began."""
        return self._abort.is_set()

    def describe(self) -> dict[str, Any]:
        """What is loaded, for --json and logs."""
        return {
            "model": self.bundle.model_id,
            "tiny": self.bundle.is_tiny,
            "vision": getattr(self.vision, "backend", type(self.vision).__name__),
            "vision_fallback": self.vision_fallback,
            "vision_runtime": getattr(self.vision, "sdk_version", None),
            "npu_cores": getattr(self.vision, "cores", None),
            "decoder": type(self.decoder).__name__,
            "max_context": self.max_context,
            "load_ms": round(self.load_ms, 1),
            "checks": [asdict(c) for c in self.checks],
        }

    # -- images -----------------------------------------------------------------------------------

    def encode_image(self, source: ImageInput, timings: Timings, max_tiles: Optional[int] = None) -> EncodedImage:
        """One image through decoding, splitting and the vision encoder (or from the session cache)."""
        return self.encode_media([source], None, timings, max_tiles)[1][0]

    def encode_media(self, images: Sequence[ImageInput], video: Optional[Union[str, Path]], timings: Timings,
                     max_tiles: Optional[int] = None) -> tuple[list[dict[str, Any]], list[EncodedImage]]:
        """Content items and encodings for a message's video (first) and images (then), in prompt order.

        One pass through the front end, overlapped with the vision encoder: every tile goes to the
        encoder as soon as it is cut, so the NPU works on the first tiles (and on image k) while the
        rest (image k+1) are cut, and the turn waits for the rows once, at the end.
        """
        if self.vision is None:
            raise DecoderError("the pipeline is closed")
        budget = self.max_tiles if max_tiles is None else max_tiles
        media = _MediaEncoding(self, timings)
        items: list[dict[str, Any]] = []
        try:
            if video is not None:
                items = media.video(video)
            for image in images:
                media.image(image, budget)
                items.append({"type": "image"})
            return items, media.finish()
        except BaseException:
            media.cancel()
            raise

    # -- prompts and turns --------------------------------------------------------------------------

    def continuation_prompt(self, resume: str, messages: Sequence[Message], plans: Sequence[Any]) -> Prompt:
        """Token ids for turns appended to a conversation the decoder holds: `resume` (the rest of the
        previous end-of-turn piece) + the turns rendered without the opening, tokenized as one text."""
        return build_prompt(messages, plans, self.format, self.tokenizer, self.image_token_id, resume=resume,
                            control_tokens=self.control_tokens)

    def full_prompt(self, messages: Sequence[Message], encoded: Sequence[EncodedImage]) -> Prompt:
        """Token ids of a whole conversation (opening included), refused if it cannot fit the context."""
        return build_prompt(messages, [e.plan for e in encoded], self.format, self.tokenizer, self.image_token_id,
                            max_tokens=self.max_context - 1, control_tokens=self.control_tokens)

    def answer_room(self, used: int) -> int:
        """New tokens that fit after `used` context positions: upstream's max_context > used + max_new_tokens."""
        return self.max_context - 1 - used

    def history_intact(self, owner: object, expected: int, turn: Turn) -> bool:
        """Whether the decoder's KV cache holds exactly the `expected` positions of `owner`'s conversation.

        A decoder that cannot say (no `history_tokens`) is trusted. On a mismatch the cache is cleared
        so the caller re-feeds the whole conversation; the first time, the turn says why.
        """
        if not self.holds_history(owner):
            return False
        try:
            held = getattr(self.decoder, "history_tokens", None)
        except DecoderError:
            held = -1
        if held is None or held == expected:
            return True
        self._history_owner = None
        self.decoder.reset()
        if not self._history_reported:
            self._history_reported = True
            turn.notices.append(
                f"the runtime's KV cache holds {held} tokens where the conversation expects {expected}: it did not keep "
                "the history, so each turn re-feeds the whole conversation (slower, answers unchanged; reported once)")
        return False

    def begin_turn(self) -> Turn:
        """A new turn: a fresh abort flag (an abort requested from now on stops this turn) and timings."""
        self._abort.clear()
        return Turn(time.perf_counter(), Timings(load_ms=self.load_ms))

    def holds_history(self, owner: object) -> bool:
        """Whether the decoder's KV cache still holds `owner`'s conversation: its last turn went through
        reply(history=owner) and no other turn has used the decoder since."""
        return owner is not None and self._history_owner is owner

    def reply(self, turn: Turn, prompt: Prompt, encoded: Sequence[EncodedImage], *,
              sampling: Optional[SamplingParams] = None, history: Optional[object] = None, resume: bool = False,
              on_done: Callable[[Optional[Answer]], None] = lambda answer: None) -> Reply:
        """Assemble the sequence (count check first) and hand the decoder a lazy start.

        `history=None`: a stateless call (the cache is cleared; whoever held it must re-feed).
        `history=owner`: this turn stays in the cache as `owner`'s conversation, appended to what
        it holds with `resume=True` (holds_history(owner) must be true), else on an empty cache.
        `on_done` gets the Answer when the stream ends, or None when it failed.
        """
        if self.decoder is None:
            raise DecoderError("the pipeline is closed")
        if resume and not self.holds_history(history):
            raise DecoderError("the decoder's cache no longer holds this conversation; feed it whole")
        sampling = sampling or self.sampling
        used = (turn.timings.history_tokens if resume else 0) + len(prompt)
        room = self.answer_room(used)
        if room < 1:
            raise ContextFull(f"the prompt leaves no room for an answer: {used} tokens, max_context is {self.max_context}",
                              hint="start a new conversation, or use fewer image tiles or a shorter prompt")
        if sampling.max_new_tokens > room:
            turn.notices.append(f"max_new_tokens {sampling.max_new_tokens} capped to {room}: the context holds "
                                f"{self.max_context} tokens and this turn starts at {used}")
            sampling = replace(sampling, max_new_tokens=room)
        t0 = time.perf_counter()
        sequence = build_sequence(prompt, self.table, stack_rows([e.rows for e in encoded], self.table.shape[1]))
        turn.timings.sequence_ms += (time.perf_counter() - t0) * 1e3
        turn.timings.prompt_tokens = len(prompt)
        if not resume:
            self._history_owner = history
            if history is not None:
                self.decoder.reset()
        steps = self.decoder.generate(sequence, sampling=sampling, keep_history=history is not None)  # checks run now
        return Reply(self, steps, prompt, turn, on_done)

    def generate(self, messages: Sequence[Message], images: Sequence[ImageInput] = (), *,
                 sampling: Optional[SamplingParams] = None, max_tiles: Optional[int] = None) -> Reply:
        """A whole conversation in one call (no state kept): `images` fill the image items in order."""
        turn = self.begin_turn()
        _, encoded = self.encode_media(images, None, turn.timings, max_tiles)
        return self.reply(turn, self.full_prompt(messages, encoded), encoded, sampling=sampling)

    def ask(self, question: str, images: Sequence[ImageInput] = (), *, video: Optional[Union[str, Path]] = None,
            system: Optional[str] = None, sampling: Optional[SamplingParams] = None,
            max_tiles: Optional[int] = None) -> Reply:
        """One question about a video and/or images (placed before the text, as SmolVLM is prompted)."""
        turn = self.begin_turn()
        items, encoded = self.encode_media(images, video, turn.timings, max_tiles)
        messages = _system_message(system) + [
            {"role": "user", "content": items + [{"type": "text", "text": question}]}]
        return self.reply(turn, self.full_prompt(messages, encoded), encoded, sampling=sampling)

    def chat(self, system: Optional[str] = None) -> "Chat":
        """A multi-turn conversation that keeps the decoder's KV cache between turns."""
        return Chat(self, system)


def _system_message(system: Optional[str]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []


class Chat:
    """A conversation: the re-templated messages, their images, and how its next turn continues.

    Uses only the Pipeline's public turn interface; whether the decoder's cache still holds this
    conversation is the pipeline's to say (`holds_history`), how to continue it is the chat's.
    """

    def __init__(self, pipeline: Pipeline, system: Optional[str] = None):
        self.pipeline = pipeline
        self._system = _system_message(system)
        self.reset()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self._messages)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self._messages: list[dict[str, Any]] = list(self._system)
        self._images: list[EncodedImage] = []
        self._resumable = False  # the last turn ended so that the next may feed only itself
        self._history = 0  # rows the decoder's cache holds for this conversation
        self._resume = ""  # text that completes the last end-of-turn piece

    def send(self, text: str, images: Sequence[ImageInput] = (), *, video: Optional[Union[str, Path]] = None,
             sampling: Optional[SamplingParams] = None, max_tiles: Optional[int] = None,
             on_overflow: str = "error") -> Reply:
        """Add a user turn (video and images before the text) and stream the answer."""
        if on_overflow not in ("error", "reset"):
            raise InputError(f"on_overflow must be 'error' or 'reset', got {on_overflow!r}")
        p = self.pipeline
        turn = p.begin_turn()
        items, encoded = p.encode_media(images, video, turn.timings, max_tiles)
        message = {"role": "user", "content": items + [{"type": "text", "text": text}]}
        continuing = self._resumable and p.history_intact(self, self._history, turn)
        if continuing:
            prompt = p.continuation_prompt(self._resume, [message], [e.plan for e in encoded])
            fits = p.answer_room(self._history + len(prompt)) >= 1
        else:
            prompt = build_prompt(self._messages + [message], [e.plan for e in self._images + encoded], p.format,
                                  p.tokenizer, p.image_token_id, control_tokens=p.control_tokens)
            fits = p.answer_room(len(prompt)) >= 1
        if not fits:
            used = self._history + len(prompt) if continuing else len(prompt)
            if len(self._messages) == len(self._system):  # nothing to drop: the message alone is too long
                p.full_prompt(self._messages + [message], encoded)  # raises ContextLengthExceeded for the message alone
            if on_overflow == "error":
                raise ContextFull(
                    f"the conversation no longer fits the model's context: {used} tokens, max_context is {p.max_context}",
                    hint="start a new conversation (/reset in --chat), or use fewer image tiles (--max-tiles)",
                )
            turn.notices.append(f"the conversation no longer fits the model's context ({used} of {p.max_context} "
                                "tokens); starting over with this message")
            self.reset()
            continuing = False
            prompt = p.full_prompt(self._messages + [message], encoded)
        if not continuing:
            self._history = 0
        turn.timings.history_tokens = self._history

        def on_done(answer: Optional[Answer]) -> None:
            self._finish(message, encoded, len(prompt), answer)

        self._resumable = False  # until this turn has finished cleanly
        return p.reply(turn, prompt, encoded if continuing else self._images + encoded, sampling=sampling,
                       history=self, resume=continuing, on_done=on_done)

    def _finish(self, message: dict[str, Any], encoded: list[EncodedImage], fed: int, answer: Optional[Answer]) -> None:
        """Record the turn and decide how the next one continues (see the module docstring)."""
        if answer is None:  # an exception: the turn did not happen, the cache is unknown
            self._resumable = False
            return
        p = self.pipeline
        self._messages += [message, {"role": "assistant", "content": drop_leading_space(answer.text)}]
        self._images += encoded
        self._history += fed + len(answer.token_ids)
        end = p.format.end_of_turn
        last = answer.token_ids[-1] if answer.token_ids else None
        self._resumable = False
        if answer.finish_reason == "stop" and last in p.eos_token_ids:
            eos_text = p.tokenizer.id_to_token(last) or ""
            if eos_text and end.startswith(eos_text):
                self._resume, self._resumable = end[len(eos_text):], True
        elif answer.finish_reason == "length":
            self._resume, self._resumable = end, True
