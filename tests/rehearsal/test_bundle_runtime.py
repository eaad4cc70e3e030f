"""The bundle reader validates the bundle on aarch64, and rknn-toolkit-lite2 accepts its vision.rknn."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from board.bundle import Bundle

pytestmark = pytest.mark.rehearsal


def test_bundle_validates(rehearsal, record_property):
    bundle = Bundle.open(rehearsal.bundle, verify=True)
    record_property("bundle", json.dumps({"model": bundle.model_id, "layout": bundle.vision_layout,
                                          "toolkits": bundle.manifest["toolkits"]}))
    assert bundle.vision["target_platform"] == "rk3588"


def test_lite2_loads_the_vision_model_built_by_toolkit2(rehearsal, record_property):
    from rknnlite.api import RKNNLite  # aarch64 only

    bundle = Bundle.open(rehearsal.bundle, verify=False)
    built_with, lite2 = bundle.manifest["toolkits"]["rknn-toolkit2"], metadata.version("rknn-toolkit-lite2")
    runtime = RKNNLite(verbose=False)
    try:
        status = runtime.load_rknn(str(bundle.path(bundle.vision["file"])))
    finally:
        runtime.release()
    record_property("rknn_load", json.dumps(status))
    record_property("rknn_versions", json.dumps({"rknn-toolkit2 (built)": built_with, "rknn-toolkit-lite2": lite2}))
    assert status == 0
    assert built_with == lite2, f"vision.rknn was built by rknn-toolkit2 {built_with}, the board has lite2 {lite2}"
