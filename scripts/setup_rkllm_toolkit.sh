#!/usr/bin/env bash
# Make rkllm-toolkit 1.3.0's own venv (.venv-rkllm), apart from the host venv's torch 2.13.
#
#   bash scripts/setup_rkllm_toolkit.sh ~/Downloads/rkllm_toolkit-1.3.0-cp311-cp311-linux_x86_64.whl
#   bash scripts/setup_rkllm_toolkit.sh WHEEL --dry-run          # print the commands, run nothing
#
# The wheel comes from Rockchip's GitHub repository airockchip/rknn-llm (release v1.3.0, folder
# rkllm-toolkit/packages/); this project never downloads it. Upstream pins torch 2.6.0 and its own
# transformers (rkllm-toolkit/packages/requirements.txt, Python 3.9-3.12). This script:
#   1. checks the wheel's name (rkllm_toolkit-1.3.0-cp3XX-...-linux_x86_64.whl) and finds python3.XX for it;
#   2. makes the venv with that Python;
#   3. installs torch 2.6.0 and torchvision 0.21.0 as CPU builds (PyTorch's CPU index: no CUDA download),
#      and "setuptools<81" (the toolkit imports pkg_resources);
#   4. installs the wheel with its own dependency pins (its metadata: transformers 5.8.0, ...), plus
#      upstream's requirements.txt when given with --requirements (the CPU torch already satisfies its
#      torch pins);
#   5. checks that `python -m host.rkllm_runner --probe` imports the toolkit and prints its version.
# host.convert then runs the RKLLM step with .venv-rkllm/bin/python (or --rkllm-python PATH).
#
# Exit status: 0 ready, 1 a step failed, 2 bad arguments.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-rkllm"
PYTHON=""
REQUIREMENTS=""
DRY_RUN=0
WHEEL=""
TORCH_INDEX="https://download.pytorch.org/whl/cpu"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    cat <<EOF
Usage: bash scripts/setup_rkllm_toolkit.sh WHEEL [--venv DIR] [--python PY] [--requirements FILE] [--dry-run]
  --venv DIR           where to make the venv (default: $VENV)
  --python PY          the interpreter to make it with (default: python3.XX matching the wheel's cp3XX tag)
  --requirements FILE  also install upstream's rkllm-toolkit/packages/requirements.txt
  --dry-run            print what would run, change nothing
EOF
}

die_usage() { echo "setup_rkllm_toolkit.sh: error: $*" >&2; echo "(--help for usage)" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --venv) [ $# -ge 2 ] || die_usage "--venv needs a folder"; VENV="$2"; shift 2 ;;
        --python) [ $# -ge 2 ] || die_usage "--python needs an interpreter"; PYTHON="$2"; shift 2 ;;
        --requirements) [ $# -ge 2 ] || die_usage "--requirements needs a file"; REQUIREMENTS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -*) die_usage "unknown option $1" ;;
        *) [ -z "$WHEEL" ] || die_usage "one wheel only (got $WHEEL and $1)"; WHEEL="$1"; shift ;;
    esac
done

[ -n "$WHEEL" ] || die_usage "give the rkllm-toolkit wheel (rkllm_toolkit-1.3.0-cp3XX-cp3XX-linux_x86_64.whl from airockchip/rknn-llm release v1.3.0, rkllm-toolkit/packages/)"
[ -f "$WHEEL" ] || die_usage "no such wheel: $WHEEL"
name="$(basename "$WHEEL")"
if [[ ! "$name" =~ ^rkllm_toolkit-1\.3\.0-cp3(9|1[0-2])-cp3(9|1[0-2])-(manylinux[^-]*_|linux_)x86_64\.whl$ ]]; then
    die_usage "$name is not an rkllm-toolkit 1.3.0 wheel for CPython 3.9-3.12 on x86_64 Linux"
fi
minor="${BASH_REMATCH[1]}"
[ -z "$REQUIREMENTS" ] || [ -f "$REQUIREMENTS" ] || die_usage "no such requirements file: $REQUIREMENTS"
if [ "$(uname -s)" != "Linux" ] || [ "$(uname -m)" != "x86_64" ]; then
    die_usage "rkllm-toolkit runs on x86_64 Linux only; this is $(uname -s) $(uname -m)"
fi
if [ -z "$PYTHON" ]; then
    PYTHON="$(command -v "python3.$minor" || true)"
    [ -n "$PYTHON" ] || die_usage "the wheel is for Python 3.$minor and there is no python3.$minor on PATH (install it, or give --python)"
fi
have="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)" \
    || die_usage "cannot run $PYTHON"
[ "$have" = "3.$minor" ] || die_usage "$PYTHON is Python $have; the wheel $name needs 3.$minor"

run() {
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

echo "rkllm-toolkit venv: $VENV (Python $have from $PYTHON)"
run "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
run "${PIP[@]}" install --upgrade pip
run "${PIP[@]}" install "torch==2.6.0" "torchvision==0.21.0" --index-url "$TORCH_INDEX"
run "${PIP[@]}" install "setuptools<81"
run "${PIP[@]}" install "$WHEEL"
[ -z "$REQUIREMENTS" ] || run "${PIP[@]}" install -r "$REQUIREMENTS"
echo "+ checking: (cd $ROOT && PYTHONPATH=$ROOT $VENV/bin/python -m host.rkllm_runner --probe)"
if [ "$DRY_RUN" = 1 ]; then
    echo "(dry run: nothing was changed)"
    exit 0
fi
if ! probe="$(cd "$ROOT" && PYTHONPATH="$ROOT" "$VENV/bin/python" -m host.rkllm_runner --probe)"; then
    echo "error: the venv was made but rkllm-toolkit does not import: $probe" >&2
    exit 1
fi
echo "ready: $probe"
echo "host.convert now builds decoder.rkllm with $VENV/bin/python (drop --skip-decoder)."
