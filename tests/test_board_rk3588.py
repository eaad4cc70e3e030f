"""On-board tests: the real NPU (rknnlite), the real librkllmrt and a real bundle.

    SMOLVLM_BUNDLE=~/bundles/smolvlm-256m pytest -m rk3588 tests/test_board_rk3588.py -s

Skipped (with the reason) anywhere else. They settle what x86 cannot: that the three NPU core modes
compute the same rows, which one is fastest, that librkllmrt streams, stops and aborts, and that a
keep-history turn continues the conversation exactly like a fresh run of the whole sequence (which
needs the runtime to keep the generated end-of-turn token in its cache and report its id).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from board.decoder import GenerationResult, SamplingParams

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.rk3588


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from support import write_image

    return write_image(tmp_path_factory.mktemp("board") / "photo.png", 1080, 1440, 5)


@pytest.fixture(scope="module")
def pipeline(bundle_dir):
    from board.pipeline import Pipeline

    with Pipeline(bundle_dir) as p:
        yield p


def test_system_checks_pass(bundle_dir):
    from board.system_checks import run_checks

    results = run_checks(library_dirs=[bundle_dir])
    print("\n" + "\n".join(r.line() for r in results))
    assert not [r for r in results if r.failed]


def test_npu_core_modes_agree_and_report_speed(bundle_dir, pipeline, image):
    from board.bundle import VISION_RKNN
    from board.image_io import load_image
    from board.tiles import split_image
    from board.vision import NPU_CORE_MODES, RKNNVisionEncoder

    tiles = split_image(load_image(image), pipeline.settings).tiles
    outputs, speed = {}, {}
    for mode in NPU_CORE_MODES:
        with RKNNVisionEncoder(pipeline.bundle.path(VISION_RKNN), tile=pipeline.settings.tile,
                               tokens_per_tile=pipeline.format.image_seq_len, hidden_size=pipeline.bundle.hidden_size,
                               layout=pipeline.bundle.vision_layout, cores=mode) as encoder:
            encoder.encode(tiles[:1])  # warm-up
            start = time.perf_counter()
            outputs[mode] = encoder.encode(tiles)
            speed[mode] = (time.perf_counter() - start) * 1e3 / len(tiles)
    print(f"\n{len(tiles)} tiles, ms per tile: " + json.dumps({k: round(v, 1) for k, v in speed.items()}))
    ref = outputs["single"].reshape(len(tiles), -1)
    for mode, rows in outputs.items():
        flat = rows.reshape(len(tiles), -1)
        cos = (flat * ref).sum(1) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(ref, axis=1))
        assert np.isfinite(rows).all() and cos.min() > 0.999, (mode, cos.min())


def test_answer_streams_and_stops(pipeline, image):
    steps = list(pipeline.ask("What is in this image?", [image], sampling=SamplingParams(max_new_tokens=64)))
    result = GenerationResult.collect(iter(steps))
    assert steps[-1].finish_reason in ("stop", "length") and result.text.strip()
    answer = pipeline.ask("What is in this image?", [image], sampling=SamplingParams(max_new_tokens=64)).collect()
    t = answer.timings
    assert t.images_cached == 1 and t.vision_tiles == 0  # the session cache
    print(f"\n{answer.text!r}\n" + json.dumps(t.to_dict()))
    assert t.prefill_ms > 0 and t.decode_tok_s > 0


def test_abort_then_next_question(pipeline):
    steps = []
    for step in pipeline.ask("Write a long story about a robot.", sampling=SamplingParams(max_new_tokens=400)):
        steps.append(step)
        if len(steps) == 3:
            pipeline.abort()
    assert steps[-1].finish_reason == "abort" and len(steps) < 20
    assert pipeline.ask("Say hello.", sampling=SamplingParams(max_new_tokens=8)).collect().token_ids


def test_keep_history_turn_equals_a_fresh_run_of_the_whole_sequence(pipeline):
    """Turn two fed on top of the cache == the whole token sequence fed from scratch (first tokens)."""
    from board.sequence import embed_tokens

    params = SamplingParams(max_new_tokens=24)
    chat = pipeline.chat()
    first = chat.send("Name three colours.", sampling=params)
    answer1 = first.collect()
    second = chat.send("And three animals?", sampling=SamplingParams(max_new_tokens=8))
    answer2 = second.collect()
    print(f"\nturn 1 finish={answer1.finish_reason} ids={answer1.token_ids}\n"
          f"turn 2 history_tokens={answer2.timings.history_tokens}")
    assert answer2.timings.history_tokens > 0, (
        "turn two re-fed the conversation: librkllmrt did not report the end-of-turn token id, so whether "
        "its cache holds it is unknown")
    ids = np.concatenate([first.prompt.input_ids, answer1.token_ids, second.prompt.input_ids])
    fresh = GenerationResult.collect(pipeline.decoder.generate(
        embed_tokens(pipeline.table, ids), sampling=SamplingParams(max_new_tokens=8), keep_history=False))
    assert fresh.token_ids[:4] == answer2.token_ids[:4]


def test_cli_json(bundle_dir, image):
    result = subprocess.run([sys.executable, str(ROOT / "board" / "run.py"), "--bundle", str(bundle_dir), "--json",
                             "--max-new-tokens", "32", "--image", str(image), "What is in this image?"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    print("\n" + json.dumps(answer["timings"]))
    assert answer["token_ids"] and answer["model"]["vision"] == "rknnlite"
