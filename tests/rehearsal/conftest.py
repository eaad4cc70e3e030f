"""What the rehearsal tests need: they run inside scripts/board_rehearsal's arm64 Debian userland.

scripts/board_rehearsal copies the project there as scripts/deploy.sh places it on a board, runs
scripts/board_setup.sh, then runs these tests (`pytest -m rehearsal`) with the venv's Python and
these variables set. Anywhere else they are skipped with the reason; the default run deselects them.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helper modules beside the tests (frontend_cases, fake_board)
    sys.path.insert(0, str(HERE))

DEST_ENV, BUNDLE_ENV, DATA_ENV = "SMOLVLM_REHEARSAL_DEST", "SMOLVLM_REHEARSAL_BUNDLE", "SMOLVLM_REHEARSAL_DATA"


@dataclass(frozen=True)
class Rehearsal:
    dest: Path  # the folder deploy.sh filled (board/, scripts/, bundles/), with board_setup.sh's .venv
    bundle: Path  # the bundle inside it
    data: Path  # the x86 side's reference results and images
    python: str  # the board venv's Python (the one running the tests)


@pytest.fixture(scope="session")
def rehearsal() -> Rehearsal:
    if platform.machine() != "aarch64":
        pytest.skip(f"runs inside the arm64 userland of scripts/board_rehearsal (this is {platform.machine()})")
    missing = [name for name in (DEST_ENV, BUNDLE_ENV, DATA_ENV) if not os.environ.get(name)]
    if missing:
        pytest.skip(f"runs under scripts/board_rehearsal, which sets {', '.join(missing)}")
    return Rehearsal(Path(os.environ[DEST_ENV]), Path(os.environ[BUNDLE_ENV]), Path(os.environ[DATA_ENV]),
                     sys.executable)
