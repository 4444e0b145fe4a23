"""Supervised fine-tuning (LoRA): teach the LM to answer a record's prompt with its target.

The loss is the mean negative log-likelihood of the answer tokens (title + EOS), computed
with the shared scoring kernel (`answer_logprobs`), so the prompt and answer are tokenized
exactly as in evaluation. Built on transformers.Trainer: gradient accumulation, report_to,
multi-GPU launch via accelerate and checkpoint resume behave as usual. Precision is
sdpo's (`sdpo.lm.precision`): ``--bf16`` stores the frozen base in bf16 and trains fp32 LoRA
weights under bf16 autocast; it is on by default where the hardware computes bf16 natively.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from sdpo.data.datasets import data_fingerprint, load_split, resolve_domain
from sdpo.data.prompts import encode_answer
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.lm.adapters import WEIGHT_DTYPES, store_adapter_weights
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import model_dtype, resolve_bf16
from sdpo.lm.quiet import quiet_peft
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.lm.soft_tokens import set_injection_layer, set_unknown_rate
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
from sdpo.training.logs import JsonlLogger
from sdpo.training.runs import CONFIG_FILE, resume_point, start_run, write_run_config
from sdpo.training.trunk_states import lora_depth

__all__ = ["CONFIG_FILE", "ModelArguments", "SFTConfig", "run_sft"]


@dataclass
class ModelArguments:
    """Options shared by the training stages: what to train, on which data, with which LoRA."""

    model: str = field(default="smollm2-135m", metadata={"help": "alias (smollm2-135m, tiny), local HF folder or cached hub id"})
    data: str = field(default="", metadata={"help": "prepared dataset folder (sdpo data prepare)"})
    data_sha256: str | None = field(default=None, metadata={
        "help": "fingerprint of the prepared data (manifest and splits); recorded from --data (a different one is refused)"})
    domain: str | None = field(default=None, metadata={"help": "prompt domain (music, movies, books, games); default: the dataset manifest's"})
    train_limit: int | None = field(default=None, metadata={"help": "train on N records drawn at random with subset_seed (default: all)"})
    eval_limit: int | None = field(default=200, metadata={"help": "validation records (drawn with subset_seed) used when evaluating during training"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the random draws of train_limit / eval_limit records"})
    prompt_seed: int = field(default=0, metadata={"help": "seed that fixes each record's prompt phrasing"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names or all-linear"})
    lora_layers: int | None = field(default=None, metadata={"help": "put LoRA on the last N decoder layers only (default: all); backward then stops there"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa, eager, or flex_attention (CUDA only for training: a FlexAttention block mask; flash kernels cannot take block masks)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: the frozen base in 4-bit NF4 (CUDA + bitsandbytes, pip install 'sdpo[gpu]')"})
    collaborative: str = field(default="", metadata={
        "help": "a trained sdpo baseline (sasrec, gru4rec, caser) whose item vectors and user state the prompts carry as soft tokens"})
    collaborative_sha256: str | None = field(default=None, metadata={
        "help": "SHA-256 of the collaborative model's weights; recorded from --collaborative (a different one is refused)"})
    collaborative_place: str | None = field(default="before", metadata={"help": "each item's soft token goes before or after its title"})
    collaborative_score: bool = field(default=False, metadata={
        "help": "each item's soft token also reads the collaborative model's score of the item"})
    collaborative_unknown_rate: float = field(default=0.0, metadata={
        "help": "in training, the share of known titles that read the learned unknown vector instead of their own, so that "
                "vector learns what a title the collaborative model never saw should read (0: it never trains)"})
    collaborative_inject: str | None = field(default="input", metadata={
        "help": "where the soft tokens enter: input (replacing token embeddings) or lora (the first layer with LoRA; the layers "
                "below then read text and are shared by every stage: give --lora_layers N)"})
    collaborative_layer: int | None = field(default=None, metadata={"help": "the layer the soft tokens enter; recorded from --collaborative_inject"})
    collaborative_folds: bool | None = field(default=False, metadata={
        "help": "out-of-fold signals: each training window reads the fold model that never saw its user (sdpo baseline --folds K); "
                "val, test and recommend read the model trained on all training users"})
    collaborative_folds_sha256: list[str] | None = field(default=None, metadata={
        "help": "the fold models' fingerprints; recorded from --collaborative (others are refused)"})
    train_projector: bool = field(default=True, metadata={"help": "train the projectors of the collaborative tokens (else keep them as they are)"})
    projector_learning_rate: float | None = field(default=None, metadata={"help": "the projectors' learning rate (default: the learning rate)"})
    adapter_dtype: str = field(default="fp32", metadata={
        "help": "the finished adapter's weights on disk: fp32, or bf16 (half the bytes, e.g. for a study's stages that git "
                "carries; every later reader, an align run from it included, loads the stored bf16 values)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output_dir"})

    def check_model_arguments(self) -> None:
        """ValueError for option values no run can use (the CLI turns it into one error line)."""
        for name in ("train_limit", "eval_limit", "lora_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 (or left out for all), got {value}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError(f"--lora_r must be at least 1 and --lora_alpha above 0, got {self.lora_r} and {self.lora_alpha}")
        # (an align run leaves them unset, None, to take its SFT run's)
        if not self.collaborative and (self.collaborative_place not in (None, "before") or self.collaborative_score):
            raise ValueError("--collaborative_place and --collaborative_score shape collaborative tokens: give --collaborative DIR too")
        if not 0 <= self.collaborative_unknown_rate < 1:
            raise ValueError(f"--collaborative_unknown_rate must be in [0, 1), got {self.collaborative_unknown_rate}")
        if self.collaborative_unknown_rate and not self.collaborative and not getattr(self, "sft", ""):  # align: inherited later
            raise ValueError("--collaborative_unknown_rate trains the unknown vector of collaborative tokens: give --collaborative DIR too")
        if self.collaborative_inject not in (None, "input", "lora"):
            raise ValueError(f"--collaborative_inject must be input or lora, got {self.collaborative_inject!r}")
        if self.collaborative_inject == "lora" and not getattr(self, "sft", "") and not (self.collaborative and self.lora_layers):
            raise ValueError("--collaborative_inject lora puts the soft tokens into the first layer with LoRA: give --collaborative DIR "
                             "and --lora_layers N (LoRA on the last N layers)")
        if self.collaborative_folds and not self.collaborative and not getattr(self, "sft", ""):
            raise ValueError("--collaborative_folds reads the fold models of a collaborative model: give --collaborative DIR too")
        if self.projector_learning_rate is not None and self.projector_learning_rate <= 0:
            raise ValueError(f"--projector_learning_rate must be above 0, got {self.projector_learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.adapter_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"--adapter_dtype {self.adapter_dtype!r}: choose {' or '.join(WEIGHT_DTYPES)}")

    def lora_settings(self) -> LoraSettings:
        targets = self.lora_target_modules
        modules = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=modules, last_layers=self.lora_layers)


@dataclass
class SFTConfig(ModelArguments, TrainingArguments):
    """SFT options: ModelArguments plus every transformers.TrainingArguments option."""

    output_dir: str = "runs/sft"
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    max_grad_norm: float = 0.3
    logging_steps: float = 10
    save_steps: float = 100
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 base weights and matmuls, fp32 LoRA/optimizer/losses; default: on where the hardware computes bf16 natively; --no_bf16 for fp32"})

    def __post_init__(self):
        self.check_model_arguments()
        on_cpu = self.use_cpu or not torch.cuda.is_available()
        self.bf16 = resolve_bf16(self.bf16, "cpu" if on_cpu else "cuda")
        if on_cpu and self.attn_implementation == "flex_attention":
            raise ValueError("--attn_implementation flex_attention trains on CUDA only (torch has no FlexAttention backward on "
                             "the CPU); leave it out for sdpa")
        if on_cpu:
            # Said outright: the Trainer refuses bf16 without a GPU otherwise, and accelerate runs
            # several CPU processes (torchrun, gloo) as one job only when told they are on the CPU.
            self.use_cpu = True
            self.dataloader_pin_memory = False  # nothing to pin memory for
        super().__post_init__()


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Records as (prompt ids, [answer ids, ...]); SFT uses the target as the one answer. `prompts`: text or collaborative."""

    def __init__(self, records: list[Record], tokenizer, prompts):
        self.records, self.tokenizer, self.prompts = records, tokenizer, prompts

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "record": record,
            "prompt_ids": self.prompts.ids(record),
            "answer_ids": [encode_answer(self.tokenizer, record.target)],
        }


