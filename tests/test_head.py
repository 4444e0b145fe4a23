"""The LM head in fp32 on a bf16 model: the kernel, its gradients, generation, and fp32 left as it was.

Each reference below is computed in the test from the same bf16 hidden states the kernel sees,
so what is left between the two is the head alone. `sdpo.lm.head` is imported inside the tests
that call it, so the others also run (and fail) against the code before it.
"""

import gzip
import json

import torch
from torch.nn.functional import linear

from sdpo.data.datasets import load_split
from sdpo.evaluation.generation import generate_answers
from sdpo.evaluation.journal import JOURNAL_FILE
from sdpo.evaluation.protocols import evaluate
from sdpo.lm.decoder import causal_lm_parts, final_hidden_states
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import compute_context
from sdpo.lm.scoring import answer_logprobs, block_attention_mask, pack_answers
from tests.test_scoring import random_batch


def tiny_model(dtype: torch.dtype, lora: LoraSettings | None = None):
    """The tiny model with its base weights in `dtype`; with `lora`, an adapter whose B matrices are random (so it changes the outputs)."""
    model, tokenizer = load_model("tiny", dtype=dtype)
    if lora is not None:
        model = add_lora(model, lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    return model.eval(), tokenizer


def packed_batch(tokenizer, seed: int = 1) -> dict[str, torch.Tensor]:
    return pack_answers(*random_batch(seed, 4, 20), tokenizer.pad_token_id)


def hidden_rows(model, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, H]: the decoder's output (bf16 on a bf16 model) at the position that predicts each answer token."""
    decoder, lm_head = causal_lm_parts(model)
    batch, length = packed["input_ids"].shape
    with compute_context(lm_head.weight):
        hidden = final_hidden_states(model, decoder, input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                     attention_mask=block_attention_mask(packed["segment_ids"], lm_head.weight.dtype))
    return hidden.reshape(batch * length, -1)[packed["token_row"] * length + packed["token_source"]]


def summed_logps(logits: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, A] summed log-probs of the answers from fp32 logits [N, V] of their tokens."""
    token_logps = logits.log_softmax(-1).gather(1, packed["token_target"][:, None])[:, 0]
    sums = torch.zeros(packed["answer_mask"].numel()).index_add(0, packed["token_answer"], token_logps)
    return sums.view(packed["answer_mask"].shape)


def test_bf16_kernel_computes_the_head_in_fp32():
    """Old code: the head ran under bf16 autocast, so the kernel matched the bf16-rounded logits (gap 8.7e-3 here), not fp32's."""
    model, tokenizer = tiny_model(torch.bfloat16)
    packed = packed_batch(tokenizer)
    weight = model.lm_head.weight
    with torch.no_grad():
        kernel, _ = answer_logprobs(model, packed)
        rows = hidden_rows(model, packed)
        fp32_head = summed_logps(linear(rows.float(), weight.float()), packed)
        bf16_head = summed_logps(linear(rows, weight).float(), packed)  # the logits rounded to bf16
    mask = packed["answer_mask"]
    assert rows.dtype == weight.dtype == torch.bfloat16 and kernel.dtype == torch.float32
    assert (kernel - fp32_head)[mask].abs().max() <= 1e-4
    assert (bf16_head - fp32_head)[mask].abs().max() > 1e-3  # so the bound above tells the two heads apart


def test_bf16_gradients_reach_lora_through_the_fp32_head():
    """Backward through the head starts from fp32 logits and multiplies in fp32; the decoder's bf16 backward carries it to LoRA.

    Old code: the logits, and so their gradient, were bf16.
    """
    model, tokenizer = tiny_model(torch.bfloat16, LoraSettings(dropout=0.0))
    packed = packed_batch(tokenizer, seed=2)
    seen = {}

    def keep_logits_gradient(module, args, logits) -> None:
        logits.register_hook(lambda grad: seen.setdefault("logits", grad))

    def keep_hidden_gradient(module, grad_input, grad_output) -> None:
        seen["hidden"] = grad_input[0]

    hooks = [model.lm_head.register_forward_hook(keep_logits_gradient), model.lm_head.register_full_backward_hook(keep_hidden_gradient)]
    try:
        (-answer_logprobs(model, packed)[0][packed["answer_mask"]].sum()).backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["logits"].dtype == torch.float32  # [U, V]
    expected = seen["logits"] @ model.lm_head.weight.float()  # [U, H]: the fp32 head's gradient at the hidden rows
    assert seen["hidden"].dtype == torch.bfloat16  # rounded once, where it enters the bf16 decoder
    assert ((seen["hidden"].float() - expected).abs() <= 2**-7 * expected.abs() + 1e-6).all()
    lora = [param for name, param in model.named_parameters() if "lora_" in name]
    assert lora and all(param.dtype == torch.float32 and torch.isfinite(param.grad).all() and param.grad.abs().max() > 0 for param in lora)


def test_fp32_runs_are_unchanged():
    """An fp32 head is called as it is: the same log-probs, bit for bit, as with the head left alone (`low_precision_head`).

    Old code: no sdpo.lm.head to import (the old kernel computed exactly this; see the commit message for the comparison).
    """
    from sdpo.lm.head import head_logits, head_precision_key, low_precision_head, low_precision_linear

    model, tokenizer = tiny_model(torch.float32, LoraSettings(dropout=0.0))
    packed = packed_batch(tokenizer)
    lm_head = causal_lm_parts(model)[1]
    with torch.no_grad():
        rows = hidden_rows(model, packed)
        kernel, _ = answer_logprobs(model, packed)
        with low_precision_head():
            as_it_is, _ = answer_logprobs(model, packed)
        assert torch.equal(head_logits(lm_head, rows), lm_head(rows))
    assert torch.equal(kernel, as_it_is)
    assert low_precision_linear(lm_head) is None and head_precision_key(lm_head, torch.float32) == "torch.float32"


def test_which_heads_change():
    """bf16 heads and the base layer of a PEFT wrapper change; fp32, quantised ones (integer weights) and the benchmark's switch do not.

    Old code: no sdpo.lm.head to import.
    """
    from sdpo.lm.head import head_precision_key, low_precision_head, low_precision_linear

    plain = torch.nn.Linear(4, 8, bias=False).to(torch.bfloat16)
    assert low_precision_linear(plain) is plain and head_precision_key(plain, torch.bfloat16) == "torch.bfloat16, fp32 lm_head"
    with low_precision_head():
        assert low_precision_linear(plain) is None and head_precision_key(plain, torch.bfloat16) == "torch.bfloat16"
    packed_weights = torch.nn.Linear(4, 8, bias=False)
    packed_weights.weight = torch.nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)  # as bitsandbytes stores 4-bit
    assert low_precision_linear(packed_weights) is None
    model, _ = tiny_model(torch.bfloat16, LoraSettings(dropout=0.0, target_modules=["q_proj", "lm_head"]))
    wrapped = causal_lm_parts(model)[1]
    assert wrapped is not wrapped.get_base_layer() and low_precision_linear(wrapped) is wrapped.get_base_layer()


