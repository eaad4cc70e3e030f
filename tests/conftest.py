"""Shared fixtures: tiny SmolVLM checkpoints built offline and their converted bundle, once per test
session, and a few test images. The helpers behind them are in tests/support.py."""

from __future__ import annotations

import os
import platform
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


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny 256m checkpoint converted by host.convert --skip-decoder (what an x86 user has)."""
    from support import tiny_bundle_for

    return tiny_bundle_for(tmp_path_factory, tiny_checkpoint, "256m")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Three small synthetic photos of different shapes (wide, tall, square)."""
    from support import write_image

    d = tmp_path_factory.mktemp("images")
    return {"wide": write_image(d / "wide.png", 600, 900, 1), "tall": write_image(d / "tall.png", 700, 400, 2),
            "small": write_image(d / "small.png", 300, 300, 3)}


BOARD_BUNDLE_ENV = "SMOLVLM_BUNDLE"


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    """The real bundle on-board tests (-m rk3588) run against; skipped off the board, with the reason."""
    if platform.machine() != "aarch64":
        pytest.skip(f"needs an RK3588 board (this is {platform.machine()})")
    path = os.environ.get(BOARD_BUNDLE_ENV)
    if not path:
        pytest.skip(f"set {BOARD_BUNDLE_ENV} to a bundle folder made by host.convert (with decoder.rkllm)")
    return Path(path).expanduser()


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """`python -m host.demo_model OUT --vision small`, once per session: SmolLM2-135M-Instruct's real
    language weights in SmolVLM-256M's geometry, with a small random vision tower of the same tile geometry.
    Returns the folder; the CLI's stderr is kept in `demo_build.log` beside it."""
    import subprocess

    try:
        from host.demo_model import gguf_path

        gguf_path()
        import gguf  # noqa: F401
    except Exception as exc:  # the packages scripts/setup.sh installs
        pytest.skip(f"the demo model's sources are missing ({exc}); run scripts/setup.sh")
    out = tmp_path_factory.mktemp("demo") / "demo-model"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "host.demo_model", str(out), "--vision", "small"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "demo_build.log").write_text(result.stderr)
    return out
