"""What a preference step reads: each record's prompt, its positive and K negatives, and their reference log-probs.

The negatives come from the align config (``negative_sampling``: random, drawn once and
seeded; resample, drawn again each epoch; hard, the reference's top K). A batch is packed
for the scoring kernel: one row per record, the 1+K answers behind the prompt.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from sdpo.data.negatives import hard_negatives, random_negatives
from sdpo.data.prompts import encode_answer
from sdpo.data.records import Record
from sdpo.lm.scoring import pack_answers


class PreferenceDataset(torch.utils.data.Dataset):
    """Records with their positive + K chosen negatives and the reference log-probs of those. `prompts`: text or collaborative."""

    def __init__(self, records: list[Record], reference: torch.Tensor, tokenizer, config, prompts):
        self.records, self.reference, self.tokenizer, self.config, self.prompts = records, reference, tokenizer, config, prompts
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def negatives_of(self, index: int) -> list[int]:
        record, k, c = self.records[index], self.config.negatives, self.config
        if c.negative_sampling == "hard":
            return hard_negatives(record, k, self.reference[index])
        epoch = self.epoch if c.negative_sampling == "resample" else 0
        return random_negatives(record, k, c.seed, index, epoch)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        chosen = [record.candidates.index(record.target), *self.negatives_of(index)]
        example = {
            "record": record,
            "trunk_record": index,  # where a shared trunk (sdpo.training.trunk_states) finds the record's states
            "trunk_answers": chosen,
            "prompt_ids": self.prompts.ids(record),
            "answer_ids": [encode_answer(self.tokenizer, record.candidates[i]) for i in chosen],
        }
        if self.reference is not None:  # else the reference adapter scores them during the step
            example["reference_logps"] = self.reference[index, chosen]
        return example


class PreferenceCollator:
    """Packs a batch for the scoring kernel, with the reference's log-probs and any soft-token inputs of the prompts."""

    def __init__(self, pad_token_id: int, prompts):
        self.pad_token_id, self.prompts = pad_token_id, prompts

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompt_ids = [e["prompt_ids"] for e in examples]
        packed = pack_answers(prompt_ids, [e["answer_ids"] for e in examples], self.pad_token_id)
        packed.update(self.prompts.soft_inputs([e["record"] for e in examples], prompt_ids))
        width = max(len(e["trunk_answers"]) for e in examples)
        packed["trunk_record"] = torch.tensor([e["trunk_record"] for e in examples])  # [B]
        packed["trunk_answers"] = torch.tensor([e["trunk_answers"] + [-1] * (width - len(e["trunk_answers"])) for e in examples])  # [B, A]
        if "reference_logps" in examples[0]:
            packed["reference_logps"] = torch.stack([e["reference_logps"] for e in examples])  # [B, 1+K]
        return packed


class EpochSetter(TrainerCallback):
    """Tells the dataset the epoch, for per-epoch resampling of negatives."""

    def __init__(self, dataset: PreferenceDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)