class PackingCollator:
    """Packs examples into the scoring kernel's block rows.

    ``labels`` / ``shift_labels`` (the predicted answer tokens, flat) are there for the Trainer to
    count: it sums the answer tokens of every micro-batch of an optimizer step, over every
    process, and passes that count to `SFTTrainer.compute_loss` as ``num_items_in_batch``.
    With collaborative prompts, the batch also holds the inputs of their soft tokens.
    """

    def __init__(self, pad_token_id: int, prompts):
        self.pad_token_id, self.prompts = pad_token_id, prompts

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompt_ids = [e["prompt_ids"] for e in examples]
        packed = pack_answers(prompt_ids, [e["answer_ids"] for e in examples], self.pad_token_id)
        packed.update(self.prompts.soft_inputs([e["record"] for e in examples], prompt_ids))
        packed["labels"] = packed["shift_labels"] = packed["token_target"]
        return packed


class SFTTrainer(ProjectorLearningRate, Trainer):
    """Trainer whose loss is the NLL of the packed answer tokens, averaged over every token of the optimizer step.

    So gradient accumulation and several processes (each with its share of the step) train
    exactly as one process with the whole batch would.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # our loss divides by the step's token count itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, n_tokens = answer_logprobs(model, inputs)
        if num_items_in_batch is None:  # evaluation: this batch's token mean
            loss = -logps.sum() / n_tokens.sum()
        else:  # DDP averages the processes' gradients, hence the factor
            loss = -logps.sum() / num_items_in_batch * self.accelerator.num_processes
        return (loss, {"logps": logps}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def save_adapter(trainer: Trainer, config: SFTConfig) -> None:
    """The finished run's adapter and trainer state in its output folder, the weights in ``adapter_dtype``."""
    trainer.save_model(config.output_dir)
    trainer.save_state()
    if config.adapter_dtype != "fp32" and trainer.args.should_save:  # where save_model wrote
        store_adapter_weights(config.output_dir, config.adapter_dtype)
    trainer.accelerator.wait_for_everyone()


