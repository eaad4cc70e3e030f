"""Stage 5: token ids + vision rows -> the float32 embedding sequence the decoder is fed.

This is the reference's `inputs_merger` done on the board: every token is embedded from the bundle's
fp16 table (memory-mapped, so only the rows a prompt uses are read), then the `<image>` slots are
overwritten by the vision rows, tile after tile in prompt order. The counts are checked first: a
sequence with more slots than rows (or the other way round) is refused here, because librkllmrt
crashes or answers garbage on it instead of reporting an error.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import PromptError
from .prompt import Prompt


def embed_tokens(table: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Rows of `table` ([vocab, hidden], any float dtype) for `token_ids`, as float32 [n, hidden]."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        bad = int(ids[(ids < 0) | (ids >= table.shape[0])][0])
        raise PromptError(
            f"token id {bad} is outside the embedding table ({table.shape[0]} rows)",
            hint="the tokenizer and the embedding table come from different models; rebuild the bundle",
        )
    # Fancy indexing on a memmap reads just these rows; astype makes the float32 copy the decoder gets.
    return np.asarray(table[ids], dtype=np.float32)


def stack_rows(rows: Sequence[np.ndarray], hidden: int) -> np.ndarray:
    """Per-image vision rows ([n_tiles, tokens_per_tile, hidden] each) as one [n, hidden] float32 block."""
    if not rows:
        return np.zeros((0, hidden), np.float32)
    return np.concatenate([np.asarray(r, np.float32).reshape(-1, hidden) for r in rows])


def build_sequence(prompt: Prompt, table: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
    """The [len(prompt), hidden] float32 sequence: text rows from `table`, image rows at their slots.

    `image_rows` is [n_image_tokens, hidden] in prompt order (stack_rows of each image's
    [n_tiles, N, hidden] output); its count must equal the prompt's image slots.
    """
    hidden = table.shape[1]
    rows = np.asarray(image_rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != hidden:
        raise PromptError(
            f"vision rows must be [n, {hidden}] (the decoder's hidden size), got {list(rows.shape)}",
            hint="the vision model and the decoder come from different models; rebuild the bundle",
        )
    slots = prompt.image_positions
    if rows.shape[0] != slots.size:
        raise PromptError(
            f"the prompt has {slots.size} image slots but the vision encoder gave {rows.shape[0]} rows "
            f"({len(prompt.tiles_per_image)} image(s), {sum(prompt.tiles_per_image)} tile(s))",
            hint="the bundle's tokens per tile does not match its vision model; rebuild the bundle",
        )
    out = embed_tokens(table, prompt.input_ids)
    if slots.size:
        out[slots] = rows
    return out
