"""Shared trunk in training: the states entering the first adapted layer, computed once per record.

An align run from an SFT adapter with LoRA on the last N layers (``--lora_layers N``), and with
its projectors frozen where the prompts carry collaborative tokens, computes the same hidden
states entering layer D = n_layers - N for a record in every step, every epoch, every align stage
and the reference pass: nothing below D trains. `RecordTrunk` computes, once and without
gradients, each record's states over one packed row (its prompt, then every candidate behind
it); a training step then assembles its rows (the prompt and its 1+K chosen answers) from them
and runs only layers D.. and the LM head. Each assembled token has the states it would have had
in the step's own row: under the block mask a prompt token sees only the prompt and an answer
token only the prompt and its own answer, at the same positions.

The states are kept in memory for the run (2 bytes per token and hidden unit in bf16, 4 in fp32:
about 0.4 MB per LastFM record on SmolLM2-135M in bf16).
"""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from sdpo.data.prompts import encode_answer
from sdpo.data.records import Record
from sdpo.lm.decoder import causal_lm_parts, final_hidden_states, only_layers, states_entering
from sdpo.lm.precision import compute_context
from sdpo.lm.scoring import attention_mask_for, pack_answers
from sdpo.lm.soft_tokens import embed_with_soft_tokens, injection_layer, packed_soft_tokens


def lora_depth(model) -> int | None:
    """The first decoder layer with LoRA weights; None when LoRA is on no numbered layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdpo.lm.adapters import LAYER_INDEX

    found = [int(m.group(1)) for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer) and (m := LAYER_INDEX.search(f".{name}.")) is not None]
    return min(found) if found else None


class RecordTrunk:
    """Per record: the states [L, H] entering layer `depth` over its prompt and all its candidates, and where each lies."""

    def __init__(self, depth: int, states: list[torch.Tensor], prompt_lengths: list[int], spans: list[list[tuple[int, int]]]):
        self.depth, self.states, self.prompt_lengths, self.spans = depth, states, prompt_lengths, spans

    @classmethod
    @torch.no_grad()
    def compute(cls, model, tokenizer, records: list[Record], prompts, depth: int, batch_size: int = 8,
                progress: bool = True) -> RecordTrunk:
        """Run every record once (prompt + all candidates, one packed row) and keep what enters layer `depth`."""
        decoder, lm_head = causal_lm_parts(model)
        was_training = model.training
        model.eval()
        states, prompt_lengths, spans = [], [], []
        try:
            for start in tqdm(range(0, len(records), batch_size), desc="shared trunk", disable=not progress):
                batch = records[start : start + batch_size]
                ids = [prompts.ids(r) for r in batch]
                answers = [[encode_answer(tokenizer, c) for c in r.candidates] for r in batch]
                packed = {**pack_answers(ids, answers, tokenizer.pad_token_id), **prompts.soft_inputs(batch, ids)}
                device = lm_head.weight.device
                packed = {k: v.to(device) for k, v in packed.items()}
                with states_entering(decoder.layers[depth]) as kept, only_layers(decoder, 0, depth + 1), \
                        compute_context(lm_head.weight):  # the layers above it are not needed
                    final_hidden_states(model, decoder, **_model_inputs(model, decoder, packed, lm_head.weight.dtype))
                for b, (prompt, record_answers) in enumerate(zip(ids, answers, strict=True)):
                    length = len(prompt) + sum(len(a) for a in record_answers)
                    states.append(kept[-1][b, :length].detach().cpu())
                    prompt_lengths.append(len(prompt))
                    edges, position = [], len(prompt)
                    for answer in record_answers:
                        edges.append((position, position + len(answer)))
                        position += len(answer)
                    spans.append(edges)
        finally:
            model.train(was_training)
        return cls(depth, states, prompt_lengths, spans)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The states and their layout as flat tensors, for a file (`from_tensors` reads them back)."""
        return {
            "states": torch.cat(self.states),  # [sum of L, H]
            "lengths": torch.tensor([state.shape[0] for state in self.states]),  # [N]
            "prompt_lengths": torch.tensor(self.prompt_lengths),  # [N]
            "span_counts": torch.tensor([len(edges) for edges in self.spans]),  # [N]
            "spans": torch.tensor([edge for edges in self.spans for edge in edges]).reshape(-1, 2),  # [sum of C, 2]
            "depth": torch.tensor(self.depth),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RecordTrunk:
        """The trunk `to_tensors` flattened (its states are views of the one ``states`` tensor)."""
        states = list(torch.split(tensors["states"], tensors["lengths"].tolist()))
        edges = [tuple(edge) for edge in tensors["spans"].tolist()]
        ends = list(itertools.accumulate(tensors["span_counts"].tolist()))
        spans = [edges[end - count : end] for end, count in zip(ends, tensors["span_counts"].tolist(), strict=True)]
        return cls(int(tensors["depth"]), states, tensors["prompt_lengths"].tolist(), spans)

    def rows(self, record_indices: torch.Tensor, answer_indices: torch.Tensor, length: int) -> torch.Tensor:
        """[B, length, H]: row b holds record ``record_indices[b]``'s prompt, then its answers ``answer_indices[b]`` (-1: none)."""
        rows = []
        for record, chosen in zip(record_indices.tolist(), answer_indices.tolist(), strict=True):
            parts = [torch.arange(self.prompt_lengths[record])]
            parts += [torch.arange(*self.spans[record][a]) for a in chosen if a >= 0]
            row = self.states[record][torch.cat(parts)]
            rows.append(torch.nn.functional.pad(row, (0, 0, 0, length - row.shape[0])))
        return torch.stack(rows)

    def decoder_output(self, model, inputs: dict, packed: dict, soft=None) -> torch.Tensor:
        """The decoder's output [B, L, H] for a packed training batch: its trunk assembled from the records' states.

        `packed` names each row's record (``trunk_record`` [B]) and answers (``trunk_answers`` [B, A],
        candidate indices); the layers from `depth` on run as usual, with gradients.
        """
        decoder, _ = causal_lm_parts(model)
        device = packed["input_ids"].device
        hidden = self.rows(packed["trunk_record"], packed["trunk_answers"], packed["input_ids"].shape[1]).to(device)
        rest = {key: value for key, value in inputs.items() if key not in ("input_ids", "inputs_embeds")}
        with only_layers(decoder, self.depth):
            return final_hidden_states(model, decoder, **rest, inputs_embeds=hidden)


def _model_inputs(model, decoder, packed: dict, dtype: torch.dtype) -> dict:
    inputs = {"attention_mask": attention_mask_for(decoder, packed["segment_ids"], dtype), "position_ids": packed["position_ids"]}
    soft = packed_soft_tokens(model, packed)
    if soft is None or injection_layer(model) > 0:  # late injection: the trunk below the soft tokens' layer reads text
        inputs["input_ids"] = packed["input_ids"]
    else:
        inputs["inputs_embeds"] = embed_with_soft_tokens(decoder, packed["input_ids"], *soft)
    return inputs
