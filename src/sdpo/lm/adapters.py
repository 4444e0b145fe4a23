"""LoRA adapter folders: what one must hold, which adapter it is (the SHA-256 of its weights), which layers it changes."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdpo.data.sources.fetch import sha256_of
from sdpo.errors import UserError
from sdpo.io import replace_atomic
from sdpo.lm.soft_tokens import MODULE as PROJECTORS

ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # how an adapter's weights may be stored


def store_adapter_weights(folder: str | Path, dtype: str) -> None:
    """Rewrite FOLDER/adapter_model.safetensors with its floating-point tensors in `dtype` (bf16: half the bytes).

    Whatever loads the adapter later reads these stored values: a bf16 copy is the model from then on.
    A file already in `dtype` is left as it is.
    """
    path = Path(folder) / ADAPTER_WEIGHTS
    target = WEIGHT_DTYPES[dtype]
    stored = load_file(path)
    if all(t.dtype == target for t in stored.values() if t.is_floating_point()):
        return
    weights = {name: t.to(target) if t.is_floating_point() else t for name, t in stored.items()}
    replace_atomic(path, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))


def adapter_sha256(folder: str | Path) -> str:
    """SHA-256 of a LoRA adapter's weights file: which adapter a run or an evaluation used, beyond its path."""
    return sha256_of(Path(folder) / ADAPTER_WEIGHTS)


def check_adapter_folder(folder: str | Path, what: str = "adapter") -> None:
    """A user error unless `folder` holds a readable LoRA adapter (config + weights)."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} holds no LoRA {what} (adapter_config.json). Give the output folder of sdpo sft or sdpo align.")
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{config_path}: damaged ({type(exc).__name__}). Retrain, or restore the file.") from None
    check_safetensors(folder / ADAPTER_WEIGHTS)


def check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: missing. Retrain, or restore the file.")
    try:
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                weights.get_slice(name)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path}: damaged ({type(exc).__name__}: {exc}). Retrain, or restore the file.") from None


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_AFTER_THE_TRUNK = ("lm_head", "norm")  # modules an adapter may change without touching the trunk
_PLAIN_NAME = re.compile(r"^\w+$")


def first_adapted_layer(model) -> int | None:
    """Index of the first decoder layer that any loaded adapter (active or not) changes; None if none does.

    0 when an adapter changes what comes before the layers (the embeddings, a prompt) or
    depends on the input tokens themselves (activated LoRA). The collaborative tokens' projectors
    (saved whole beside LoRA) do not count: what they make enters layer 0 as soft-token vectors,
    and a trunk cache names each batch's file by those vectors (`sdpo.lm.trunk`).
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
        match = LAYER_INDEX.search(f".{name}.")
        if match is None:
            if name.rsplit(".", 1)[-1] in (*_AFTER_THE_TRUNK, PROJECTORS):
                continue
            return 0
        first = int(match.group(1)) if first is None else min(first, int(match.group(1)))
    return first


def shared_trunk_depth(adapters: Sequence[str | Path]) -> int | None:
    """How many leading decoder layers none of the saved LoRA `adapters` changes (from adapter_config.json).

    None when there is nothing to share or it cannot be told from the config: no adapters, a
    non-LoRA or activated-LoRA adapter, one on every layer (no ``layers_to_transform``), one
    whose targets PEFT matches without regard to layers (a regex, full module names, target
    parameters), or one that saves whole modules (other than the collaborative tokens' projectors,
    as `first_adapted_layer` says) or trains token embeddings.
    """
    depth = None
    for folder in adapters:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        layers, targets = config.get("layers_to_transform"), config.get("target_modules")
        plain_targets = isinstance(targets, list) and all(_PLAIN_NAME.match(t) for t in targets)
        saves_other_modules = set(config.get("modules_to_save") or []) - {PROJECTORS}
        if (config.get("peft_type") != "LORA" or layers in (None, []) or not plain_targets or config.get("target_parameters")
                or saves_other_modules or config.get("trainable_token_indices") or config.get("alora_invocation_tokens")):
            return None
        first = layers if isinstance(layers, int) else min(layers)
        depth = first if depth is None else min(depth, first)
    return depth or None
