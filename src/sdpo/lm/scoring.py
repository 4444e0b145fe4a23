"""The scoring kernel: summed log-probs of several answers behind one shared prompt.

Every record becomes ONE row: the prompt tokens, then every answer's tokens packed behind
it::

    row b:  [p_0 .. p_{P-1}] [a1_0 .. a1_n] [a2_0 .. a2_m] ... [pad ...]
    segment   0 ...      0     1 ...    1     2 ...    2        -1

- Attention is block-causal: a prompt token sees earlier prompt tokens; an answer token sees
  the whole prompt and the earlier tokens of its own answer, never another answer.
- Position ids of every answer restart at P, so each answer is computed exactly as if it
  stood alone behind the prompt.
- The first token of every answer is predicted by the last prompt position (shared); token
  j > 0 by answer position j - 1. The LM head is applied only at those positions, each
  distinct position once, and in fp32 on a bf16 model (`sdpo.lm.head`).

So the prompt is encoded once per record instead of once per answer, and the vocabulary
projection is paid for answer tokens only. SFT, preference training and ranking all call
`answer_logprobs`; ``tests/test_scoring.py`` checks it against one sequence per answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from sdpo.lm.decoder import causal_lm_parts, final_hidden_states
from sdpo.lm.head import head_logits
from sdpo.lm.precision import compute_context
from sdpo.lm.soft_tokens import embed_with_soft_tokens, injected_at, injection_layer, packed_soft_tokens

if TYPE_CHECKING:
    from sdpo.lm.trunk import TrunkCache

PROMPT, PAD = 0, -1


def pack_answers(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pack B prompts, each with its own list of answers, into block-structured rows.

    Returns a dict of tensors (so a Trainer moves it to the device as it is):
      input_ids, position_ids, segment_ids: [B, L] (segment 0 = prompt, a+1 = answer a, -1 = pad)
      token_row, token_source, token_target, token_answer: [N] for the N answer tokens of the
        batch: the row, the position whose output predicts the token, the token id, and the
        answer's flat index b * A + a
      answer_mask: [B, A] True where record b has an answer a (A = most answers of a record)
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    n_answers = max(len(a) for a in answers)
    rows, positions, segments = [], [], []
    token_row, token_source, token_target, token_answer = [], [], [], []
    answer_mask = torch.zeros(len(prompts), n_answers, dtype=torch.bool)
    for b, (prompt, record_answers) in enumerate(zip(prompts, answers, strict=True)):
        if not prompt:
            raise ValueError(f"record {b}: empty prompt")
        row, position, segment = list(prompt), list(range(len(prompt))), [PROMPT] * len(prompt)
        for a, answer in enumerate(record_answers):
            if not answer:
                raise ValueError(f"record {b}, answer {a}: no tokens")
            answer_mask[b, a] = True
            start = len(row)
            for j, token in enumerate(answer):
                token_row.append(b)
                token_source.append(len(prompt) - 1 if j == 0 else start + j - 1)
                token_target.append(token)
                token_answer.append(b * n_answers + a)
            row.extend(answer)
            position.extend(range(len(prompt), len(prompt) + len(answer)))
            segment.extend([a + 1] * len(answer))
        rows.append(row)
        positions.append(position)
        segments.append(segment)
    length = max(len(r) for r in rows)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long)

    return {
        "input_ids": padded(rows, pad_token_id),
        "position_ids": padded(positions, 0),
        "segment_ids": padded(segments, PAD),
        "token_row": torch.tensor(token_row, dtype=torch.long),
        "token_source": torch.tensor(token_source, dtype=torch.long),
        "token_target": torch.tensor(token_target, dtype=torch.long),
        "token_answer": torch.tensor(token_answer, dtype=torch.long),
        "answer_mask": answer_mask,
    }


def block_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, L, L] (0 = attend, dtype min = blocked) from segment ids [B, L]."""
    length = segment_ids.shape[1]
    query = segment_ids[:, :, None]
    key = segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (key != PAD) & ((key == PROMPT) | (key == query))
    # A padding query attends to position 0 only, so no softmax row is empty (no NaN).
    first = torch.zeros(length, dtype=torch.bool, device=segment_ids.device)
    first[0] = True
    allowed = allowed | ((query == PAD) & first)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def flex_block_mask(segment_ids: torch.Tensor):
    """The same block structure as `block_attention_mask`, as a FlexAttention BlockMask.

    With ``--attn_implementation flex_attention`` the kernel skips the blocked tiles instead of
    adding a dense [B, 1, L, L] mask (and never falls back to the math kernel on CUDA).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_ids.shape

    def allowed(b, h, q, kv):
        query, key = segment_ids[b, q], segment_ids[b, kv]
        return ((kv <= q) & (key != PAD) & ((key == PROMPT) | (key == query))) | ((query == PAD) & (kv == 0))

    return create_block_mask(allowed, batch, None, length, length, device=segment_ids.device)


def attention_mask_for(model, segment_ids: torch.Tensor, dtype: torch.dtype):
    """The block mask in the form the model's attention implementation takes."""
    if getattr(model.config, "_attn_implementation", None) == "flex_attention":
        return flex_block_mask(segment_ids)
    return block_attention_mask(segment_ids, dtype)


