"""Stage 3: chat messages + tile plans -> the token ids the decoder sees and where the image rows go.

Pure string and id functions, separate from pixels (as mlx-vlm does it). Every string comes from
`PromptFormat`, which the bundle carries: the chat template's pieces and the image tokens, derived on
the host from the checkpoint's own Jinja template and processor and checked there against the
template's output (host/prompt_format.py). No template text or special token is written in code.

The rendered text is then expanded the way the reference processor expands it: each image
placeholder becomes, per tile, `<fake_token_around_image><row_r_col_c>` + N image tokens (a newline
after each row of tiles), then `\\n<fake_token_around_image><global-img>` + N image tokens +
`<fake_token_around_image>`; an unsplit image is only the global part. The whole expanded string is
tokenized at once, as the reference does, so merges across pieces ("\\n\\n") come out the same.

Control tokens in message text (`control_tokens`, one option for every caller):
- "special" (the reference's behaviour, the CLI's default): text is tokenized like the template, so a
  literal `<end_of_utterance>` or `<|im_start|>` typed in a message becomes that special token, as in
  transformers. Whoever writes the text can forge turns; `<image>` is refused (it would break the
  image count).
- "text" (the server's default): message text is tokenized with special-token matching off, so those
  strings stay characters; only the template's own pieces are special tokens. The tokenizer splits
  its input at every special token before anything else, so tokenizing the pieces between the
  template's special tokens one by one gives the same ids as tokenizing the whole string, for every
  prompt whose text holds no special-token string (the tests check both ways).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ContextLengthExceeded, PromptError
from .tiles import TilePlan

Message = Mapping[str, Any]
# Content item types that stand for an image; the reference template only looks at 'type' == 'image',
# OpenAI clients send 'image_url'.
_IMAGE_TYPES = ("image", "image_url")
CONTROL_TOKEN_POLICIES = ("special", "text")  # see the module docstring


@dataclass(frozen=True)
class PromptFormat:
    """The chat template's pieces and the image tokens of one checkpoint."""

    bos: str  # rendered once, before the first message
    # role as given -> (prefix when the message starts with text, prefix when it starts with an image),
    # e.g. "user" -> ("User: ", "User:")
    roles: Mapping[str, tuple[str, str]]
    end_of_turn: str  # after every message's content
    generation_prompt: str  # what invites the assistant to answer
    image_token: str
    fake_image_token: str
    global_image_token: str
    row_col_token: str  # a pattern with {row} and {col}, 1-based
    image_seq_len: int  # image tokens per tile

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptFormat":
        roles = {role: (str(pair[0]), str(pair[1])) for role, pair in d["roles"].items()}
        return cls(**{**d, "roles": roles, "image_seq_len": int(d["image_seq_len"])})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = {role: list(pair) for role, pair in self.roles.items()}
        return d


