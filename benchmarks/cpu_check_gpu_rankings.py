"""CPU check of a study's GPU rankings: rank a few of its test records again here, with this machine's packages.

The ML-100K study trained and ranked its stages on a lent GPU machine whose transformers (5.17) lay below the
project's bound. Here each such stage ranks the first `records` of the study's seeded test draw (they lie inside
the study's 2,000) on the CPU, in the study's precision, and its log-probs are compared with the committed ones:
the largest absolute difference per stage, and whether the top candidate agrees.

    python benchmarks/cpu_check_gpu_rankings.py studies/ml100k configs/study-ml100k.yaml docs/results/study-ml100k/cpu-check.json [32]
"""

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
import yaml

from sdpo.data.datasets import load_split
from sdpo.data.prepare import prepare_dataset
from sdpo.lm.precision import cpu_name
from sdpo.pipeline.evaluate import evaluate_model, read_candidate_logps

study, config_path, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 32
config = yaml.safe_load(config_path.read_text())
if not (study / "data" / "manifest.json").is_file():
    prepare_dataset(config["data"]["dataset"], study / "data", seed=config.get("seed", 0))  # from $SDPO_MIRROR
subset_seed = config.get("subset_seed", 0)
records = load_split(study / "data", "test", n, subset_seed)
stages = []
for metrics_path in sorted(study.glob("eval/*-rank/metrics.json")):
    finished = json.loads(metrics_path.read_text())
    if "cuda" in str(finished.get("device", "cpu")).lower() or "nvidia" in str(finished.get("device", "")).lower():
        stages.append(metrics_path.parent.name.removesuffix("-rank"))
results = []
for stage in stages:
    start = time.perf_counter()
    adapter = None if stage == "zero-shot" else study / stage
    with tempfile.TemporaryDirectory() as folder:
        evaluate_model(study / "data", "test", None, adapter, "rank", n, folder, 8, subset_seed=subset_seed, progress=False,
                       bf16=config.get("bf16"), reward=False, device="cpu")
        here = read_candidate_logps(folder, records)
    there = read_candidate_logps(study / "eval" / f"{stage}-rank", records)
    worst = max(abs(a - b) for row_a, row_b in zip(here, there, strict=True) for a, b in zip(row_a, row_b, strict=True))
    same_top = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in zip(here, there, strict=True))
    results.append({"stage": stage, "records": n, "max_abs_logp_diff": worst, "top1_agreement": same_top / n,
                    "seconds": round(time.perf_counter() - start, 1)})
    print(results[-1], flush=True)
out.write_text(json.dumps({
    "study": str(study), "gpu_device": "NVIDIA H200 (transformers 5.17.0, torch 2.11.0+cu130, peft 0.21.2; see gpu-run.log)",
    "cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    "peft": peft.__version__, "records": f"the first {n} of the study's seeded test draw (subset seed {subset_seed})", "stages": results,
}, indent=2) + "\n")
print(f"wrote {out}")
