"""`python -m board COMMAND ...`: the board's commands from a copied folder or the installed package.

    python -m board run --bundle DIR --image a.jpg "question"   (= python board/run.py)
    python -m board serve --bundle DIR                           (OpenAI-compatible server)
    python -m board bench --bundle DIR --json                    (latency benchmark)
    python -m board checks [--bundle DIR]                        (NPU driver, runtimes, exit status)
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {"run": "board.run", "serve": "board.serve", "bench": "board.bench", "checks": "board.system_checks"}
COMMANDS["doctor"] = "board.doctor"  # python -m board doctor --bundle DIR [--emulate] [--json]: run it first


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"python -m board: unknown command '{command}'; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
