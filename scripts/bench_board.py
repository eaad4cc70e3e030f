#!/usr/bin/env python3
"""Benchmark a bundle on the board (or with --emulate on x86) and print one JSON object with --json.

    python3 scripts/bench_board.py --bundle ~/smolvlm-256m --json --runs 5

The same command as `python board/bench.py` and the installed `smolvlm-bench`; see board/bench.py
for the workload and the JSON keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from board.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
