"""Preference training from the SFT model: S-DPO (K negatives, softmax) or DPO.

The policy starts as the SFT adapter (trainable); the reference is the same SFT model,
frozen, represented by its log-probs of every candidate computed once before training
(`sdpo.training.reference`), or, with ``--reference adapter``, by a frozen second copy of
the SFT adapter inside the same PeftModel, run without gradients at each step (for
per-epoch resampling at scale). Never the base model with the adapter disabled: that is
not the SFT model. Each step scores the positive and the K negatives of every
record with ONE `answer_logprobs` call (prompt encoded once, answers packed behind it).

Logged with TRL's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (the positive beats every negative), logps/chosen, logps/rejected;
to tensorboard when ``report_to`` asks and always to ``log.jsonl`` in the run folder.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer, set_seed

from sdpo.data.datasets import load_split, resolve_domain
from sdpo.data.negatives import STRATEGIES, check_k
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.metrics import target_ranks
from sdpo.evaluation.protocols import candidate_logps
from sdpo.lm.adapters import adapter_sha256, check_adapter_folder
from sdpo.lm.models import load_model
from sdpo.lm.precision import model_dtype
from sdpo.lm.scoring import answer_logprobs
from sdpo.training.logs import LOG_FILE, JsonlLogger
from sdpo.training.losses import dpo_loss, softmax_dpo_loss
from sdpo.training.preference_data import EpochSetter, PreferenceCollator, PreferenceDataset
from sdpo.training.reference import cached_reference_logps, compute_reference_logps, fingerprint
from sdpo.training.runs import read_run_config, resume_point, start_run, write_run_config
from sdpo.training.sft import SFTConfig

LOSSES = ("sdpo", "dpo")
REFERENCE_ADAPTER = "reference"
REFERENCE_CACHE = "reference-cache"  # inside the SFT run folder, shared by the align runs that start from it
# Settings an align run takes from its SFT run unless given, and may not contradict.
INHERITED = ("model", "data", "domain", "prompt_seed", "subset_seed")

__all__ = ["LOG_FILE", "AlignConfig", "run_align"]


@dataclass
class AlignConfig(SFTConfig):
    """Preference-stage options: SFTConfig's plus the S-DPO ones.

    The LoRA shape (r, alpha, dropout, modules) is the SFT adapter's; the lora_* options
    here are not used.
    """

    sft: str = field(default="", metadata={"help": "SFT run folder (adapter + sdpo_config.yaml) to start from"})
    sft_sha256: str | None = field(default=None, metadata={
        "help": "SHA-256 of the SFT adapter's weights; recorded from --sft (a different one is refused)"})
    model: str | None = field(default=None, metadata={"help": "base model; default: the SFT run's (a different one is refused)"})
    prompt_seed: int | None = field(default=None, metadata={"help": "prompt phrasing seed; default: the SFT run's (a different one is refused)"})
    subset_seed: int | None = field(default=None, metadata={
        "help": "seed of the train_limit / eval_limit draws; default: the SFT run's, so a smaller train_limit takes records the SFT run trained on"})
    loss: str = field(default="sdpo", metadata={"help": "sdpo (softmax over K negatives) or dpo (pairwise, averaged over K)"})
    negatives: int = field(default=3, metadata={"help": "K, negatives per record (1..19)"})
    negative_sampling: str = field(default="random", metadata={"help": "random (drawn once), resample (each epoch) or hard"})
    beta: float = field(default=1.0, metadata={"help": "reward temperature"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of an extra NLL term on the positive (0 = off)"})
    reference: str = field(default="precomputed", metadata={
        "help": "precomputed (scores cached once) or adapter (a frozen copy of the SFT adapter, run each step)"})
    select_by: str = field(default="loss", metadata={"help": "keep the best checkpoint by validation loss or hr@1"})
    hr_limit: int = field(default=100, metadata={"help": "validation records ranked for eval hr@1"})
    output_dir: str = "runs/align"
    learning_rate: float = 1e-5

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"--beta must be above 0, got {self.beta}")
        if self.negatives < 1:
            raise ValueError(f"--negatives must be at least 1, got {self.negatives}")
        if self.hr_limit < 1:
            raise ValueError(f"--hr_limit must be at least 1, got {self.hr_limit}")
        if self.sft_weight < 0:
            raise ValueError(f"--sft_weight must be 0 or more, got {self.sft_weight}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.negative_sampling not in STRATEGIES:
            raise ValueError(f"--negative_sampling must be one of {', '.join(STRATEGIES)}, got {self.negative_sampling!r}")
        if self.reference not in ("precomputed", "adapter"):
            raise ValueError(f"--reference must be precomputed or adapter, got {self.reference!r}")
        if self.reference == "adapter" and self.negative_sampling == "hard":
            raise ValueError("--negative_sampling hard picks negatives by reference scores: use --reference precomputed")
        if self.select_by not in ("loss", "hr@1"):
            raise ValueError(f"--select_by must be loss or hr@1, got {self.select_by!r}")
        if self.eval_strategy != "no":  # validate as we go and keep the best checkpoint
            self.load_best_model_at_end = True
            self.metric_for_best_model = "loss" if self.select_by == "loss" else "hr@1"
            self.greater_is_better = self.select_by == "hr@1"
        super().__post_init__()


@torch.no_grad()
def frozen_adapter_logps(model, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, A] log-probs of the packed answers under the frozen reference adapter.

    Run in eval mode (no LoRA dropout), as the precomputed table is: the reference is one
    fixed function, whatever mode the policy is in. The policy's mode and adapter are restored.
    """
    was_training = model.training
    model.set_adapter(REFERENCE_ADAPTER)
    model.eval()
    try:
        logps, _ = answer_logprobs(model, packed)
    finally:
        model.set_adapter("default")  # PEFT makes the active adapter the trainable one
        model.train(was_training)
    return logps


