"""Shared-trunk cache: rank with many adapters of one base model for the price of their own layers.

An adapter trained with ``--lora_layers N`` changes only the last N decoder layers. Every
model of a pipeline (zero-shot, SFT, DPO, S-DPO with any K) therefore computes the same hidden
states entering layer D = n_layers - N for the same packed batch. The first rank evaluation
saves them, one file per batch; a later evaluation loads them and runs only layers D.. and the
LM head. A folder per trunk is named by a hash of what those states depend on besides the
batch (the trunk's weights, the model config, D, the attention implementation, library
versions, device, threads); a file by a hash of the batch (tokens, positions, segments).

The first batch an evaluation loads is also computed in full, and the cache is used only if
the two agree bit for bit; otherwise (an architecture that does more to its input embeddings
than pass them to layer 0, say) the evaluation runs without it and says so. A file holds the
hidden size x 4 bytes (fp32; 2 in bf16) per packed token, padding included: about 0.8 MB per
LastFM record on SmolLM2-135M (`sdpo benchmark trunk`). The pipeline ranks every stage before generating and removes its cache once every stage is ranked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sdpo.errors import UserError
from sdpo.io import replace_atomic

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_AFTER_THE_TRUNK = ("lm_head", "norm")  # modules an adapter may change without touching the trunk
_PLAIN_NAME = re.compile(r"^\w+$")


def first_adapted_layer(model) -> int | None:
    """Index of the first decoder layer that any loaded adapter (active or not) changes; None if none does.

    0 when an adapter changes what comes before the layers (the embeddings, a prompt) or
    depends on the input tokens themselves (activated LoRA).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for config in getattr(model, "peft_config", {}).values():
        if config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None):
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

    None when there is nothing to share or it cannot be told from the config: no adapters, a
    non-LoRA or activated-LoRA adapter, one on every layer (no ``layers_to_transform``), one
    whose targets PEFT matches without regard to layers (a regex, full module names, target
    parameters), or one that saves whole modules or trains token embeddings.
    """
    depth = None
    for folder in adapters:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        layers, targets = config.get("layers_to_transform"), config.get("target_modules")
        plain_targets = isinstance(targets, list) and all(_PLAIN_NAME.match(t) for t in targets)
        if (config.get("peft_type") != "LORA" or layers in (None, []) or not plain_targets or config.get("target_parameters")
                or config.get("modules_to_save") or config.get("trainable_token_indices") or config.get("alora_invocation_tokens")):
            return None
        first = layers if isinstance(layers, int) else min(layers)
        depth = first if depth is None else min(depth, first)
    return depth or None


def trunk_fingerprint(model, decoder, depth: int) -> str:
    """SHA-256 of what the hidden states entering layer `depth` depend on, besides the batch."""
    import transformers

    device = next(decoder.parameters()).device
    config = {k: v for k, v in decoder.config.to_dict().items() if k != "_name_or_path"}
    setting = {
        "depth": depth, "decoder": type(decoder).__name__, "config": config, "attn": decoder.config._attn_implementation,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    }
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode())
    for module in (decoder.embed_tokens, *decoder.layers[:depth]):
        for name, tensor in module.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
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
            raise UserError(f"a trunk cache needs 0 < depth < {n_layers} (the model's layers), got {depth}.")
        if len(set(getattr(decoder.config, "layer_types", None) or ["one"])) > 1:  # skipping layers shifts their indices
            raise UserError("the trunk cache cannot serve a model that mixes layer types (e.g. sliding-window attention); leave it off.")
        self.depth = depth
        self.folder = Path(folder) / trunk_fingerprint(model, decoder, depth)[:16]
        self.checked = False  # has a loaded batch been compared with the full forward?
        self.usable = True

    def decoder_output(self, model, inputs: dict, packed: dict) -> torch.Tensor:
        """The decoder's output [B, L, H] for `inputs` (as `sdpo.scoring` passes them), the trunk from the cache when it holds the batch.

        `packed` is the batch as `sdpo.scoring.pack_answers` made it; it names the file.
        """
        from sdpo.scoring import causal_lm_parts, final_hidden_states

        decoder, _ = causal_lm_parts(model)
        first = first_adapted_layer(model)
        if first is not None and first < self.depth:
            raise UserError(f"an adapter changes decoder layer {first}, inside the cached trunk of {self.depth} layers; "
                            "evaluate it without the trunk cache.")
        if not self.usable:
            return final_hidden_states(model, decoder, **inputs)
        path = self.folder / f"{_batch_key(packed)}.safetensors"
        hidden = self._load(path, inputs["input_ids"].shape, decoder.config.hidden_size)
        if hidden is not None:
            rest = {key: value for key, value in inputs.items() if key != "input_ids"}
            with _without_first_layers(decoder, self.depth):
                cached = final_hidden_states(model, decoder, **rest, inputs_embeds=hidden.to(inputs["input_ids"].device))
            if self.checked:
                return cached
            full = final_hidden_states(model, decoder, **inputs)
            self.checked, self.usable = True, torch.equal(full, cached)
            if not self.usable:
                print(f"[evaluate] the cached trunk differs from the full forward for this model "
                      f"(largest gap {float((full - cached).abs().max()):.3g}); evaluating without the trunk cache", flush=True)
            return full
        kept = []

        def keep(module, args, kwargs):
            kept.append(args[0] if args else kwargs["hidden_states"])

        hook = decoder.layers[self.depth].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            output = final_hidden_states(model, decoder, **inputs)
        finally:
            hook.remove()
        self._save(path, kept[-1])
        return output

    @staticmethod
    def _load(path: Path, shape: torch.Size, hidden_size: int) -> torch.Tensor | None:
        """The saved states [B, L, H] at `path`; None (and the file removed) when absent, unreadable or of another shape."""
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            hidden = load_file(path)["hidden"]
        except Exception:  # a file a crash cut short: computed again
            hidden = None
        if hidden is None or tuple(hidden.shape) != (*shape, hidden_size):
            path.unlink(missing_ok=True)
            return None
        return hidden

    @staticmethod
    def _save(path: Path, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        replace_atomic(path, lambda tmp: save_file({"hidden": hidden.detach().cpu().contiguous()}, str(tmp)))
