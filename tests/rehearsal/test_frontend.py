"""The board front end gives the same tiles and token ids on aarch64 as on x86 (frontend_cases.py)."""

from __future__ import annotations

import json

import frontend_cases
import numpy as np
import pytest

from board.bundle import Bundle

pytestmark = pytest.mark.rehearsal


def test_tiles_and_token_ids_match_x86(rehearsal, record_property):
    with np.load(rehearsal.data / frontend_cases.REFERENCE) as f:
        ref = dict(f)
    ours = frontend_cases.front_end(rehearsal.bundle, list((rehearsal.data / "images").iterdir()))
    report = frontend_cases.compare(ref, ours, Bundle.open(rehearsal.bundle, verify=False).split_settings)
    record_property("frontend", json.dumps(report))
    assert report["images"] > 0 and report["parity"], report["problems"]