def record_data_fingerprint(config: ModelArguments) -> None:
    """Record the prepared data's fingerprint in the run's options; a user error where one was given and the data differ."""
    actual = data_fingerprint(config.data)
    if config.data_sha256 not in (None, "", actual):
        raise UserError(f"--data_sha256: the prepared data in {config.data} is not the data given (fingerprint {actual[:12]}..., "
                        f"not {config.data_sha256[:12]}...): it was prepared again, by other code or from another source. "
                        "Train on the data it names, or leave --data_sha256 out.")
    config.data_sha256 = actual


def run_sft(config: SFTConfig) -> Path:
    """Train a LoRA adapter with SFT; returns the output folder (adapter, tokenizer, config, log.jsonl)."""
    if not config.data:
        raise UserError("sft: no dataset given. Pass --data DIR (a folder made by sdpo data prepare).")
    config.domain = resolve_domain(config.data, config.domain)
    record_data_fingerprint(config)
    resume_from = resume_point(config)
    train = load_split(config.data, "train", config.train_limit, config.subset_seed)
    source = load_collaborative(config)
    record_collaborative(config, source)
    check_catalogue(source, train)
    set_seed(config.seed)  # before LoRA's random init, which Trainer's own seeding comes too late for
    model, tokenizer = load_model(config.model, attn_implementation=config.attn_implementation, dtype=model_dtype(config.bf16),
                                  load_in_4bit=config.load_in_4bit, soft_tokens=soft_token_spec(config, source))
    model = add_lora(model, config.lora_settings())
    if source is not None:  # the layer the soft tokens enter: the input, or the first layer with LoRA
        config.collaborative_layer = lora_depth(model) if config.collaborative_inject == "lora" else 0
        set_injection_layer(model, config.collaborative_layer)
    set_unknown_rate(model, config.collaborative_unknown_rate)
    if not config.train_projector:
        freeze_projectors(model)
    prompts = run_prompts(tokenizer, config.domain, config.prompt_seed, config, cross_fitted(config, source, train))
    eval_dataset = None
    if config.eval_strategy != "no":
        val = load_split(config.data, "val", config.eval_limit, config.subset_seed)
        eval_dataset = PromptAnswerDataset(val, tokenizer, prompts)
    out = Path(config.output_dir)
    start_run(config, resume_from)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=PromptAnswerDataset(train, tokenizer, prompts),
        eval_dataset=eval_dataset,
        data_collator=PackingCollator(tokenizer.pad_token_id, prompts),
        processing_class=tokenizer,
        callbacks=[JsonlLogger()],
    )
    with quiet_peft():  # checkpoints are saved inside
        trainer.train(resume_from_checkpoint=resume_from)
    with quiet_peft():
        save_adapter(trainer, config)
    report_unknown(source, train, out)
    write_run_config(config, out)
    return out
