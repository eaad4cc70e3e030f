"""Shared fixtures: tiny SmolVLM checkpoints built offline, once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A function family -> path of a tiny random-weight SmolVLM checkpoint ('256m', '500m', '2.2b')."""
    from host.tiny_model import build_tiny_checkpoint

    built: dict[tuple, Path] = {}

    def get(family: str = "256m", **kwargs) -> Path:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in built:
            name = f"tiny-{family}-{len(built)}"
            built[key] = build_tiny_checkpoint(tmp_path_factory.mktemp(name), family, **kwargs)
        return built[key]

    return get
