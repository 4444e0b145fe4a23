#!/usr/bin/env bash
# Set up, then run the main job: SFT then S-DPO with SmolLM2-135M on LastFM, on text and on collaborative
# prompts, beside popularity and SASRec (configs/quickstart.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sdpo pipeline "${1:-configs/quickstart.yaml}"
