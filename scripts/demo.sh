#!/usr/bin/env bash
# The offline demo (README "Quick start"): set up the host environment, convert the EMBEDDED tiny
# SmolVLM-256M-geometry model (random weights, built from a config: no download) through every stage
# this machine can run, then ask the bundle about an image in x86 emulation. The answer is noise:
# the weights are random; the files, shapes, tokens and checks are the real ones.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
OUT=${1:-demo-bundle}
PY=.venv/bin/python

if "$PY" -c "import rkllm.api" 2>/dev/null; then
    echo "[demo] rkllm-toolkit found: decoder.rkllm is built too"
    "$PY" -m host.convert --tiny 256m --out "$OUT" --max-context 1024
else
    echo "[demo] rkllm-toolkit not installed: converting with --skip-decoder (see README to add it)"
    "$PY" -m host.convert --tiny 256m --out "$OUT" --skip-decoder
fi

echo "[demo] asking the bundle about an image in x86 emulation (tiny random model: the answer is noise)"
"$PY" board/run.py --bundle "$OUT" --emulate --image calibration/images/rocket.jpg --max-new-tokens 16 \
    "What is in this image?"
echo
echo "[demo] done: the bundle is in $OUT/ (copy it to a board once converted from a real model)"
