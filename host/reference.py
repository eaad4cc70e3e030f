"""The board doctor's reference data, made at conversion time from the full-precision model.

`python -m board doctor` (board/doctor.py) runs the board's runtimes on fixed inputs and compares them
with what the checkpoint's own full-precision model gives for the same inputs, here, once:

- one reference tile (the unsplit global view of a held-out photo, uint8) and its vision rows from
  the fp32 PyTorch tower + connector (`reference.npz` in the bundle, a board file);
- for a text prompt and an image prompt (the image is that tile, unsplit), the fp32 decoder's first
  greedy token ids (the manifest's `reference` section);
- the first prompt of a few short ones that the model ends (an EOS id) within EOS_SEARCH_TOKENS tokens,
  for the doctor's `eos` check; none is stored when the model ends none (a random-weight model).

The sequences are built by board.doctor.reference_prompt with the bundle's own fp16 table, so the
doctor feeds the decoder exactly these rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from board import bundle_schema as S
from board.doctor import reference_prompt, reference_sequence
from board.image_io import load_image
from board.prompt import PromptFormat
from board.tiles import SplitSettings, split_image

NEW_TOKENS = 16  # greedy tokens stored per reference prompt
EOS_SEARCH_TOKENS = 32  # how far an eos candidate may run before it counts as not ending


def _user(*items: Any) -> list[dict[str, Any]]:
    content = [{"type": "image"} if item is None else {"type": "text", "text": item} for item in items]
    return [{"role": "user", "content": content}]


TEXT_PROMPT = _user("What is the capital of France? Answer in one sentence.")
IMAGE_PROMPT = _user(None, "What is in this image?")
EOS_CANDIDATES = (
    _user("Reply with the single word: yes."),
    _user("What is 2 + 2? Answer with the number only."),
    _user(None, "Answer in one word: is this a photo?"),
    TEXT_PROMPT,
    IMAGE_PROMPT,
)


def reference_tile(image: Path, settings: SplitSettings) -> np.ndarray:
    """The unsplit global view of `image` as the board's front end cuts it: uint8 [T, T, 3]."""
    return split_image(load_image(image), settings.with_tiles_per_side(0)).tiles[0]


def write_reference(
    root: Path,
    *,
    image: Path,
    settings: SplitSettings,
    features: Callable[[np.ndarray], np.ndarray],
    decoder: Any,
    fmt: PromptFormat,
    tokenizer: Any,
    image_token_id: int,
    table: np.ndarray,
    eos_ids: Sequence[int],
    greedy: Callable[[Any, np.ndarray, Sequence[int], int], list[int]],
) -> dict[str, Any]:
    """Write reference.npz into the bundle root and return the manifest's reference section.

    `features`: uint8 tiles [n, T, T, 3] -> full-precision rows [n, N, hidden]; `greedy`: the reference
    decoder's greedy ids (calibration.decoder_dataset.greedy_ids).
    """
    R, P = S.Reference, S.ReferencePrompt
    tile = reference_tile(image, settings)
    rows = np.asarray(features(tile[None]), np.float32)[0]
    np.savez(root / S.REFERENCE, **{S.REFERENCE_TILE: tile, S.REFERENCE_ROWS: rows})

    def run(name: str, messages: list[dict[str, Any]], max_new: int) -> dict[str, Any]:
        prompt = reference_prompt(messages, fmt, tokenizer, image_token_id, settings)
        ids = greedy(decoder, reference_sequence(prompt, table, rows), eos_ids, max_new)
        return {P.NAME: name, P.MESSAGES: messages, P.GREEDY_IDS: ids, P.STOPPED: bool(ids) and ids[-1] in eos_ids}

    prompts = [run("text", TEXT_PROMPT, NEW_TOKENS), run("image", IMAGE_PROMPT, NEW_TOKENS)]
    eos_prompt = None
    for i, messages in enumerate(EOS_CANDIDATES):
        candidate = run(f"eos-{i}", messages, EOS_SEARCH_TOKENS)
        if candidate[P.STOPPED]:
            eos_prompt = candidate
            break
    return {R.FILE: S.REFERENCE, R.SOURCE: image.name, R.NEW_TOKENS: NEW_TOKENS, R.PROMPTS: prompts,
            R.EOS_PROMPT: eos_prompt, R.EOS_SEARCH_TOKENS: EOS_SEARCH_TOKENS}