def test_a_lora_wrapped_head_runs_in_fp32_in_the_kernel():
    """LoRA on lm_head: base product and LoRA update in fp32. Old code: both ran under bf16 autocast (a gap of 0.16 here)."""
    model, tokenizer = tiny_model(torch.bfloat16, LoraSettings(dropout=0.0, target_modules=["q_proj", "lm_head"]))
    packed = packed_batch(tokenizer, seed=3)
    head = causal_lm_parts(model)[1]
    lora_a, lora_b = head.lora_A["default"].weight, head.lora_B["default"].weight
    with torch.no_grad():
        kernel, _ = answer_logprobs(model, packed)
        rows = hidden_rows(model, packed).float()
        logits = linear(rows, head.get_base_layer().weight.float()) + linear(linear(rows, lora_a), lora_b) * head.scaling["default"]
    mask = packed["answer_mask"]
    assert (kernel - summed_logps(logits, packed))[mask].abs().max() <= 1e-4


def test_bf16_generation_decodes_from_fp32_logits(small_data):
    """Every logit greedy decoding reads is fp32, and the head is itself again afterwards. Old code: the logits were bf16."""
    model, tokenizer = tiny_model(torch.bfloat16)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    try:
        generate_answers(model, tokenizer, load_split(small_data, "test", 2), "music", batch_size=2, progress=False)
    finally:
        hook.remove()
    assert len(calls) > 1
    for hidden, logits in calls:
        assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
        assert torch.equal(logits, linear(hidden.float(), model.lm_head.weight.float()))
    assert "forward" not in vars(model.lm_head)


def test_a_bf16_evaluation_journal_names_the_fp32_head(small_data, tmp_path):
    """An interrupted bf16 evaluation of the all-bf16 head starts over instead of mixing heads; an fp32 one's settings are as they were.

    Old code: no lm_head in the settings.
    """
    records = load_split(small_data, "test", 1)
    settings = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = tiny_model(dtype)
        folder = tmp_path / str(dtype)
        evaluate(model, tokenizer, records, "music", "rank", progress=False, info={"model": "tiny", "adapter_sha256": None}, journal_dir=folder)
        with gzip.open(folder / JOURNAL_FILE, "rt") as journal:
            settings[dtype] = json.loads(journal.readline())["settings"]
    assert "lm_head" not in settings[torch.float32] and settings[torch.bfloat16]["lm_head"] == "fp32"
