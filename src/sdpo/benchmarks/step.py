"""Benchmark one S-DPO training step: the shared-prompt kernel against the published code's way.

The published way (``naive``): for every record, 1+K complete prompt+answer sequences are
stacked in the batch; the policy computes full-vocabulary logits at every position; a
separate frozen reference model runs a second forward over all of them. Ours (``shared``):
one packed row per record (prompt once, answers behind it, LM head at answer positions
only), for the policy and for the reference pass. Both run a full step (policy forward +
backward + the reference's forward) on the same model, records and K, in one process.

Peak memory: on CUDA the allocator's peak; on the CPU the peak rise of the process's
resident memory during the step, sampled every millisecond (large blocks are returned to
the OS on free so one step's peak does not hide the next's).
"""

from __future__ import annotations

import copy
import gc
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from sdpo.data.negatives import random_negatives
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.lm.allocator import return_freed_memory
from sdpo.lm.head import fp32_head
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import compute_context, cpu_name, model_dtype
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.losses import softmax_dpo_loss


class PeakMemory:
    """Peak memory rise (MiB) inside a `with` block."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, self._rss()) - self._start) / 2**20


def step_answers(tokenizer, records: list[Record], k: int) -> list[list[list[int]]]:
    """Per record, the token ids of its target and of K seeded random negatives (target first)."""
    return [[encode_answer(tokenizer, record.candidates[i]) for i in chosen]
            for record, chosen in zip(records, step_answer_indices(records, k).tolist(), strict=True)]


def step_answer_indices(records: list[Record], k: int) -> torch.Tensor:
    """[B, 1+K] candidate indices of the answers `step_answers` chose (target first), for the trunk rows."""
    return torch.tensor([[r.candidates.index(r.target), *random_negatives(r, k, 0, position)] for position, r in enumerate(records)])


def trunk_lora_model(model_name: str, dtype: torch.dtype, lora_layers: int, soft_tokens=None):
    """(model, tokenizer, depth): the LM with LoRA on its last `lora_layers` layers, B drawn at random and no dropout
    (so that every way of computing it gives one function), and depth = the number of frozen layers below the adapter."""
    base, tokenizer = load_model(model_name, dtype=dtype, soft_tokens=soft_tokens)
    n_layers = base.config.num_hidden_layers
    if not 1 <= lora_layers < n_layers:
        raise UserError(f"--lora_layers must be between 1 and {n_layers - 1}: the layers below the adapter are the trunk, "
                        f"got {lora_layers}.")
    model = add_lora(base, LoraSettings(dropout=0.0, last_layers=lora_layers)).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model, tokenizer, n_layers - lora_layers


def naive_sequences(prompts, answers, pad_token_id):
    """[R, L] input ids, attention mask, and labels (-100 outside answers) for R = B * (1+K) sequences."""
    sequences, label_rows = [], []
    for prompt, record_answers in zip(prompts, answers, strict=True):
        for answer in record_answers:
            sequences.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
    length = max(len(s) for s in sequences)
    input_ids = torch.tensor([s + [pad_token_id] * (length - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    labels = torch.tensor([row + [-100] * (length - len(row)) for row in label_rows])
    return input_ids, attention, labels


def naive_logps(model, input_ids, attention, labels) -> torch.Tensor:
    """[R] summed answer log-probs the published way: full-vocabulary logits at every position.

    The model's own forward computes the logits, with the head the packed kernel uses (fp32 on a
    bf16 model, `sdpo.lm.head.fp32_head`), so the two ways differ only in how they lay out the work.
    """
    lm_head = model.get_output_embeddings()
    with compute_context(lm_head.weight), fp32_head(lm_head):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()  # [R, L-1, V]
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def naive_step(policy, reference, batch, n_answers: int, beta: float = 1.0) -> torch.Tensor:
    input_ids, attention, labels = batch
    with torch.no_grad():
        ref = naive_logps(reference, input_ids, attention, labels).view(-1, n_answers)
    logps = naive_logps(policy, input_ids, attention, labels).view(-1, n_answers)
    loss = softmax_dpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta).mean()
    loss.backward()
    return logps.detach()


def shared_step(policy, packed, beta: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        ref, _ = answer_logprobs(policy, packed)  # the reference pass (worst case: every step)
    logps, _ = answer_logprobs(policy, packed)
    loss = softmax_dpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta).mean()
    loss.backward()
    return logps.detach()


def _timed(fn, device, repeats: int):
    fn()  # warm-up
    seconds, peaks, result = [], [], None
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        peaks.append(memory.peak_mb)
    return statistics.median(seconds), statistics.median(peaks), result


def benchmark_step(model_name: str, records: list[Record], domain: str, ks: list[int], repeats: int = 3, device: str = "cpu",
                   bf16: bool = False, attn_implementation: str = "sdpa") -> list[dict[str, Any]]:
    """Time one S-DPO step both ways for each K; one result dict per K."""
    return_freed_memory()
    dev = torch.device(device)
    base, tokenizer = load_model(model_name, dtype=model_dtype(bf16), attn_implementation=attn_implementation)
    policy = add_lora(base, LoraSettings(dropout=0.0)).to(dev).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the published code's second model
    prompts = [record_prompt_ids(tokenizer, r, domain) for r in records]
    results = []
    for k in ks:
        answers = step_answers(tokenizer, records, k)
        batch = tuple(t.to(dev) for t in naive_sequences(prompts, answers, tokenizer.pad_token_id))
        packed = {key: v.to(dev) for key, v in pack_answers(prompts, answers, tokenizer.pad_token_id).items()}

        def run_naive(batch=batch, k=k):
            policy.zero_grad(set_to_none=True)
            return naive_step(policy, reference, batch, k + 1)

        def run_shared(packed=packed):
            policy.zero_grad(set_to_none=True)
            return shared_step(policy, packed)

        print(f"[benchmark] K={k}: {len(records)} records, naive batch {tuple(batch[0].shape)}, packed {tuple(packed['input_ids'].shape)}", flush=True)
        naive_s, naive_mb, naive_lp = _timed(run_naive, dev, repeats)
        shared_s, shared_mb, shared_lp = _timed(run_shared, dev, repeats)
        policy.zero_grad(set_to_none=True)
        results.append({
            "attention": attn_implementation,
            "negatives": k,
            "records": len(records),
            "naive_seconds": round(naive_s, 4),
            "shared_seconds": round(shared_s, 4),
            "speedup": round(naive_s / shared_s, 2),
            "naive_tokens": int(batch[0].numel()),
            "shared_tokens": int(packed["input_ids"].numel()),
            "max_abs_logp_diff": float((naive_lp - shared_lp).abs().max()),
            "naive_peak_mb": round(naive_mb, 1),
            "shared_peak_mb": round(shared_mb, 1),
        })
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    keys = ["attention", "records", "negatives", "naive_seconds", "shared_seconds", "speedup", "naive_tokens", "shared_tokens",
            "max_abs_logp_diff", "naive_peak_mb", "shared_peak_mb"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in results:
        lines.append("| " + " | ".join(f"{row[k]:.2e}" if k == "max_abs_logp_diff" else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def save_results(path: str | Path, model: str, device: str, results: list[dict[str, Any]], repeats: int, bf16: bool = False) -> None:
    from sdpo.io import write_json

    write_json(path, {"model": model, "device": device, "precision": "bf16" if bf16 else "fp32", "cpu": cpu_name(),
                      "repeats": repeats, "torch_threads": torch.get_num_threads(), "results": results})
