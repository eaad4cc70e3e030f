"""`python -m board COMMAND ...`: the board's commands from a copied folder or the installed package.

    python -m board doctor --bundle DIR [--emulate] [--json]     (run it first on a new board: proves every assumption)
    python -m board run --bundle DIR --image a.jpg "question"   (= python board/run.py)
    python -m board serve --bundle DIR                           (OpenAI-compatible server)
    python -m board bench --bundle DIR --json                    (latency benchmark)
    python -m board batch --bundle DIR --images FOLDER --prompt "..." --out results.jsonl
                                                                 (every image of a folder, resumable; or --server URL)
    python -m board checks [--bundle DIR]                        (NPU driver, runtimes, exit status)
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {"doctor": "board.doctor", "run": "board.run", "serve": "board.serve", "bench": "board.bench",
            "checks": "board.system_checks", "batch": "board.batch"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"python -m board: unknown command '{command}'; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    program, sys.argv[0] = sys.argv[0], f"python -m board {command}"  # its --help names it as typed
    try:
        return importlib.import_module(COMMANDS[command]).main(rest)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    sys.exit(main())
