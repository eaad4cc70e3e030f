#!/usr/bin/env bash
# The project's test command (README "Tests"): the default suite, no board needed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
