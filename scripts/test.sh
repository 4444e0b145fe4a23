#!/usr/bin/env bash
# Set up, then run the test suite. Tests read the data through SDPO_MIRROR (e.g. ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
