"""Supervised fine-tuning (LoRA): teach the LM to answer a record's prompt with its target.

The loss is the mean negative log-likelihood of the answer tokens (title + EOS), computed
with the shared scoring kernel (`answer_logprobs`), so the prompt and answer are tokenized
exactly as in evaluation. Built on transformers.Trainer: gradient accumulation, mixed
precision, report_to, multi-GPU launch via accelerate and checkpoint resume behave as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from sdpo.config import save_config
from sdpo.datasets import load_split, read_manifest
from sdpo.errors import UserError
from sdpo.io import refuse_non_empty
from sdpo.models import LoraSettings, add_lora, load_model
from sdpo.prompts import encode_answer, record_prompt_ids
from sdpo.records import Record
from sdpo.scoring import answer_logprobs, pack_answers

CONFIG_FILE = "sdpo_config.yaml"


@dataclass
class ModelArguments:
    """Options shared by the training stages: what to train, on which data, with which LoRA."""

    model: str = field(default="smollm2-135m", metadata={"help": "alias (smollm2-135m, tiny), local HF folder or cached hub id"})
    data: str = field(default="", metadata={"help": "prepared dataset folder (sdpo data prepare)"})
    domain: str | None = field(default=None, metadata={"help": "prompt domain; default: the dataset manifest's"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N train records"})
    eval_limit: int | None = field(default=200, metadata={"help": "validation records used when evaluating during training"})
    prompt_seed: int = field(default=0, metadata={"help": "seed that fixes each record's prompt phrasing"})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names or all-linear"})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa or eager (flash kernels cannot take block masks)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output_dir"})

    def lora_settings(self) -> LoraSettings:
        targets = self.lora_target_modules
        modules = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=modules)

    def resolved_domain(self) -> str:
        return self.domain or read_manifest(self.data).get("domain", "music")


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


class PromptAnswerDataset(torch.utils.data.Dataset):
    """Records as (prompt ids, [answer ids, ...]); SFT uses the target as the one answer."""

    def __init__(self, records: list[Record], tokenizer, domain: str, seed: int = 0):
        self.records, self.tokenizer, self.domain, self.seed = records, tokenizer, domain, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "prompt_ids": record_prompt_ids(self.tokenizer, record, self.domain, self.seed),
            "answer_ids": [encode_answer(self.tokenizer, record.target)],
        }


class PackingCollator:
    """Packs examples into the scoring kernel's block rows."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_answers([e["prompt_ids"] for e in examples], [e["answer_ids"] for e in examples], self.pad_token_id)


class SFTTrainer(Trainer):
    """Trainer whose loss is the token-mean NLL of the packed answers."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps, n_tokens = answer_logprobs(model, inputs)
        loss = -logps.sum() / n_tokens.sum()
        return (loss, {"logps": logps}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def check_output_dir(config: ModelArguments) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite a finished or started run."""
    out = Path(config.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if config.resume:
        if last is None:
            raise UserError(f"--resume: no checkpoint-* folder in {out}. Start without --resume.")
        return last
    refuse_non_empty(out, config.overwrite, "--output_dir", " (it has checkpoints: add --resume to continue)" if last else "")
    return None


def run_sft(config: SFTConfig) -> Path:
    """Train a LoRA adapter with SFT; returns the output folder (adapter, tokenizer, config)."""
    if not config.data:
        raise UserError("sft: no dataset given. Pass --data DIR (a folder made by sdpo data prepare).")
    resume_from = check_output_dir(config)
    domain = config.resolved_domain()
    train = load_split(config.data, "train", limit=config.train_limit)
    set_seed(config.seed)  # before LoRA's random init, which Trainer's own seeding comes too late for
    model, tokenizer = load_model(config.model, attn_implementation=config.attn_implementation)
    model = add_lora(model, config.lora_settings())
    eval_dataset = None
    if config.eval_strategy != "no":
        eval_dataset = PromptAnswerDataset(load_split(config.data, "val", limit=config.eval_limit), tokenizer, domain, config.prompt_seed)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=PromptAnswerDataset(train, tokenizer, domain, config.prompt_seed),
        eval_dataset=eval_dataset,
        data_collator=PackingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(config.output_dir)
    trainer.save_state()
    save_config(config, Path(config.output_dir) / CONFIG_FILE)
    return Path(config.output_dir)
