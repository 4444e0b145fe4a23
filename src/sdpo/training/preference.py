"""Preference training from the SFT model: S-DPO (K negatives, softmax) or DPO.

The policy starts as the SFT adapter (trainable); the reference is the same SFT model,
frozen, represented by its log-probs of every candidate computed once before training
(`sdpo.training.reference`), or, with ``--reference adapter``, by a frozen second copy of
the SFT adapter inside the same PeftModel, run without gradients at each step (for
per-epoch resampling at scale). Never the base model with the adapter disabled: that is
not the SFT model. Each step scores the positive and the K negatives of every
record with ONE `answer_logprobs` call (prompt encoded once, answers packed behind it).

Logged with TRL's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (the positive beats every negative), logps/chosen, logps/rejected; and the
two terms of the loss apart: loss/preference and loss/sft (the positive's per-token NLL, logged
whatever --sft_weight is; the loss adds it times --sft_weight);
to tensorboard when ``report_to`` asks and always to ``log.jsonl`` in the run folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer, set_seed

from sdpo.data.datasets import load_split, resolve_domain
from sdpo.data.negatives import check_k
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.metrics import target_ranks
from sdpo.evaluation.protocols import candidate_logps
from sdpo.lm.adapters import adapter_sha256
from sdpo.lm.decoder import causal_lm_parts
from sdpo.lm.head import head_precision_key
from sdpo.lm.models import load_model
from sdpo.lm.precision import model_dtype
from sdpo.lm.quiet import quiet_peft
from sdpo.lm.scoring import answer_logprobs
from sdpo.lm.soft_tokens import set_unknown_rate
from sdpo.lm.trunk import trunk_fingerprint
from sdpo.training.align_config import LOSSES, AlignConfig, inherit_from_sft, read_sft_run
from sdpo.training.collaborative import (
    ProjectorLearningRate,
    check_catalogue,
    cross_fitted,
    freeze_projectors,
    load_collaborative,
    record_collaborative,
    report_unknown,
    run_prompts,
    soft_token_spec,
)
from sdpo.training.logs import LOG_FILE, JsonlLogger
from sdpo.training.losses import align_losses
from sdpo.training.preference_data import EpochSetter, PreferenceCollator, PreferenceDataset
from sdpo.training.reference import (
    cached_reference_logps,
    cached_tensors,
    compute_reference_logps,
    fingerprint,
    journal_path,
    reference_journal,
)
from sdpo.training.runs import resume_point, start_run, write_run_config
from sdpo.training.sft import record_data_fingerprint, save_adapter
from sdpo.training.trunk_states import RecordTrunk, lora_depth

REFERENCE_ADAPTER = "reference"
REFERENCE_CACHE = "reference-cache"  # inside the SFT run folder, shared by the align runs that start from it

__all__ = ["LOG_FILE", "LOSSES", "AlignConfig", "run_align"]


@torch.no_grad()
def frozen_adapter_logps(model, packed: dict[str, torch.Tensor], train_projector: bool = True, trunk=None) -> torch.Tensor:
    """[B, A] log-probs of the packed answers under the frozen reference adapter (and its own projectors' copy).

    Run in eval mode (no LoRA dropout), as the precomputed table is: the reference is one
    fixed function, whatever mode the policy is in. The policy's mode and adapter are restored,
    and its projectors stay frozen without `train_projector` (PEFT unfreezes an active adapter's copy).
    """
    was_training = model.training
    model.set_adapter(REFERENCE_ADAPTER)
    model.eval()
    try:
        logps, _ = answer_logprobs(model, packed, trunk)
    finally:
        model.set_adapter("default")  # PEFT makes the active adapter the trainable one
        if not train_projector:
            freeze_projectors(model)
        model.train(was_training)
    return logps


class PreferenceTrainer(ProjectorLearningRate, Trainer):
    """Trainer with the S-DPO / DPO loss on packed answers and TRL-style reward metrics."""

    def __init__(self, *args, align: AlignConfig, hr_records: list[Record], prompts, trunks=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.align, self.hr_records, self.prompts = align, hr_records, prompts
        self.trunks = trunks or {}  # "train" / "eval": a RecordTrunk of that dataset's records (--share_trunk)
        self._stored = {"train": defaultdict(list), "eval": defaultdict(list)}

    def reference_logps(self, model, inputs) -> torch.Tensor:
        """[B, 1+K] reference log-probs: precomputed, or from the frozen SFT adapter copy."""
        if "reference_logps" in inputs:
            return inputs["reference_logps"]
        return frozen_adapter_logps(model, inputs, self.align.train_projector, self._trunk(model))

    def _trunk(self, model):
        return self.trunks.get("train" if model.training else "eval")

    def preference_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, float]]:
        reference = self.reference_logps(model, inputs)
        logps, n_tokens = answer_logprobs(model, inputs, self._trunk(model))  # [B, 1+K]
        losses, metrics = align_losses(logps, n_tokens, reference.to(logps.dtype), self.align)
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
        scores = candidate_logps(self.model, self.processing_class, self.hr_records, self.align.domain,
                                 self.args.per_device_eval_batch_size, self.align.prompt_seed, progress=False, prompts=self.prompts)
        ranks = target_ranks(self.hr_records, scores)
        self._stored["eval"]["hr@1"].append(sum(r == 1 for r in ranks) / len(ranks))
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "" if split == "train" else "eval_"
        if self._stored[split]:  # every process logs at the same steps with the same keys: the mean over all of them
            keys = sorted(self._stored[split])
            means = torch.tensor([sum(self._stored[split][k]) / len(self._stored[split][k]) for k in keys], device=self.args.device)
            for key, value in zip(keys, self.accelerator.reduce(means, "mean").tolist(), strict=True):
                logs[prefix + key] = value
        self._stored[split].clear()
        super().log(logs, start_time)


def reference_key(model, records, config: AlignConfig) -> str:
    """The fingerprint of what the SFT model's scores of `records` depend on (`sdpo.training.reference.fingerprint`)."""
    collaborative = {key: getattr(config, key) for key in ("collaborative_sha256", "collaborative_place", "collaborative_score")}
    if config.collaborative_layer:  # late injection: other prompts' states (the key of a run at the input stays as it was)
        collaborative["collaborative_layer"] = config.collaborative_layer
    if config.collaborative_folds:  # the training records read the fold models: another table (the key of a run without stays as it was)
        collaborative["collaborative_folds_sha256"] = config.collaborative_folds_sha256
    precision = head_precision_key(causal_lm_parts(model)[1], model_dtype(config.bf16))
    return fingerprint(records, config.model, config.sft, config.domain, config.prompt_seed, precision, collaborative if config.collaborative else None)


def reference_table(model, tokenizer, records, config: AlignConfig, name: str, prompts=None) -> torch.Tensor:
    """[N, C] reference log-probs of `records`, from the shared cache in the SFT run folder when another run made them."""
    key = reference_key(model, records, config)
    paths = [Path(config.sft) / REFERENCE_CACHE / f"{key}.safetensors", Path(config.output_dir) / f"reference-{name}.safetensors"]
    # Under accelerate/torchrun the main process computes and saves the table while the others
    # wait; they then read it from the cache: one pass over the data, one writer.
    batch_size = config.per_device_eval_batch_size

    def compute() -> torch.Tensor:  # a killed pass resumes from the batches its journal holds
        journal = reference_journal(paths, key, {"batch_size": batch_size})
        return compute_reference_logps(model, tokenizer, records, config.domain, config.prompt_seed, batch_size, prompts, journal)

    with PartialState().main_process_first():
        table = cached_reference_logps(paths, key, compute)
        if PartialState().is_main_process:
            for path in paths:  # the table is saved: its journal has served
                journal_path(path, key).unlink(missing_ok=True)
        return table


def shared_trunks(model, tokenizer, prompts, config: AlignConfig, source, train_dataset, eval_dataset) -> dict:
    """The records' states below the first LoRA layer (`RecordTrunk`), for the train and eval datasets."""
    depth = lora_depth(model)
    if not depth:
        raise UserError(f"--share_trunk shares the layers below the first LoRA layer; {config.sft} has LoRA on layer 0. "
                        "Train the SFT run with --lora_layers N.")
    if source is not None and config.train_projector and (config.collaborative_layer or 0) < depth:
        raise UserError("--share_trunk: collaborative tokens enter at layer 0 through the projectors; freeze them "
                        "(--no_train_projector), train the SFT run with --collaborative_inject lora, or leave --share_trunk out.")
    if source is not None and 0 < (config.collaborative_layer or 0) < depth:
        raise UserError(f"--share_trunk: the soft tokens enter layer {config.collaborative_layer}, below the first LoRA layer {depth}.")
    print(f"[align] layers 0-{depth - 1} are computed once per record (shared trunk)")
    datasets = {"train": train_dataset, "eval": eval_dataset}
    trunks = {split: record_trunk(model, tokenizer, dataset.records, prompts, config, depth, split)
              for split, dataset in datasets.items() if dataset is not None}
    model.train()
    return trunks


def record_trunk(model, tokenizer, records, prompts, config: AlignConfig, depth: int, name: str) -> RecordTrunk:
    """`RecordTrunk.compute` of `records`, kept beside the reference tables in the SFT run folder for the next align run from it.

    The key: the reference table's fingerprint (records, prompts, the SFT adapter with any projectors that feed
    layer 0, collaborative settings, precision), the trunk layers' own fingerprint (their weights as loaded, 4-bit
    included, attention implementation, device, threads, library versions: `sdpo.lm.trunk.trunk_fingerprint`),
    and the batch size the states are computed in.
    """
    decoder, _ = causal_lm_parts(model)
    key = hashlib.sha256(json.dumps([reference_key(model, records, config), trunk_fingerprint(model, decoder, depth),
                                     config.per_device_eval_batch_size]).encode()).hexdigest()
    paths = [Path(config.sft) / REFERENCE_CACHE / f"trunk-{key}.safetensors", Path(config.output_dir) / f"trunk-{name}.safetensors"]
    with PartialState().main_process_first():
        tensors = cached_tensors(paths, key, lambda: RecordTrunk.compute(
            model, tokenizer, records, prompts, depth, config.per_device_eval_batch_size).to_tensors())
    return RecordTrunk.from_tensors(tensors)


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
    record_data_fingerprint(config)
    resume_from = resume_point(config)
    train = load_split(config.data, "train", config.train_limit, config.subset_seed)
    try:
        check_k(train, config.negatives)
    except ValueError as exc:
        raise UserError(f"--negatives: {exc}.") from None
    source = load_collaborative(config)  # as the SFT run recorded it (an exported one carries its model inside)
    record_collaborative(config, source)
    check_catalogue(source, train)
    set_seed(config.seed)
    model, tokenizer = load_model(config.model, config.sft, attn_implementation=config.attn_implementation, trainable_adapter=True,
                                  dtype=model_dtype(config.bf16), load_in_4bit=config.load_in_4bit, soft_tokens=soft_token_spec(config, source))
    if not config.load_in_4bit:  # on the training device already (the Trainer would move it later): the reference table and trunk run there
        model.to(config.device)
    set_unknown_rate(model, config.collaborative_unknown_rate)
    if not config.train_projector:
        freeze_projectors(model)
    prompts = run_prompts(tokenizer, config.domain, config.prompt_seed, config, cross_fitted(config, source, train))
    out = Path(config.output_dir)
    start_run(config, resume_from)

    def reference_for(records: list[Record], name: str) -> torch.Tensor | None:
        if config.reference == "adapter":
            return None
        # The policy starts equal to the SFT model, so its scores now are the frozen reference's.
        return reference_table(model, tokenizer, records, config, name, prompts)

    train_dataset = PreferenceDataset(train, reference_for(train, "train"), tokenizer, config, prompts)
    eval_dataset, hr_records = None, []
    if config.eval_strategy != "no":
        val = load_split(config.data, "val", config.eval_limit, config.subset_seed)
        eval_dataset = PreferenceDataset(val, reference_for(val, "val"), tokenizer, config, prompts)
        hr_records = load_split(config.data, "val", config.hr_limit, config.subset_seed)
    trunks = shared_trunks(model, tokenizer, prompts, config, source, train_dataset, eval_dataset) if config.share_trunk else None
    if config.reference == "adapter":
        model.load_adapter(config.sft, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter("default")
        if not config.train_projector:
            freeze_projectors(model)
    model.train()
    trainer = PreferenceTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, prompts),
        processing_class=tokenizer,
        callbacks=[EpochSetter(train_dataset), JsonlLogger()],
        align=config,
        hr_records=hr_records,
        prompts=prompts,
        trunks=trunks,
    )
    with quiet_peft():  # checkpoints are saved inside
        trainer.train(resume_from_checkpoint=resume_from)
    if config.reference == "adapter":
        trainer.model.delete_adapter(REFERENCE_ADAPTER)  # the saved run holds the policy only
    with quiet_peft():
        save_adapter(trainer, config)
    report_unknown(source, train, out)
    write_run_config(config, out)
    return out
