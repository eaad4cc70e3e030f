"""`python -m board doctor --bundle DIR [--emulate] [--json]`: prove every assumption on a new board.

(being written)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .prompt import _IMAGE_TYPES, Prompt, PromptFormat, build_prompt, normalize_content
from .sequence import build_sequence, stack_rows
from .tiles import SplitSettings, TilePlan, plan_tiles


def tile_plan(settings: SplitSettings) -> TilePlan:
    """The plan of the reference tile given as an image: one unsplit tile (the global view only)."""
    return plan_tiles(settings.tile, settings.tile, settings.with_tiles_per_side(0))


def reference_prompt(messages: Sequence[Mapping[str, Any]], fmt: PromptFormat, tokenizer: Any, image_token_id: int,
                     settings: SplitSettings) -> Prompt:
    """A reference conversation's prompt: every image item is the reference tile, unsplit."""
    images = sum(1 for m in messages for item in normalize_content(m["content"]) if item["type"] in _IMAGE_TYPES)
    return build_prompt(messages, [tile_plan(settings)] * images, fmt, tokenizer, image_token_id)


def reference_sequence(prompt: Prompt, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The decoder's input for a reference prompt: the table's rows, the tile's vision `rows` in each image slot."""
    return build_sequence(prompt, table, stack_rows([rows[None]] * len(prompt.tiles_per_image), table.shape[1]))