def normalize_content(content: Union[str, Sequence[Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    """Message content as a list of typed items; a plain string is one text item (OpenAI style)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)) or not content:
        raise PromptError("a message's content must be a non-empty list of items or a string")
    for item in content:
        if not isinstance(item, Mapping) or "type" not in item:
            raise PromptError(f"content items need a 'type' ('text' or 'image'): got {item!r:.80}")
        if item["type"] == "text" and not isinstance(item.get("text"), str):
            raise PromptError("a text item needs a 'text' string")
        if item["type"] not in ("text",) + _IMAGE_TYPES:
            raise PromptError(f"unsupported content type '{item['type']}' (text and image are supported)")
    return list(content)


def render_chat(
    messages: Sequence[Message], fmt: PromptFormat, *, add_generation_prompt: bool = True, continuation: bool = False,
) -> str:
    """The chat template's text, with one image token per image placeholder.

    `continuation=True` leaves out the conversation's opening (bos), for appending turns to a
    conversation the decoder already holds.
    """
    return "".join(piece for piece, _ in render_parts(messages, fmt, add_generation_prompt=add_generation_prompt,
                                                       continuation=continuation))


def render_parts(
    messages: Sequence[Message], fmt: PromptFormat, *, add_generation_prompt: bool = True, continuation: bool = False,
    control_tokens: str = "special",
) -> list[tuple[str, bool]]:
    """render_chat's pieces in order, each with whether it is message text (True) or the template's."""
    if control_tokens not in CONTROL_TOKEN_POLICIES:
        raise PromptError(f"control_tokens must be one of {', '.join(CONTROL_TOKEN_POLICIES)}, got {control_tokens!r}")
    if not messages and not add_generation_prompt:
        raise PromptError("the conversation is empty")
    parts: list[tuple[str, bool]] = [] if continuation else [(fmt.bos, False)]
    for message in messages:
        role = message.get("role")
        if role not in fmt.roles:
            raise PromptError(f"unknown role {role!r}; this model knows {', '.join(fmt.roles)}")
        items = normalize_content(message.get("content", ""))
        text_first, image_first = fmt.roles[role]
        parts.append((image_first if items[0]["type"] in _IMAGE_TYPES else text_first, False))
        for item in items:
            if item["type"] == "text":
                if control_tokens == "special" and fmt.image_token in item["text"]:
                    raise PromptError(
                        f"the text contains the reserved image marker {fmt.image_token!r}; "
                        "give images as separate content items"
                    )
                parts.append((item["text"], True))
            else:
                parts.append((fmt.image_token, False))
        parts.append((fmt.end_of_turn, False))
    if add_generation_prompt:
        parts.append((fmt.generation_prompt, False))
    return parts


def image_text(plan: TilePlan, fmt: PromptFormat) -> str:
    """The text one image expands to, from its tile plan (the reference's _prompt_split_image)."""
    run = fmt.image_token * fmt.image_seq_len
    global_part = fmt.fake_image_token + fmt.global_image_token + run + fmt.fake_image_token
    if not plan.rows:
        return global_part
    rows = []
    for r in range(1, plan.rows + 1):
        row = "".join(
            fmt.fake_image_token + fmt.row_col_token.format(row=r, col=c) + run for c in range(1, plan.cols + 1)
        )
        rows.append(row + "\n")
    return "".join(rows) + "\n" + global_part


def expand_parts(parts: Sequence[tuple[str, bool]], plans: Sequence[TilePlan], fmt: PromptFormat) -> list[tuple[str, bool]]:
    """Replace each of the template's image tokens in render_parts' pieces with its image's expansion
    (image_text), in order; message text is left as it is."""
    found = sum(piece.count(fmt.image_token) for piece, is_text in parts if not is_text)
    if found != len(plans):
        raise PromptError(
            f"the conversation has {found} image placeholder(s) but {len(plans)} image(s) were given"
        )
    out: list[tuple[str, bool]] = []
    todo = iter(plans)
    for piece, is_text in parts:
        if is_text or fmt.image_token not in piece:
            out.append((piece, is_text))
            continue
        pieces = piece.split(fmt.image_token)
        expanded = [pieces[0]]
        for rest in pieces[1:]:
            expanded += [image_text(next(todo), fmt), rest]
        out.append(("".join(expanded), False))
    return out


@dataclass
class Prompt:
    """Token ids for the decoder and the positions the vision rows fill, tile after tile."""

    input_ids: np.ndarray  # [L] int64
    image_positions: np.ndarray  # [n_tiles * image_seq_len] int64, ascending
    tiles_per_image: list[int]
    text: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_prompt(
    messages: Sequence[Message],
    plans: Sequence[TilePlan],
    fmt: PromptFormat,
    tokenizer,
    image_token_id: int,
    *,
    add_generation_prompt: bool = True,
    resume: Optional[str] = None,
    max_tokens: Optional[int] = None,
    control_tokens: str = "special",
) -> Prompt:
    """Messages + one tile plan per image -> Prompt; `tokenizer` is a `tokenizers.Tokenizer`.

    `resume` continues a conversation the decoder already holds: the text starts with `resume` (the
    rest of the previous end-of-turn piece) instead of the opening, and no special tokens are added.
    `control_tokens` says what special-token strings in message text become (module docstring).
    """
    continuation = resume is not None
    parts = render_parts(messages, fmt, add_generation_prompt=add_generation_prompt, continuation=continuation,
                         control_tokens=control_tokens)
    parts = expand_parts([(resume or "", False)] + parts, plans, fmt)
    text = "".join(piece for piece, _ in parts)
    specials = _special_strings(tokenizer) if control_tokens == "text" else []
    if any(s in piece for piece, is_text in parts if is_text for s in specials):
        ids = _encode_text_literally(parts, tokenizer, specials, add_special_tokens=not continuation)
    else:
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=not continuation).ids, dtype=np.int64)
    positions = np.flatnonzero(ids == image_token_id)
    expected = sum(p.n_tiles for p in plans) * fmt.image_seq_len
    if positions.size != expected:
        # the count check mlx-vlm makes before merging: a wrong count would crash the NPU runtime
        raise PromptError(
            f"the prompt holds {positions.size} image tokens but the images need {expected}; "
            "the tokenizer does not match the prompt format"
        )
    if max_tokens is not None and ids.size > max_tokens:
        raise ContextLengthExceeded(
            f"the prompt is {ids.size} tokens but the model's context holds {max_tokens}",
            hint="use fewer or smaller images (--max-tiles), a shorter text, or a bundle with a larger context",
        )
    return Prompt(ids, positions.astype(np.int64), [p.n_tiles for p in plans], text)


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text, longest first (so '<row_1_col_1>' wins over a prefix)."""
    found = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content}
    return sorted(found, key=len, reverse=True)


def _encode_text_literally(parts: Sequence[tuple[str, bool]], tokenizer, specials: Sequence[str], *,
                           add_special_tokens: bool) -> np.ndarray:
    """Token ids of the pieces with message text tokenized as text ("text" policy, module docstring):
    the string is cut at the template's special tokens only, and each run between two of them is
    tokenized with special-token matching off."""
    from tokenizers import Encoding

    pattern = re.compile("|".join(re.escape(s) for s in specials))
    runs: list[tuple[str, bool]] = []  # (text, is a template special token)
    for piece, is_text in parts:
        cuts = [] if is_text else list(pattern.finditer(piece))
        start = 0
        for match in cuts:
            runs += [(piece[start:match.start()], False), (match.group(), True)]
            start = match.end()
        runs.append((piece[start:], False))
    encodings, pending = [], ""
    previous = tokenizer.encode_special_tokens
    try:
        for run, special in runs + [("", True)]:
            if not special:
                pending += run
                continue
            if pending:
                tokenizer.encode_special_tokens = True
                encodings.append(tokenizer.encode(pending, add_special_tokens=False))
                pending = ""
            if run:
                tokenizer.encode_special_tokens = False
                encodings.append(tokenizer.encode(run, add_special_tokens=False))
    finally:
        tokenizer.encode_special_tokens = previous
    merged = tokenizer.post_process(Encoding.merge(encodings, growing_offsets=True),
                                    add_special_tokens=add_special_tokens)
    return np.asarray(merged.ids, dtype=np.int64)


def drop_leading_space(text: str) -> str:
    """An answer as the conversation records it: without the one space SmolVLM writes first.

    The generation prompt ends at 'Assistant:' and the model writes ' answer...', while the template
    renders a recorded answer as 'Assistant: ' + text; so one leading space (only one) is the
    model's, not the answer's. Chat history and the server's streamed text both drop it here.
    """
    return text[1:] if text.startswith(" ") else text
