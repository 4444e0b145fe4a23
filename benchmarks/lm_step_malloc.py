"""Does `keep_freed_memory` help LM steps too? (It does not; docs/benchmark.md.)

Run twice per setting, alternating, each in a fresh process (the malloc setting cannot be
undone):  python benchmarks/lm_step_malloc.py DATA_DIR 0|1
Prints the median of 5 timed shared-prompt S-DPO steps (K=3, 4 train records, SmolLM2-135M
with LoRA, after one warm-up step).
"""

import json
import statistics
import sys
import time

from sdpo.benchmarks.step import shared_step, step_answers
from sdpo.data.datasets import load_split
from sdpo.data.prompts import record_prompt_ids
from sdpo.lm.allocator import keep_freed_memory
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.scoring import pack_answers

data, keep = sys.argv[1], sys.argv[2] == "1"
if keep and not keep_freed_memory():
    sys.exit("this C library does not take the malloc setting")
records = load_split(data, "train", limit=4)
base, tokenizer = load_model("smollm2-135m")
policy = add_lora(base, LoraSettings(dropout=0.0)).train()
prompts = [record_prompt_ids(tokenizer, r, "music") for r in records]
packed = pack_answers(prompts, step_answers(tokenizer, records, 3), tokenizer.pad_token_id)
seconds = []
for _ in range(6):
    policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    shared_step(policy, packed)
    seconds.append(time.perf_counter() - start)
print(json.dumps({"keep_freed_memory": keep, "median_step_s": round(statistics.median(seconds[1:]), 3)}))
