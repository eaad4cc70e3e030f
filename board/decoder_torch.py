"""x86 emulation of the decoder stage: the bundle's extracted text model (host/decoder) in PyTorch.

It takes exactly what librkllmrt takes on the board, the whole sequence as float32 embeddings, and
implements the same `board.decoder.Decoder` protocol, so the pipeline above it is the same code in
both places and can be checked end to end against transformers here.

Conversation state (keep_history): the KV cache holds every row fed and every token generated. A
generated token enters the cache when the next forward pass runs; the last one of an answer (the
end-of-turn token, or the token that hit max_new_tokens) is kept as *pending* and fed in front of
the next call's rows, so the cache after a turn is exactly [prompt rows, answer tokens, end token]
without an extra forward pass at the end of every answer.

torch and transformers are imported only when a TorchDecoder is made (the board never does).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .decoder import DecodeStats, GenerationStep, SamplingParams, checked_embeddings, chosen_sampling
from .errors import BundleError, DecoderError, RuntimeUnavailable


class IncrementalDetokenizer:
    """Token ids -> text pieces that are always complete UTF-8 (byte-level BPE splits characters).

    Decodes a short window of recent ids and emits only what the window added since the last
    emission, holding back while the text ends in an incomplete character (U+FFFD). Decoding the
    window instead of each token alone also keeps the spaces the tokenizer's decoder adds or
    removes between tokens.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back when the answer ends (an unfinished character shows as U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):]


