"""Derive the board's PromptFormat from a checkpoint's Jinja chat template and processor, and prove it.

The board has no Jinja and no transformers: it renders conversations from the pieces in
`board.prompt.PromptFormat`. Here, on the host, those pieces are read off the checkpoint's own
template by rendering probe conversations with transformers' renderer, then the board renderer is
checked against the template on a battery of conversations, and the board's image expansion and
tokenization against the reference processor. A checkpoint whose template the pieces cannot
reproduce is refused at conversion time instead of answering wrongly on the board.
"""

from __future__ import annotations

from typing import Any

from board.errors import InputError
from board.prompt import PromptFormat, render_chat

_ROLES = ("system", "user", "assistant")
_MARK = "\x1fprobe\x1f"


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def _strip(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise InputError(f"the chat template renders {what} without the common opening {prefix!r}")
    return text[len(prefix) :]


def derive_prompt_format(
    chat_template: str,
    *,
    image_token: str,
    fake_image_token: str,
    global_image_token: str,
    image_seq_len: int,
    row_col_token: str = "<row_{row}_col_{col}>",
) -> PromptFormat:
    """Read the template's pieces off probe renders and check the result on many conversations."""
    opening = _render(chat_template, [], add_generation_prompt=False)
    generation_prompt = _strip(_render(chat_template, [], add_generation_prompt=True), opening, "the generation prompt")
    roles: dict[str, tuple[str, str]] = {}
    end_of_turn = None
    for role in _ROLES:
        text_msg = [{"role": role, "content": [{"type": "text", "text": _MARK}]}]
        image_msg = [{"role": role, "content": [{"type": "image"}, {"type": "text", "text": _MARK}]}]
        text_first = _strip(_render(chat_template, text_msg, False), opening, f"a {role} message")
        image_first = _strip(_render(chat_template, image_msg, False), opening, f"a {role} message")
        head, mark, tail = text_first.partition(_MARK)
        ihead, imark, itail = image_first.partition(image_token + _MARK)
        if not mark or not imark:
            raise InputError(f"the chat template does not render {role} text/images as plain content")
        if tail != itail or (end_of_turn is not None and tail != end_of_turn):
            raise InputError("the chat template ends messages differently by role or content")
        end_of_turn = tail
        roles[role] = (head, ihead)
    fmt = PromptFormat(
        bos=opening,
        roles=roles,
        end_of_turn=end_of_turn or "",
        generation_prompt=generation_prompt,
        image_token=image_token,
        fake_image_token=fake_image_token,
        global_image_token=global_image_token,
        row_col_token=row_col_token,
        image_seq_len=image_seq_len,
    )
    check_against_template(fmt, chat_template)
    return fmt


def probe_conversations() -> list[list[dict[str, Any]]]:
    """Conversations that exercise every piece: system, multi-turn, several images, no image."""
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    return [
        [{"role": "user", "content": [img, txt("What is in this image?")]}],
        [{"role": "user", "content": [txt("Hello there.")]}],
        [{"role": "user", "content": [txt("Compare "), img, txt(" with "), img, txt("\nDone?")]}],
        [
            {"role": "system", "content": [txt("You are terse.")]},
            {"role": "user", "content": [img, img, txt("Two photos: same place?")]},
            {"role": "assistant", "content": [txt(" Yes, the same beach.")]},
            {"role": "user", "content": [txt("And the time of day?")]},
        ],
        [{"role": "user", "content": [img]}],
        [{"role": "assistant", "content": [txt("Earlier answer.")]}, {"role": "user", "content": [txt("ünïcödé ✓ 中文")]}],
    ]


def check_against_template(fmt: PromptFormat, chat_template: str) -> None:
    """Fail if the board renderer differs from the Jinja template on any probe conversation."""
    for messages in probe_conversations():
        for add_generation_prompt in (True, False):
            expected = _render(chat_template, messages, add_generation_prompt)
            got = render_chat(messages, fmt, add_generation_prompt=add_generation_prompt)
            if got != expected:
                raise InputError(
                    "the board cannot reproduce this checkpoint's chat template "
                    f"(template gives {expected[:120]!r}, pieces give {got[:120]!r})",
                    hint="this tool supports SmolVLM / SmolVLM2 templates; a custom template needs support first",
                )


def prompt_format_from_processor(processor, chat_template: str) -> PromptFormat:
    """The PromptFormat of a transformers Idefics3/SmolVLM processor and its checkpoint's template."""
    global_token = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag")
    return derive_prompt_format(
        chat_template,
        image_token=processor.image_token,
        fake_image_token=processor.fake_image_token,
        global_image_token=global_token,
        image_seq_len=int(processor.image_seq_len),
    )



def tokenizer_json(tokenizer) -> str:
    """The tokenizer as the board loads it (`tokenizers.Tokenizer.from_str`).

    Taken from the loaded transformers tokenizer rather than copied from the checkpoint, so any
    special-token handling transformers configures (post-processor, added tokens) travels with it.
    """
    return tokenizer.backend_tokenizer.to_str()
