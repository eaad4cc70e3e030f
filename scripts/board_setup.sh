#!/usr/bin/env bash
# On the RK3588 board: make a Python venv with the board runtime and check that the board can run it.
#
#   bash scripts/board_setup.sh                      # venv at ./.venv, then the checks
#   bash scripts/board_setup.sh --bundle ~/smolvlm-256m --tests
#   bash scripts/board_setup.sh --dry-run            # print what it would do, change nothing
#
# Run it as your normal user from the folder scripts/deploy.sh copied (board/, scripts/, setup.cfg,
# pyproject.toml). It installs from PyPI only: numpy, opencv-python-headless, pillow, tokenizers, tqdm, the
# server's uvicorn, starlette and prometheus-client and, on aarch64, rknn-toolkit-lite2 2.5.0 (the
# "board" extra of setup.cfg); --tests adds pytest.
#
# It never downloads Rockchip's binaries. The two runtime libraries come from Rockchip's GitHub
# releases and are copied by you (the checks print exactly which file, from where, to where):
#   librknnrt.so 2.5.0   airockchip/rknn-toolkit2  rknpu2/runtime/Linux/librknn_api/aarch64/ -> /usr/lib/
#   librkllmrt.so 1.3.0  airockchip/rknn-llm release-v1.3.0  rkllm-runtime/Linux/librkllm_api/aarch64/
#                        -> /usr/lib/ (or the bundle folder, or $RKLLM_LIB)
# and the NPU kernel driver must be 0.9.8 or newer (a board OS image question, not a pip one).
#
# Exit status: 0 ready; 1 the install failed; 2 bad arguments; 3-7 installed, but a board check failed
# (the first one, named above the exit): 3 not an RK3588 (no rockchip,rk3588 device tree), 4 NPU
# driver missing or older than 0.9.8, 5 librknnrt.so missing, 6 rknnlite missing, 7 librkllmrt.so
# missing or not 1.3.0 (python -m board.system_checks --help).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PYTHON=${PYTHON:-python3}
BUNDLE=""
TESTS=0
DRY=0

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        --tests) TESTS=1; shift ;;
        --dry-run|-n) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "board_setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[board_setup] $*"; }
run() {
    if [ "$DRY" = 1 ]; then
        printf '[dry-run]'; printf ' %q' "$@"; echo
    else
        "$@"
    fi
}

if [ ! -f setup.cfg ] || [ ! -d board ]; then
    echo "board_setup.sh: run it from the copied project folder (it needs board/ and setup.cfg beside scripts/)" >&2
    exit 2
fi
if [ "$(id -u)" = 0 ] && [ "$DRY" = 0 ]; then
    say "warning: running as root; the venv will belong to root. Run as your normal user unless that is what you want."
fi

ARCH=$(uname -m)
if [ "$ARCH" != aarch64 ]; then
    say "warning: this is $ARCH, not an aarch64 RK3588 board: rknn-toolkit-lite2 is skipped (aarch64 only)"
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "board_setup.sh: $PYTHON not found; install it: sudo apt install python3 python3-venv python3-pip" >&2
    exit 1
fi
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$PYVER" in
    3.8|3.9|3.10|3.11|3.12) ;;
    *) say "warning: Python $PYVER; rknn-toolkit-lite2 2.5.0 has wheels for Python 3.8-3.12 only" ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        echo "board_setup.sh: Python's venv module (with pip) is missing; install it first:" >&2
        echo "    sudo apt install python3-venv python3-pip" >&2
        exit 1
    fi
    say "creating $VENV with Python $PYVER"
    run "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

EXTRAS="board"
say "installing the board runtime (setup.cfg extra [$EXTRAS]) from PyPI"
if ! run "$VPY" -m pip install -q -e ".[$EXTRAS]"; then
    echo "board_setup.sh: pip could not install the board requirements (network? a Python without wheels?)" >&2
    exit 1
fi
if [ "$TESTS" = 1 ]; then
    say "installing pytest (for pytest -m rk3588 tests/test_board_rk3588.py tests/test_latency_rk3588.py)"
    run "$VPY" -m pip install -q "pytest>=7" || exit 1
fi

if [ "$DRY" = 1 ]; then
    say "dry run: the board checks (board.system_checks) would run next"
    exit 0
fi

say "checking the board (device tree, NPU driver, librknnrt, rknnlite, librkllmrt)"
exec "$VPY" -m board.system_checks ${BUNDLE:+--bundle "$BUNDLE"}
