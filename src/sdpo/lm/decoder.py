"""The two pieces of a causal LM that the scoring kernel and the trunk cache share.

`causal_lm_parts` finds the decoder and the LM head through every wrapper;
`final_hidden_states` runs the model itself and keeps the decoder's output; `only_layers`
lets the decoder run a slice of its layers (the trunk caches skip the ones they hold), and
`states_entering` keeps what enters a layer. They live
here, below `sdpo.lm.scoring` and `sdpo.lm.trunk`, so that neither has to import the other.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def causal_lm_parts(model):
    """(decoder, lm_head) of a causal LM, looking through DDP/FSDP and PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    base = extract_model_from_parallel(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return base.get_decoder(), base.get_output_embeddings()


def final_hidden_states(model, decoder, **inputs) -> torch.Tensor:
    """[B, L, H]: the decoder's output, from a call of `model` itself.

    The call goes through every wrapper (PEFT, DDP, FSDP), so a distributed run syncs its
    gradients as usual. A forward hook keeps the decoder's output; the model's own LM head
    runs on the last position only (``logits_to_keep=1``), and `answer_logprobs` applies the
    head to the answer positions it needs. `inputs` are input_ids (or inputs_embeds),
    attention_mask and position_ids.
    """
    kept = []
    hook = decoder.register_forward_hook(lambda module, args, output: kept.append(output.last_hidden_state))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return kept[-1]


@contextmanager
def only_layers(decoder, start: int = 0, stop: int | None = None):
    """Let `decoder` run only ``layers[start:stop]`` while in the block (from `start` on, its input is the states entering that layer)."""
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    try:
        yield
    finally:
        decoder.layers = layers


@contextmanager
def states_entering(layer):
    """A list that collects the hidden states [B, L, H] of every call into `layer`, while in the block.

    It sees them before any other pre-hook of the layer (soft tokens injected there, say): what enters from below.
    """
    kept = []
    hook = layer.register_forward_pre_hook(lambda module, args, kwargs: kept.append(args[0] if args else kwargs["hidden_states"]),
                                           with_kwargs=True, prepend=True)
    try:
        yield kept
    finally:
        hook.remove()