def answer_logprobs(model, packed: dict[str, torch.Tensor], trunk: TrunkCache | None = None,
                    soft: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob and token count of every packed answer.

    Returns (logps, n_tokens), both [B, A]; entries where ``answer_mask`` is False are 0.
    Differentiable: SFT and preference losses backpropagate through it. With bf16 base
    weights the decoder runs under bf16 autocast and the LM head in fp32 on the [U, H] hidden
    rows it needs (`sdpo.lm.head.head_logits`), so the logits, the normalisation and the sums
    are fp32 either way. With a `trunk` cache (evaluation),
    the layers below its depth run only for batches it does not hold yet (`sdpo.lm.trunk`).
    `soft` = (positions [B, S], vectors [B, S, H]) puts collaborative tokens at those prompt
    positions (`sdpo.lm.soft_tokens`; -1: an unused slot): the prompt opens every packed row, so
    its positions are the row's. Gradients reach the vectors (and the projector behind them);
    a `trunk` cache names its files by them too. Without `soft`, a batch that holds soft-token
    inputs (``soft_positions`` and the rest of `SOFT_KEYS`) is projected by the model's own
    projectors (`packed_soft_tokens`), inside the compute context as the decoder is.
    """
    decoder, lm_head = causal_lm_parts(model)
    input_ids = packed["input_ids"]
    batch, length = input_ids.shape
    flat_source = packed["token_row"] * length + packed["token_source"]  # [N]
    unique_source, inverse = torch.unique(flat_source, return_inverse=True)  # [U], [N]
    with compute_context(lm_head.weight):
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask_for(decoder, packed["segment_ids"], lm_head.weight.dtype),
            "position_ids": packed["position_ids"],
        }
        if soft is None:
            soft = packed_soft_tokens(model, packed)
        layer = injection_layer(model) if soft is not None else 0
        if soft is not None and layer == 0:
            inputs["inputs_embeds"] = embed_with_soft_tokens(decoder, inputs.pop("input_ids"), *soft)
        with injected_at(decoder.layers[layer], *soft) if layer else nullcontext():  # late injection: the layers below read text
            if trunk is None:
                hidden = final_hidden_states(model, decoder, **inputs)  # [B, L, H]
            else:
                if layer and trunk.depth > layer:
                    raise ValueError(f"a trunk of {trunk.depth} layers would skip the soft tokens, which enter layer {layer}")
                hidden = trunk.decoder_output(model, inputs, packed, None if layer else soft)
        logits = head_logits(lm_head, hidden.reshape(batch * length, -1)[unique_source])  # [U, V], fp32
    log_norm = torch.logsumexp(logits, dim=-1)  # [U]
    token_logps = logits[inverse, packed["token_target"]] - log_norm[inverse]  # [N]
    n_slots = packed["answer_mask"].numel()
    logps = torch.zeros(n_slots, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, packed["token_answer"], token_logps)
    counts = torch.zeros(n_slots, dtype=torch.long, device=token_logps.device)
    counts = counts.index_add(0, packed["token_answer"], torch.ones_like(packed["token_answer"]))
    shape = packed["answer_mask"].shape
    return logps.view(shape), counts.view(shape)


def score_answers(
    model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], pad_token_id: int,
    trunk: TrunkCache | None = None, soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    soft_inputs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Summed log-prob [B, A] of each answer given its record's prompt (token ids in, no grad needed).

    Missing answers (records with fewer than A answers) score -inf. `soft`: as in `answer_logprobs`;
    `soft_inputs`: the prompts' soft-token inputs (`SOFT_KEYS`), for the model's projectors.
    """
    device = next(model.parameters()).device
    packed = {**pack_answers(prompts, answers, pad_token_id), **(soft_inputs or {})}
    packed = {k: v.to(device) for k, v in packed.items()}
    soft = tuple(x.to(device) for x in soft) if soft is not None else None
    logps, _ = answer_logprobs(model, packed, trunk, soft)
    return logps.masked_fill(~packed["answer_mask"], float("-inf"))
