"""Shared-trunk cache: rank with many adapters of one base model for the price of their own layers.

An adapter trained with ``--lora_layers N`` changes only the last N decoder layers. Every
model of a pipeline (zero-shot, SFT, DPO, S-DPO with any K) therefore computes the same hidden
states entering layer D = n_layers - N for the same packed batch. The first rank evaluation
saves them, one file per batch, named by a hash of the trunk (its weights, D, the attention
implementation, the torch version) and of the batch (tokens, positions, segments); a later
evaluation loads them and runs only layers D.. and the LM head. The log-probs are bitwise those
of the full forward (``tests/test_trunk.py``).

A file holds hidden-size x 4 bytes per packed token (fp32): about 0.75 MB per LastFM record
on SmolLM2-135M. The pipeline removes its cache once every stage is evaluated.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sdpo.io import replace_atomic

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_AFTER_THE_TRUNK = ("lm_head", "norm")  # modules an adapter may change without touching the trunk


def first_adapted_layer(model) -> int | None:
    """Index of the first decoder layer that any loaded adapter (active or not) changes; None if none does.

    0 when an adapter changes what comes before the layers (the embeddings, a prompt).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if any(config.is_prompt_learning for config in getattr(model, "peft_config", {}).values()):
        return 0
    first = None
    for name, module in model.named_modules():
        if not isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            continue
        match = _LAYER_INDEX.search(f".{name}.")
        if match is None:
            if name.rsplit(".", 1)[-1] in _AFTER_THE_TRUNK:
                continue
            return 0
        first = int(match.group(1)) if first is None else min(first, int(match.group(1)))
    return first


def shared_trunk_depth(adapters: Sequence[str | Path]) -> int | None:
    """How many leading decoder layers none of the saved LoRA `adapters` changes (from adapter_config.json).

    None when there is nothing to share: no adapters, an adapter on every layer (no
    ``layers_to_transform``), one that saves whole modules or trains token embeddings, or
    one that is not LoRA.
    """
    depth = None
    for folder in adapters:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        layers = config.get("layers_to_transform")
        if config.get("peft_type") != "LORA" or layers in (None, []) or config.get("modules_to_save") or config.get("trainable_token_indices"):
            return None
        first = layers if isinstance(layers, int) else min(layers)
        depth = first if depth is None else min(depth, first)
    return depth or None


def _shares_one_layer_type(config) -> bool:
    """Skipping layers shifts layer indices: only safe when every layer is of one kind (no sliding-window mix)."""
    return len(set(getattr(config, "layer_types", None) or ["one"])) == 1


def trunk_fingerprint(decoder, depth: int) -> str:
    """SHA-256 of what the hidden states entering layer `depth` depend on, besides the batch."""
    digest = hashlib.sha256(f"{depth} {decoder.config._attn_implementation} torch {torch.__version__}".encode())
    for module in (decoder.embed_tokens, *decoder.layers[:depth]):
        for name, tensor in module.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _batch_key(packed: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in ("input_ids", "position_ids", "segment_ids"):
        tensor = packed[name]
        digest.update(f"{name} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _without_first_layers(decoder, depth: int):
    """Let `decoder` run only its layers from `depth` on (its input then being the hidden states entering that layer)."""
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[depth:])
    try:
        yield
    finally:
        decoder.layers = layers


class TrunkCache:
    """The hidden states entering decoder layer `depth` of `model`, one file per packed batch under `folder`."""

    def __init__(self, folder: str | Path, model, depth: int):
        from sdpo.scoring import causal_lm_parts

        decoder, _ = causal_lm_parts(model)
        n_layers = len(decoder.layers)
        if not 0 < depth < n_layers:
            raise ValueError(f"trunk depth {depth}: a cache needs 0 < depth < {n_layers} (the model's layers)")
        if not _shares_one_layer_type(decoder.config):
            raise ValueError("the model mixes layer types (e.g. sliding-window attention); its layers cannot be skipped")
        self.depth = depth
        self.folder = Path(folder) / trunk_fingerprint(decoder, depth)[:16]

    def final_hidden_states(self, model, decoder, run: Callable[..., torch.Tensor], inputs: dict, packed: dict) -> torch.Tensor:
        """``run(**inputs)``, the decoder's output [B, L, H], computing layers below `depth` only when no file holds them.

        `packed` is the batch as `sdpo.scoring.pack_answers` made it; it names the file.
        """
        first = first_adapted_layer(model)
        if first is not None and first < self.depth:
            raise ValueError(f"an adapter changes decoder layer {first}, inside the cached trunk of {self.depth} layers")
        path = self.folder / f"{_batch_key(packed)}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            hidden = load_file(path)["hidden"].to(inputs["input_ids"].device)
            rest = {key: value for key, value in inputs.items() if key != "input_ids"}
            with _without_first_layers(decoder, self.depth):
                return run(**rest, inputs_embeds=hidden)
        kept = []

        def keep(module, args, kwargs):
            kept.append(args[0] if args else kwargs["hidden_states"])

        hook = decoder.layers[self.depth].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            output = run(**inputs)
        finally:
            hook.remove()
        self._save(path, kept[-1])
        return output

    @staticmethod
    def _save(path: Path, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        replace_atomic(path, lambda tmp: save_file({"hidden": hidden.detach().cpu().contiguous()}, str(tmp)))
