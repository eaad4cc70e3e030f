"""board_setup.sh installed the board side from PyPI on aarch64, and nothing heavy came with it."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata

import pytest

pytestmark = pytest.mark.rehearsal

BOARD_PACKAGES = ("numpy", "opencv-python-headless", "pillow", "tokenizers", "tqdm", "uvicorn", "starlette",
                  "prometheus-client", "rknn-toolkit-lite2")
HEAVY_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_board_packages_installed(rehearsal, record_property):
    versions = {name: _version(name) for name in BOARD_PACKAGES}
    record_property("python", json.dumps(platform.python_version()))
    record_property("arch", json.dumps(platform.machine()))
    record_property("installed", json.dumps(versions))
    assert platform.machine() == "aarch64"
    assert all(versions.values()), f"not installed: {[n for n, v in versions.items() if not v]}"


def test_no_torch_transformers_or_onnx(rehearsal, record_property):
    found = {name: v for name in HEAVY_PACKAGES if (v := _version(name))}
    record_property("torch_installed", json.dumps("torch" in found))
    record_property("heavy_installed", json.dumps(found))
    assert not found


def test_board_modules_and_their_wheels_import(rehearsal):
    """Every board module and the compiled wheels it needs load on aarch64, and pull in nothing heavy."""
    code = ("import sys, cv2, numpy, tokenizers, PIL.Image, rknnlite.api\n"
            "import board.pipeline, board.serve, board.serve_worker, board.bench, board.batch, board.vision, "
            "board.decoder_rkllm, board.video\n"
            f"bad = [m for m in {HEAVY_PACKAGES + ('host',)!r} if m in sys.modules]\n"
            "assert not bad, bad\n")
    done = subprocess.run([rehearsal.python, "-c", code], cwd=rehearsal.dest, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
