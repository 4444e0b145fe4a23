"""GPU check: the packed kernel on CUDA (fp32, bf16) and the step benchmark at SmolLM2-135M's shape.

The GGUF weights cannot travel to the GPU machine here, so the model is SmolLM2-135M's
architecture with random weights (timings and memory do not depend on the weight values).

    python benchmarks/cuda_check.py CONFIG_JSON TOKENIZER_DIR DATA_DIR OUT_DIR
(CONFIG_JSON and TOKENIZER_DIR from $SDPO_HOME/models/smollm2-135m*, DATA_DIR a prepared folder.)
"""
import json
import sys
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

config_json, tokenizer_dir, data_dir, out = sys.argv[1:5]
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
config = AutoConfig.from_pretrained(config_json)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)  # random weights, SmolLM2-135M's shape
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
arch = tempfile.mkdtemp(prefix="smol-arch-")
model.save_pretrained(arch); tok.save_pretrained(arch)
from sdpo.data.datasets import load_split
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.lm.scoring import score_answers

records = load_split(data_dir, "test", limit=4)
report = {}
for dtype in (torch.float32, torch.bfloat16):
    m = AutoModelForCausalLM.from_pretrained(arch, dtype=dtype).cuda().eval()
    prompts = [record_prompt_ids(tok, r, "music") for r in records]
    answers = [[encode_answer(tok, c) for c in r.candidates] for r in records]
    with torch.no_grad():
        packed = score_answers(m, prompts, answers, tok.pad_token_id).float().cpu()
        worst = 0.0
        for b, (p, ans) in enumerate(zip(prompts, answers, strict=True)):
            for a, x in enumerate(ans):
                ids = torch.tensor([p + x], device="cuda")
                lp = torch.log_softmax(m(input_ids=ids).logits[0].float(), -1)
                ref = sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(x))
                worst = max(worst, abs(ref - packed[b, a].item()))
    report[str(dtype)] = worst
    print("packed vs plain on CUDA", dtype, "max abs diff", worst, flush=True)
json.dump(report, open(f"{out}/cuda-kernel-check.json", "w"), indent=2)
from sdpo.benchmarks.step import benchmark_step, format_table, save_results

records = load_split(data_dir, "test", limit=8)
t = time.time()
results = benchmark_step(arch, records, "music", [1, 3, 7, 15], repeats=5, device="cuda")
save_results(f"{out}/step-smollm2-arch-cuda.json", "SmolLM2-135M architecture, random weights", torch.cuda.get_device_name(0), results, 5)
print(format_table(results)); print("benchmark seconds", time.time() - t)
