"""The held-out decoder samples' file (one .npz): written on the host, read by host/rkllm_runner.py inside
rkllm-toolkit's own venv, so it needs numpy only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def write_holdout(samples: Sequence[Any], path: str | Path) -> Path:
    """Held-out samples (calibration.decoder_dataset.Sample: embeddings, ids, image positions, names) as one .npz."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        arrays[f"embeds_{i}"] = s.embeds
        arrays[f"input_ids_{i}"] = s.input_ids
        arrays[f"image_positions_{i}"] = s.image_positions
    meta = [{"name": s.name, "kind": s.kind, "images": s.images, "tokens": s.tokens} for s in samples]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def load_holdout(path: str | Path) -> list[dict[str, Any]]:
    """The held-out samples written by write_holdout: dicts with name, kind, embeds, input_ids, image_positions."""
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        return [
            {**m, "embeds": data[f"embeds_{i}"], "input_ids": data[f"input_ids_{i}"],
             "image_positions": data[f"image_positions_{i}"]}
            for i, m in enumerate(meta)
        ]
