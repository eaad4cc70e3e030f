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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import PromptError
from .tiles import TilePlan

Message = Mapping[str, Any]
# Content item types that stand for an image; the reference template only looks at 'type' == 'image',
# OpenAI clients send 'image_url'.
_IMAGE_TYPES = ("image", "image_url")


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
    messages: Sequence[Message], fmt: PromptFormat, *, add_generation_prompt: bool = True, continuation: bool = False
) -> str:
    """The chat template's text, with one image token per image placeholder.

    `continuation=True` leaves out the conversation's opening (bos), for appending turns to a
    conversation the decoder already holds.
    """
    if not messages and not add_generation_prompt:
        raise PromptError("the conversation is empty")
    parts = [] if continuation else [fmt.bos]
    for message in messages:
        role = message.get("role")
        if role not in fmt.roles:
            raise PromptError(f"unknown role {role!r}; this model knows {', '.join(fmt.roles)}")
        items = normalize_content(message.get("content", ""))
        text_first, image_first = fmt.roles[role]
        parts.append(image_first if items[0]["type"] in _IMAGE_TYPES else text_first)
        for item in items:
            if item["type"] == "text":
                if fmt.image_token in item["text"]:
                    raise PromptError(
                        f"the text contains the reserved image marker {fmt.image_token!r}; "
                        "give images as separate content items"
                    )
                parts.append(item["text"])
            else:
                parts.append(fmt.image_token)
        parts.append(fmt.end_of_turn)
    if add_generation_prompt:
        parts.append(fmt.generation_prompt)
    return "".join(parts)


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


def expand_images(text: str, plans: Sequence[TilePlan], fmt: PromptFormat) -> str:
    """Replace each image token of the rendered template with its image's expansion, in order."""
    pieces = text.split(fmt.image_token)
    if len(pieces) - 1 != len(plans):
        raise PromptError(
            f"the conversation has {len(pieces) - 1} image placeholder(s) but {len(plans)} image(s) were given"
        )
    out = [pieces[0]]
    for plan, piece in zip(plans, pieces[1:]):
        out.append(image_text(plan, fmt))
        out.append(piece)
    return "".join(out)


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
) -> Prompt:
    """Messages + one tile plan per image -> Prompt; `tokenizer` is a `tokenizers.Tokenizer`.

    `resume` continues a conversation the decoder already holds: the text starts with `resume` (the
    rest of the previous end-of-turn piece) instead of the opening, and no special tokens are added.
    """
    continuation = resume is not None
    rendered = render_chat(messages, fmt, add_generation_prompt=add_generation_prompt, continuation=continuation)
    text = expand_images((resume or "") + rendered, plans, fmt)
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
        raise PromptError(
            f"the prompt is {ids.size} tokens but the model's context holds {max_tokens}",
            hint="use fewer or smaller images (--max-tiles), a shorter text, or a bundle with a larger context",
        )
    return Prompt(ids, positions.astype(np.int64), [p.n_tiles for p in plans], text)


def drop_leading_space(text: str) -> str:
    """An answer as the conversation records it: without the one space SmolVLM writes first.

    The generation prompt ends at 'Assistant:' and the model writes ' answer...', while the template
    renders a recorded answer as 'Assistant: ' + text; so one leading space (only one) is the
    model's, not the answer's. Chat history and the server's streamed text both drop it here.
    """
    return text[1:] if text.startswith(" ") else text
