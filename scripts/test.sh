#!/usr/bin/env bash
# Set up, lint (ruff, rules in pyproject.toml), then run the test suite.
# Tests read the data through SDPO_MIRROR (e.g. ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# one pytest-xdist worker per core (SDPO_TEST_WORKERS=0 runs in this process: pdb, -x)
exec .venv/bin/python -m pytest -n "${SDPO_TEST_WORKERS:-auto}" "$@"
