#!/usr/bin/env bash
# The packed S-DPO step against the published one-sequence-per-answer step on a GPU, with the real
# SmolLM2 weights: step time and peak memory at K=3 and K=15, batch 8 and 32, bf16, for SDPA and
# FlexAttention. One JSON file per (attention, batch) under OUT_DIR; docs/benchmark.md has the table.
#   OUT_DIR=results bash scripts/gpu-step-benchmark.sh                  # on a CUDA machine, .venv set up
#   MODEL=tiny DEVICE=cpu PRECISION=--no_bf16 ATTENTIONS=sdpa BATCHES=2 OUT_DIR=runs/b bash scripts/gpu-step-benchmark.sh
# (a dry run on the CPU: torch has no FlexAttention backward there)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-smollm2-135m}"
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:---bf16}"
BATCHES="${BATCHES:-8 32}"
ATTENTIONS="${ATTENTIONS:-sdpa flex_attention}"
OUT_DIR="${OUT_DIR:?set OUT_DIR to the folder for the result files}"
DATA="${DATA:-data/lastfm}"
mkdir -p "$OUT_DIR"
[ -f "$DATA/manifest.json" ] || sdpo data prepare lastfm --out "$DATA"
for attention in $ATTENTIONS; do
  for records in $BATCHES; do
    sdpo benchmark step --model "$MODEL" --device "$DEVICE" "$PRECISION" --attn_implementation "$attention" \
      --negatives 3,15 --records "$records" --repeats 5 --data "$DATA" --json "$OUT_DIR/step-$attention-$records.json"
  done
done