def cache_argument(model: Any) -> str:
    """The keyword the model's forward() takes its KV cache by: `cache` in current transformers,
    `past_key_values` before (deprecated since 5.x with a FutureWarning, removed in 5.40). Read off the
    signature: an unknown keyword would vanish into **kwargs and silently run without the cache."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise DecoderError(f"{type(model).__name__}.forward() takes neither 'cache' nor 'past_key_values'",
                       hint="install a transformers version the host extra allows (scripts/setup.sh)")


class TorchDecoder:
    """A Llama-format causal LM folder run on the CPU; implements board.decoder.Decoder."""

    def __init__(
        self,
        model_dir: Union[str, Path],
        *,
        tokenizer: Any,
        eos_token_ids: Sequence[int],
        max_context: int,
        hidden_size: Optional[int] = None,
        sampling: SamplingParams = SamplingParams(),
    ):
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise RuntimeUnavailable(
                f"--emulate needs torch and transformers: {exc}", hint="run scripts/setup.sh (the host extra)"
            ) from exc
        from transformers.utils import logging as hf_logging

        self._torch = torch
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a runtime's load is silent; the CLI's stderr is for the user
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise BundleError(f"the emulation decoder in {model_dir} cannot be loaded: {exc}",
                              hint="re-create the bundle with host.convert") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model = model.eval()
        self.hidden_size = int(self.model.config.hidden_size)
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise BundleError(f"{model_dir} has hidden size {self.hidden_size}, the bundle says {hidden_size}",
                              hint="re-create the bundle with host.convert")
        self.max_context = int(max_context)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if not self.eos_token_ids:
            raise BundleError("the bundle lists no end-of-turn token ids", hint="re-create the bundle with host.convert")
        self.sampling = sampling.checked()
        self._tokenizer = tokenizer
        self._embed = self.model.get_input_embeddings()
        self._cache_arg = cache_argument(self.model)
        self._cache: Any = None
        self._cached = 0  # rows in the KV cache
        self._pending: list[int] = []  # generated tokens not yet fed (they belong to the history)
        self._abort = threading.Event()
        self._busy = threading.Lock()
        self._closed = False

    @property
    def history_tokens(self) -> int:
        """Tokens the conversation holds: cached rows plus the pending end token."""
        return self._cached + len(self._pending)

    # -- the Decoder protocol -------------------------------------------------------------------

    def generate(
        self, embeddings: np.ndarray, *, sampling: Optional[SamplingParams] = None, keep_history: bool = False
    ) -> Iterator[GenerationStep]:
        """Feed `embeddings` ([n_tokens, hidden_size]) and stream the continuation (checks run here, eagerly)."""
        sampling = chosen_sampling(sampling, self.sampling)
        if self._closed:
            raise DecoderError("the decoder is closed")
        if self._busy.locked():
            raise DecoderError("generate() is already running on this decoder")
        cached = self.history_tokens if keep_history else 0
        emb = checked_embeddings(embeddings, self.hidden_size, cached, self.max_context)
        return self._stream(emb, sampling, keep_history)

    def abort(self) -> None:
        """Stop a running generate() (from any thread) before its next token."""
        self._abort.set()

    def reset(self) -> None:
        """Forget the conversation."""
        if self._busy.locked():
            raise DecoderError("reset() while generate() is running; abort() it first")
        self._drop_history()

    def close(self) -> None:
        self._abort.set()
        self._drop_history()
        self._closed = True

    def __enter__(self) -> "TorchDecoder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _drop_history(self) -> None:
        self._cache, self._cached, self._pending = None, 0, []

    def _forward(self, rows: Any) -> Any:
        """One forward pass over [n, hidden] rows on top of the cache; the last position's logits."""
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        cache = {self._cache_arg: self._cache}
        out = self.model(inputs_embeds=rows[None], use_cache=True, logits_to_keep=1, **cache)
        self._cached += rows.shape[0]
        return out.logits[0, -1].float()

    def _stream(self, emb: np.ndarray, sampling: SamplingParams, keep_history: bool) -> Iterator[GenerationStep]:
        torch = self._torch
        if not self._busy.acquire(blocking=False):
            raise DecoderError("generate() is already running on this decoder")
        try:
            self._abort.clear()
            if not keep_history:
                self._drop_history()
            detok = IncrementalDetokenizer(self._tokenizer)
            generator = torch.Generator()
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()  # a fresh random seed for this generator only
            generated: list[int] = []
            stats = DecodeStats()
            finish = "length"
            with torch.inference_mode():
                rows = torch.from_numpy(emb)
                if self._pending:
                    pending = torch.tensor(self._pending, dtype=torch.long)
                    rows = torch.cat([self._embed(pending).float(), rows])
                    self._pending = []
                start = time.perf_counter()
                logits = self._forward(rows)
                stats.prefill_tokens, stats.prefill_ms = rows.shape[0], (time.perf_counter() - start) * 1e3
                decode_start = time.perf_counter()
                while True:
                    token = self._pick(logits, sampling, generated, generator)
                    generated.append(token)
                    if token in self.eos_token_ids:
                        self._pending = [token]
                        finish = "stop"
                        yield GenerationStep(text=detok.flush(), token_id=token)
                        break
                    yield GenerationStep(text=detok.add(token), token_id=token)
                    if self._abort.is_set():
                        self._pending = [token]
                        finish = "abort"
                        break
                    if len(generated) >= sampling.max_new_tokens or self._cached + 1 >= self.max_context:
                        self._pending = [token]
                        break
                    logits = self._forward(self._embed(torch.tensor([token], dtype=torch.long)).float())
                    stats.generate_tokens += 1
                stats.generate_ms = (time.perf_counter() - decode_start) * 1e3
            yield GenerationStep(text=detok.flush(), finish_reason=finish, stats=stats)
        except BaseException:
            self._drop_history()  # a forward pass cut short leaves the cache half-written
            raise
        finally:
            self._busy.release()

    def _pick(self, logits: Any, s: SamplingParams, generated: list[int], generator: Any) -> int:
        """Next token: repeat penalty over this answer's tokens, then greedy or temperature/top-k/top-p."""
        torch = self._torch
        if s.repeat_penalty != 1.0 and generated:
            seen = torch.tensor(sorted(set(generated)), dtype=torch.long)
            values = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(values > 0, values / s.repeat_penalty, values * s.repeat_penalty)
        if s.greedy:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.shape[0])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= s.top_p  # keep the token that crosses top_p
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=generator))
