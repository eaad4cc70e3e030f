"""Latency budgets on a real RK3588: board/bench.py's workload, one test per stage.

    sudo scripts/board_clocks.sh pin          # comparable numbers need pinned clocks
    SMOLVLM_BUNDLE=~/bundles/smolvlm-256m pytest -m rk3588 tests/test_latency_rk3588.py -s
    sudo scripts/board_clocks.sh unpin

The bench runs once per session (SMOLVLM_BENCH_RUNS runs, default 3; its JSON is printed, and
written to $SMOLVLM_BENCH_OUT if set); each stage's median is then checked against
board/rk3588_budgets.json, so a regression fails exactly the stage that regressed, with the measured
median, its spread and the budget in the message. Skipped (with the reason) off the board, and for
a model that has no budgets entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from board.bench import BUDGETS_FILE, budget_entry, check_budget, run_bench

RUNS_ENV, OUT_ENV = "SMOLVLM_BENCH_RUNS", "SMOLVLM_BENCH_OUT"
BUDGETS = json.loads(BUDGETS_FILE.read_text())
STAGES = sorted({key for model in BUDGETS["models"] for key in model["budgets"]})

pytestmark = pytest.mark.rk3588


@pytest.fixture(scope="module")
def budgets(bundle_dir) -> dict:
    from board.bundle import Bundle

    entry = budget_entry(BUDGETS, Bundle.open(bundle_dir, verify=False))
    if entry is None:
        pytest.skip(f"{BUDGETS_FILE.name} has no entry for this model; add one (match: vision family + hidden size)")
    return entry


@pytest.fixture(scope="module")
def measured(bundle_dir, budgets) -> dict:
    result = run_bench(bundle_dir, runs=int(os.environ.get(RUNS_ENV, "3")), log=lambda line: print(f"[bench] {line}"))
    text = json.dumps(result)
    print("\n" + text)
    if os.environ.get(OUT_ENV):
        Path(os.environ[OUT_ENV]).write_text(text + "\n")
    clocks = result["system"]["clocks"]
    if clocks.get("npu", {}).get("governor") not in ("performance", "userspace"):
        print(f"\nwarning: NPU clock governor is {clocks.get('npu', {}).get('governor')!r}, not pinned; "
              "budgets assume `sudo scripts/board_clocks.sh pin`")
    return result


def test_the_npu_ran(measured):
    assert measured["backend"] == "npu" and measured["runtime"]["vision"] == "rknnlite"
    assert measured["runtime"]["decoder"] == "RKLLMDecoder"
    assert measured["workload"]["tiles"] == 17


@pytest.mark.parametrize("stage", STAGES)
def test_stage_within_budget(stage, budgets, measured):
    rule = budgets["budgets"].get(stage)
    if rule is None:
        pytest.skip(f"no budget for {stage} in the '{budgets['name']}' entry")
    problem = check_budget(measured, stage, rule)
    assert problem is None, problem
