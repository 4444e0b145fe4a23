"""The generate protocol (the paper's): greedy answers, scored by the paper's substring rule and a stricter one.

Greedy decoding of at most 20 new tokens; only the new tokens are decoded. HitRatio@1 and
ValidRatio by the paper's substring rule, and beside them by the stricter longest-match rule
(``strict_hr@1``, ``strict_valid_ratio``), each with its 95% bootstrap interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sdpo.data.prompts import TextPrompts, encode_answer
from sdpo.data.records import Record
from sdpo.evaluation.journal import Journal, batches, journaled
from sdpo.evaluation.metrics import longest_match, paper_match
from sdpo.evaluation.results import Evaluation
from sdpo.evaluation.stats import bootstrap_cis
from sdpo.lm.decoder import causal_lm_parts
from sdpo.lm.head import fp32_head
from sdpo.lm.precision import compute_context
from sdpo.lm.soft_tokens import embed_with_soft_tokens, injected_at, injection_layer, packed_soft_tokens

if TYPE_CHECKING:
    from sdpo.lm.trunk import TrunkCache

MAX_NEW_TOKENS = 20


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True,
                     journal: Journal | None = None, *, trunk: TrunkCache | None = None, prompts=None,
                     by_length: bool = False, stop_after_titles: bool = False) -> list[str]:
    """Greedy answers (at most 20 new tokens), decoded from the new tokens only (journaled as in `candidate_logps`).

    With a `trunk` cache, the prompt's pass through the layers no adapter changes runs once per batch across evaluations.
    With collaborative tokens (`prompts`), the prompt enters as embeddings with the soft tokens in place, and the
    whole prompt runs every layer (the trunk cache holds text prompts' passes only); with late injection the prompt
    enters as text and its soft tokens join the states entering their layer (`injected_at`), so the trunk cache serves it. On a bf16 model the LM head computes
    fp32 logits (`sdpo.lm.head.fp32_head`), so greedy decoding is not left to bf16's ties between near-equal tokens.

    Two ways to generate faster on a CPU (`sdpo benchmark generate` measures them):
    `by_length` batches the records in order of prompt length, so a batch pads little; the answers come back
    in the records' order. `stop_after_titles` gives each batch at most as many new tokens as its longest
    candidate answer (title and end token), not 20: an answer longer than every candidate names no
    candidate by itself, but a title after a preamble is then cut off, so the paper's substring rule can
    count fewer hits than with 20 tokens.
    """
    prompts = prompts or TextPrompts(tokenizer, domain, seed)
    model.eval()
    device = next(model.parameters()).device
    # prompts are encoded as their batch comes (a journaled batch needs none), all at once only to order them by length
    prompt_ids = {i: prompts.ids(r) for i, r in enumerate(records)} if by_length else {}
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i])) if by_length else list(range(len(records)))
    texts: list[str | None] = [None] * len(records)
    for batch_order in tqdm(list(batches(order, batch_size)), desc="generate", disable=not progress):
        batch = [records[i] for i in batch_order]
        done = journaled(journal, "text", batch)
        if done is None:
            ids = [prompt_ids[i] if i in prompt_ids else prompts.ids(records[i]) for i in batch_order]
            done = _generate_batch(model, tokenizer, prompts, batch, ids, device, trunk,
                                   _answer_budget(tokenizer, batch) if stop_after_titles else MAX_NEW_TOKENS)
            if journal is not None:
                journal.add("text", [(record.id, text) for record, text in zip(batch, done, strict=True)])
        for i, text in zip(batch_order, done, strict=True):
            texts[i] = text
    return texts


def _answer_budget(tokenizer, batch: list[Record]) -> int:
    """New tokens a batch needs to name any of its candidates: the longest answer (title and end token), at most 20."""
    return min(MAX_NEW_TOKENS, max(len(encode_answer(tokenizer, title)) for record in batch for title in record.candidates))


def _generate_batch(model, tokenizer, prompts, batch: list[Record], prompt_ids: list[list[int]], device, trunk, max_new_tokens: int) -> list[str]:
    """The batch's greedy answers, its prompts left-padded to the longest."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    options = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": max_new_tokens, "do_sample": False,
               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    soft_inputs = prompts.soft_inputs(batch, prompt_ids)
    lm_head = model.get_output_embeddings()
    layer = injection_layer(model) if soft_inputs else 0
    with compute_context(lm_head.weight), fp32_head(lm_head):
        if soft_inputs and layer == 0:
            decoder, _ = causal_lm_parts(model)
            options["inputs_embeds"] = embed_with_soft_tokens(decoder, input_ids, *_left_padded_soft(model, input_ids, soft_inputs, width, prompt_ids))
            output = model.generate(**options)
        elif soft_inputs:  # late injection: the prompt's pass gets its soft tokens at that layer, the layers below read text
            decoder, _ = causal_lm_parts(model)
            with injected_at(decoder.layers[layer], *_left_padded_soft(model, input_ids, soft_inputs, width, prompt_ids)):
                output = trunk.generate(model, **options) if trunk is not None else model.generate(**options)
        else:
            output = trunk.generate(model, **options) if trunk is not None else model.generate(**options)
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def _left_padded_soft(model, input_ids: torch.Tensor, soft_inputs: dict[str, torch.Tensor], width: int,
                      prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, S], soft tokens [B, S, H]) of left-padded prompts: each row's positions moved by its padding."""
    inputs = {k: v.to(input_ids.device) for k, v in soft_inputs.items()}
    positions = inputs["soft_positions"]
    shift = torch.tensor([width - len(p) for p in prompt_ids], device=positions.device)[:, None]
    inputs["soft_positions"] = torch.where(positions >= 0, positions + shift, positions)
    return packed_soft_tokens(model, inputs)


def score_generations(records: list[Record], texts: list[str]) -> Evaluation:
    """Paper and longest-match metrics for generated answers, with their bootstrap intervals."""
    predictions, columns = [], {"hr@1": [], "valid_ratio": [], "strict_hr@1": [], "strict_valid_ratio": []}
    for record, text in zip(records, texts, strict=True):
        paper = paper_match(text, record.candidates, record.target)
        strict = longest_match(text, record.candidates, record.target)
        flags = {"hit": paper.hit, "valid": paper.valid, "strict_hit": strict.hit, "strict_valid": strict.valid}
        for column, flag in zip(columns, flags.values(), strict=True):
            columns[column].append(float(flag))
        predictions.append({"id": record.id, "target": record.target, "generated": text, "matched": list(paper.matched), **flags})
    metrics: dict[str, Any] = {name: sum(values) / len(values) for name, values in columns.items()}
    metrics["ci95"] = bootstrap_cis(columns)
    return Evaluation(metrics, predictions)
