#!/usr/bin/env bash
# Copy the board runtime and a bundle from this machine to an RK3588 board over ssh (rsync).
#
#   scripts/deploy.sh orangepi@192.168.1.50 --bundle bundles/smolvlm-256m
#   scripts/deploy.sh rock@rock5b.local --bundle out/b --dest /opt/smolvlm --setup
#   scripts/deploy.sh orangepi@opi5 --bundle bundles/smolvlm-256m --dry-run   # show what would change
#   scripts/deploy.sh --local /mnt/sdcard/home/orangepi/smolvlm --bundle bundles/smolvlm-256m
#
# What goes to DEST (default ~/smolvlm on the board):
#   board/ scripts/ setup.cfg pyproject.toml README.md   the runtime, its installer and the board scripts
#   tests/ (only the on-board tests: conftest.py, support.py, test_board_rk3588.py,
#          test_latency_rk3588.py; the budgets ship in board/)
#   bundles/NAME/    the bundle, without its host/ folder (x86 emulation files and build reports,
#                    not needed on the board) unless --with-host
# Only those paths are synchronised (rsync --delete inside them, so stale files go); nothing else in
# DEST is touched. The board needs rsync too (sudo apt install rsync). --setup then runs
# scripts/board_setup.sh on the board. Rockchip's runtime libraries are not copied: board_setup.sh
# says where to get them.
#
# Options: --bundle DIR (repeatable), --dest DIR, --with-host, --setup, --dry-run (rsync -n: list the
# changes, create and change nothing), --port N, and $DEPLOY_SSH for another ssh command
# (e.g. DEPLOY_SSH="ssh -i ~/.ssh/board_key"). --local /ABS/DIR copies the same files into a folder
# on this machine instead of over ssh (a board's SD card mounted here; scripts/board_rehearsal uses
# it to lay the files out in its arm64 userland exactly as on a board).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=""
DEST="smolvlm"  # relative: under the remote user's home
BUNDLES=()
WITH_HOST=0
SETUP=0
DRY=0
SSH=${DEPLOY_SSH:-ssh}
LOCAL=""

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLES+=("${2:?--bundle needs a folder}"); shift 2 ;;
        --dest) DEST=${2:?--dest needs a folder}; shift 2 ;;
        --with-host) WITH_HOST=1; shift ;;
        --setup) SETUP=1; shift ;;
        --dry-run|-n) DRY=1; shift ;;
        --port) SSH="$SSH -p ${2:?--port needs a number}"; shift 2 ;;
        --local) LOCAL=${2:?--local needs a folder}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$TARGET" ] || { echo "deploy.sh: one target only (got $TARGET and $1)" >&2; exit 2; }
           TARGET=$1; shift ;;
    esac
done
if [ -n "$LOCAL" ]; then
    if [ -n "$TARGET" ] || [ "$SETUP" = 1 ]; then
        echo "deploy.sh: --local copies into a folder here: give no user@host and no --setup" >&2
        exit 2
    fi
    case "$LOCAL" in
        /*) DEST=$LOCAL ;;
        *) echo "deploy.sh: --local needs an absolute path (got $LOCAL)" >&2; exit 2 ;;
    esac
elif [ -z "$TARGET" ]; then
    echo "deploy.sh: give the board as user@host (see --help)" >&2
    exit 2
fi
command -v rsync >/dev/null || { echo "deploy.sh: rsync is not installed here (sudo apt install rsync)" >&2; exit 1; }
for b in "${BUNDLES[@]+"${BUNDLES[@]}"}"; do
    if [ ! -f "$b/manifest.json" ]; then
        echo "deploy.sh: $b is not a bundle (no manifest.json); make one with python -m host.convert" >&2
        exit 2
    fi
    if [ ! -f "$b/decoder.rkllm" ]; then
        echo "deploy.sh: warning: $b has no decoder.rkllm (converted with --skip-decoder): the board cannot answer with it" >&2
    fi
done

RSYNC=(rsync -az --partial --delete --exclude __pycache__ --exclude '*.pyc')
if [ -z "$LOCAL" ]; then
    RSYNC+=(-e "$SSH")
    TO="$TARGET:$DEST"
else
    TO=$DEST
fi
if [ "$DRY" = 1 ]; then
    RSYNC+=(--dry-run --itemize-changes)
fi
say() { echo "[deploy] $*"; }
remote() {  # a command on the board, or here with --local (printed, not run, in a dry run)
    if [ "$DRY" = 1 ] && [ -n "$LOCAL" ]; then
        echo "[dry-run] bash -c $*"
    elif [ "$DRY" = 1 ]; then
        echo "[dry-run] $SSH $TARGET $*"
    elif [ -n "$LOCAL" ]; then
        bash -c "$*"
    else
        # shellcheck disable=SC2086  # $SSH is a command line with options
        $SSH "$TARGET" "$@"
    fi
}

q=$(printf '%q' "$DEST")
say "code to $TO"
remote "mkdir -p $q/tests $q/bundles"
"${RSYNC[@]}" board scripts "$TO/"
"${RSYNC[@]}" setup.cfg pyproject.toml README.md LICENSE "$TO/"
"${RSYNC[@]}" tests/conftest.py tests/support.py tests/test_board_rk3588.py \
    tests/test_latency_rk3588.py "$TO/tests/"

for b in "${BUNDLES[@]+"${BUNDLES[@]}"}"; do
    name=$(basename "$(cd "$b" && pwd)")
    extra=()
    [ "$WITH_HOST" = 1 ] || extra=(--exclude /host/)
    say "bundle $b to $TO/bundles/$name$([ "$WITH_HOST" = 1 ] || echo ' (without host/)')"
    "${RSYNC[@]}" "${extra[@]+"${extra[@]}"}" "$b/" "$TO/bundles/$name/"
done

if [ "$SETUP" = 1 ]; then
    bundle_arg=""
    if [ "${#BUNDLES[@]}" -gt 0 ]; then
        bundle_arg="--bundle bundles/$(printf '%q' "$(basename "$(cd "${BUNDLES[0]}" && pwd)")")"
    fi
    say "running scripts/board_setup.sh on the board"
    remote "cd $q && bash scripts/board_setup.sh --tests $bundle_arg"
fi

[ "$DRY" = 0 ] || { say "dry run: nothing was changed"; exit 0; }
[ -z "$LOCAL" ] || { say "done: the board's files are in $DEST"; exit 0; }
say "done. On the board:"
echo "    cd $DEST && bash scripts/board_setup.sh --tests   # once: venv, requirements, board checks"
if [ "${#BUNDLES[@]}" -gt 0 ]; then
    name=$(basename "$(cd "${BUNDLES[0]}" && pwd)")
    echo "    .venv/bin/python -m board doctor --bundle bundles/$name   # first: every runtime assumption, checked"
    echo "    .venv/bin/python board/run.py --bundle bundles/$name --image photo.jpg 'What is in this image?'"
    echo "    .venv/bin/python board/serve.py --bundle bundles/$name      # OpenAI-compatible, 127.0.0.1:8080"
    echo "    .venv/bin/python board/bench.py --bundle bundles/$name --json"
fi