class PreferenceTrainer(Trainer):
    """Trainer with the S-DPO / DPO loss on packed answers and TRL-style reward metrics."""

    def __init__(self, *args, align: AlignConfig, hr_records: list[Record], domain: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.align, self.hr_records, self.domain = align, hr_records, domain
        self._stored = {"train": defaultdict(list), "eval": defaultdict(list)}

    def reference_logps(self, model, inputs) -> torch.Tensor:
        """[B, 1+K] reference log-probs: precomputed, or from the frozen SFT adapter copy."""
        if "reference_logps" in inputs:
            return inputs["reference_logps"]
        return frozen_adapter_logps(model, inputs)

    def preference_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, float]]:
        reference = self.reference_logps(model, inputs)
        logps, n_tokens = answer_logprobs(model, inputs)  # [B, 1+K]
        reference = reference.to(logps.dtype)
        chosen, rejected = logps[:, 0], logps[:, 1:]
        ref_chosen, ref_rejected = reference[:, 0], reference[:, 1:]
        beta = self.align.beta
        if self.align.loss == "sdpo":
            losses = softmax_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        else:
            k = rejected.shape[1]
            losses = dpo_loss(chosen[:, None].expand(-1, k), rejected, ref_chosen[:, None].expand(-1, k), ref_rejected, beta).mean(-1)
        if self.align.sft_weight:
            losses = losses + self.align.sft_weight * (-chosen / n_tokens[:, 0])
        chosen_rewards = (beta * (chosen - ref_chosen)).detach()  # [B]
        rejected_rewards = (beta * (rejected - ref_rejected)).detach()  # [B, K]
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards.mean(-1)).mean().item(),
            "rewards/accuracies": (chosen_rewards[:, None] > rejected_rewards).all(-1).float().mean().item(),
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
        }
        return losses.mean(), metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.preference_loss(model, inputs)
        split = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._stored[split][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        scores = candidate_logps(self.model, self.processing_class, self.hr_records, self.domain,
                                 self.args.per_device_eval_batch_size, self.align.prompt_seed, progress=False)
        ranks = target_ranks(self.hr_records, scores)
        self._stored["eval"]["hr@1"].append(sum(r == 1 for r in ranks) / len(ranks))
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        for key, values in self._stored[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._stored[split].clear()
        super().log(logs, start_time)


def read_sft_run(sft_dir: str) -> dict:
    """The resolved config of an SFT run folder (its base model, data, prompts), checked."""
    if not sft_dir:
        raise UserError("align: no SFT run given. Pass --sft DIR (the output folder of sdpo sft).")
    values = read_run_config(sft_dir, "an SFT run folder")
    check_adapter_folder(sft_dir, "adapter of an SFT run")
    return values


def inherit_from_sft(config: AlignConfig, sft_run: dict) -> None:
    """Take the base model, data, prompts and record draws from the SFT run; refuse contradictions."""
    for key in INHERITED:
        mine, theirs = getattr(config, key), sft_run.get(key)
        if mine is None or mine == "":
            setattr(config, key, theirs)
        elif theirs is not None and key != "data" and mine != theirs:
            raise UserError(f"--{key} {mine!r} differs from the SFT run's {theirs!r} ({config.sft}). "
                            f"The policy and its reference must see the same {key}: leave --{key} out.")
    if config.prompt_seed is None:
        config.prompt_seed = 0
    if config.subset_seed is None:
        config.subset_seed = 0


def reference_table(model, tokenizer, records, config: AlignConfig, name: str) -> torch.Tensor:
    """[N, C] reference log-probs of `records`, from the shared cache in the SFT run folder when another run made them."""
    key = fingerprint(records, config.model, config.sft, config.domain, config.prompt_seed, str(model_dtype(config.bf16)))
    paths = [Path(config.sft) / REFERENCE_CACHE / f"{key}.safetensors", Path(config.output_dir) / f"reference-{name}.safetensors"]
    # Under accelerate/torchrun the main process computes and saves the table while the others
    # wait; they then read it from the cache: one pass over the data, one writer.
    with PartialState().main_process_first():
        return cached_reference_logps(
            paths, key, lambda: compute_reference_logps(model, tokenizer, records, config.domain, config.prompt_seed, config.per_device_eval_batch_size)
        )


def run_align(config: AlignConfig) -> Path:
    """Train the SFT model further with S-DPO or DPO; returns the output folder."""
    inherit_from_sft(config, read_sft_run(config.sft))
    actual = adapter_sha256(config.sft)
    if config.sft_sha256 not in (None, "", actual):
        raise UserError(f"--sft_sha256: the adapter in {config.sft} is not the one given (it has changed since); "
                        "leave --sft_sha256 out to start from it as it is now.")
    config.sft_sha256 = actual  # recorded, so a resume or a reuse can tell that the SFT adapter changed
    if not config.data:
        raise UserError("align: no dataset given. Pass --data DIR.")
    config.domain = resolve_domain(config.data, config.domain)
    resume_from = resume_point(config)
    train = load_split(config.data, "train", config.train_limit, config.subset_seed)
    try:
        check_k(train, config.negatives)
    except ValueError as exc:
        raise UserError(f"--negatives: {exc}.") from None
    set_seed(config.seed)
    model, tokenizer = load_model(config.model, config.sft, attn_implementation=config.attn_implementation,
                                  trainable_adapter=True, dtype=model_dtype(config.bf16), load_in_4bit=config.load_in_4bit)
    out = Path(config.output_dir)
    start_run(config, resume_from)

    def reference_for(records: list[Record], name: str) -> torch.Tensor | None:
        if config.reference == "adapter":
            return None
        # The policy starts equal to the SFT model, so its scores now are the frozen reference's.
        return reference_table(model, tokenizer, records, config, name)

    train_dataset = PreferenceDataset(train, reference_for(train, "train"), tokenizer, config, config.domain)
    eval_dataset, hr_records = None, []
    if config.eval_strategy != "no":
        val = load_split(config.data, "val", config.eval_limit, config.subset_seed)
        eval_dataset = PreferenceDataset(val, reference_for(val, "val"), tokenizer, config, config.domain)
        hr_records = load_split(config.data, "val", config.hr_limit, config.subset_seed)
    if config.reference == "adapter":
        model.load_adapter(config.sft, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter("default")
    model.train()
    trainer = PreferenceTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PreferenceCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[EpochSetter(train_dataset), JsonlLogger()],
        align=config,
        hr_records=hr_records,
        domain=config.domain,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    if config.reference == "adapter":
        trainer.model.delete_adapter(REFERENCE_ADAPTER)  # the saved run holds the policy only
    trainer.save_model(config.output_dir)
    trainer.save_state()
    write_run_config(config, out)
    return out
