"""The decoder stage's interface: embeddings in, streamed text out.

Two implementations share it so one pipeline runs everywhere: `decoder_rkllm.RKLLMDecoder` (the
board: librkllmrt through ctypes, EMBED input) and `decoder_torch.TorchDecoder` (x86 emulation:
the extracted PyTorch text model fed the identical embeddings). Both receive the *whole* templated
sequence as float32 embeddings, so image rows and text rows reach the model exactly as the
reference builds them.

Conversation state, the same for both: with ``keep_history=True`` every embedding fed and every
token generated (the end-of-turn token included) stays in the model's cache, and the next call
feeds only the new rows. With ``keep_history=False`` the cache is cleared before the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

import numpy as np

from .errors import ContextLengthExceeded, InputError, PromptError

# top-k when a caller turns sampling on (temperature > 0 or top_p < 1) and names no top_k: the CLI's
# and the server's default alike
DEFAULT_TOP_K = 40
# The smallest temperature and top_p that still sample: below them logits / temperature overflow
# float32 (1e-300 gives inf and then NaN probabilities) and top_p rounds to 0 in librkllmrt's float,
# while the answer would be greedy in all but name anyway (use temperature 0 or top_k 1 for that).
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-3
# What a seed may be: torch's generator takes 64 bits, signed or not.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how; greedy by default so answers are reproducible."""

    max_new_tokens: int = 512
    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    repeat_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    def problem(self) -> Optional[tuple[str, str]]:
        """(field, message) for the first value no backend can honour, else None: the one statement of
        these rules, for the CLI's flags, the server's request fields and the decoders alike."""
        if not self.max_new_tokens >= 1:
            return "max_new_tokens", f"max_new_tokens must be at least 1, got {self.max_new_tokens}"
        if not self.top_k >= 0:
            return "top_k", f"top_k must be 0 (off) or more, got {self.top_k}"
        if not MIN_TOP_P <= self.top_p <= 1.0:
            return "top_p", f"top_p must be between {MIN_TOP_P} and 1, got {self.top_p}"
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            return "temperature", (f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                                   f"{self.temperature}: smaller values cannot be sampled with")
        if not 0.0 < self.repeat_penalty < float("inf"):
            return "repeat_penalty", f"repeat_penalty must be greater than 0, got {self.repeat_penalty}"
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            return "seed", f"seed must be a 64-bit integer ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {self.seed}"
        return None

    def checked(self) -> "SamplingParams":
        """Self, after refusing values no backend can honour (InputError naming the first)."""
        problem = self.problem()
        if problem is not None:
            raise InputError(f"invalid sampling parameters: {problem[1]}")
        return self


@dataclass
class DecodeStats:
    """Timings of one generate() call, as the runtime reports them (librkllmrt's perf struct)."""

    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    generate_tokens: int = 0
    generate_ms: float = 0.0
    memory_mb: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return 1000.0 * self.prefill_tokens / self.prefill_ms if self.prefill_ms > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return 1000.0 * self.generate_tokens / self.generate_ms if self.generate_ms > 0 else 0.0


@dataclass
class GenerationStep:
    """One streamed piece: text that is complete UTF-8, and the token that produced it.

    The last step of a call has ``finish_reason`` set ('stop': end-of-turn token, 'length':
    max_new_tokens reached, 'abort': interrupted) and carries the call's ``stats``.
    """

    text: str = ""
    token_id: Optional[int] = None
    finish_reason: Optional[str] = None
    stats: Optional[DecodeStats] = None


@dataclass
class GenerationResult:
    """A finished call, collected from its steps."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    stats: DecodeStats = field(default_factory=DecodeStats)

    @classmethod
    def collect(cls, steps: Iterator[GenerationStep]) -> "GenerationResult":
        text, ids, finish, stats = [], [], "stop", DecodeStats()
        for step in steps:
            text.append(step.text)
            if step.token_id is not None:
                ids.append(step.token_id)
            if step.finish_reason is not None:
                finish = step.finish_reason
                stats = step.stats or stats
        return cls("".join(text), ids, finish, stats)


class Decoder(Protocol):
    """A language model that continues a sequence given as embeddings."""

    hidden_size: int
    max_context: int
    sampling: SamplingParams  # what generate() uses when it is given none

    def generate(
        self, embeddings: np.ndarray, *, sampling: Optional[SamplingParams] = None, keep_history: bool = False
    ) -> Iterator[GenerationStep]:
        """Feed `embeddings` ([n_tokens, hidden] float32) and stream the continuation, sampled with
        `sampling` or, when None, the decoder's own (`chosen_sampling` decides)."""
        ...

    def abort(self) -> None:
        """Stop a running generate() from another thread; the iterator ends with finish_reason 'abort'."""
        ...

    def reset(self) -> None:
        """Forget the conversation (clear the cache)."""
        ...

    def close(self) -> None:
        """Release the model; safe to call twice."""
        ...


def chosen_sampling(sampling: Optional[SamplingParams], default: SamplingParams) -> SamplingParams:
    """The sampling a generate() call runs with: the call's, else the decoder's default, checked."""
    return (sampling if sampling is not None else default).checked()


def checked_embeddings(embeddings: np.ndarray, hidden_size: int, cached: int, max_context: int) -> np.ndarray:
    """The sequence as C-contiguous float32 [n, hidden_size], refused before it reaches a backend if its
    width, values or length (with `cached` tokens already in the context) cannot work."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[1] != hidden_size:
        raise PromptError(
            f"embeddings must be [n_tokens, {hidden_size}] (the decoder's hidden size), got {list(emb.shape)}",
            hint="the vision model and the decoder come from different models; rebuild the bundle",
        )
    if emb.shape[0] == 0:
        raise PromptError("embeddings are empty: nothing to feed the decoder")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if not np.isfinite(emb).all():
        raise PromptError("embeddings contain NaN or infinity")
    if cached + emb.shape[0] >= max_context:
        raise ContextLengthExceeded(
            f"the sequence does not fit the context: {cached} cached + {emb.shape[0]} new tokens, "
            f"max_context is {max_context}",
            hint="use fewer image tiles or a shorter prompt, reset the conversation, "
            "or rebuild the bundle with a larger context",
        )
    return emb
