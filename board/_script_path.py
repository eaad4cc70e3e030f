"""Makes `import board` work when a board command runs as a script (`python board/run.py` from a copied
folder, no install): run.py, serve.py and bench.py run this file first in that case, and only then
(by path, with runpy: the script's folder need not be on sys.path, e.g. under runpy.run_path).

Python puts the script's folder, board/, first on sys.path. That folder comes off (its modules, e.g.
video.py, must not shadow top-level ones of the same name) and the folder above it goes on, so the
package imports as it does when installed.
"""

import sys
from pathlib import Path

_board_dir = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _board_dir:
    sys.path.pop(0)
sys.path.insert(0, str(_board_dir.parent))
