"""Shared-trunk cache: rank and generate with many adapters of one base model for the price of their own layers.

An adapter trained with ``--lora_layers N`` changes only the last N decoder layers. Every
model of a pipeline (zero-shot, SFT, DPO, S-DPO with any K) therefore computes the same hidden
states entering layer D = n_layers - N for the same packed batch. The first rank evaluation
saves them, one file per batch; a later evaluation loads them and runs only layers D.. and the
LM head. A folder per trunk is named by a hash of what those states depend on besides the
batch (the trunk's weights, the model config, D, the attention implementation, library
versions, device, threads); a file by a hash of the batch (tokens, positions, segments).

Prompts with collaborative tokens (`sdpo.lm.soft_tokens`) enter layer 0 with their soft tokens,
so a batch's file is named by the soft tokens' vectors too: models with the same projectors
(ones training left as they were, ``--no_train_projector``) read one another's states for
ranking; others only fill their own. Generating from such prompts runs every layer.

The first batch an evaluation loads is also computed in full, and the cache is used only if
the two agree bit for bit; otherwise (an architecture that does more to its input embeddings
than pass them to layer 0, say) the evaluation runs without it and says so. A file holds the
hidden size x 4 bytes (fp32; 2 in bf16) per packed token, padding included: about 0.8 MB per
LastFM record on SmolLM2-135M (`sdpo benchmark trunk`).

Generation uses the same folder: for a batch of prompts, the first generation saves what the
trunk layers leave behind over the prompt (their keys and values, and the states entering
layer D); a later one puts those keys and values into HF's generation cache and hands the
states to layer D, so the prompt's pass runs only the adapted layers, while the few generated
tokens run every layer as usual. The first batch loaded is generated both ways and must agree
in every token and every logit. That costs (D x 2 x key/value width + hidden size) x 4 bytes
per prompt token: about 7 MB per LastFM record on SmolLM2-135M with D = 22.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from sdpo.errors import UserError
from sdpo.io import replace_atomic
from sdpo.lm.adapters import first_adapted_layer
from sdpo.lm.decoder import causal_lm_parts, final_hidden_states, only_layers, states_entering
from sdpo.lm.models import device_name


def trunk_fingerprint(model, decoder, depth: int) -> str:
    """SHA-256 of what the hidden states entering layer `depth` depend on, besides the batch."""
    import transformers

    device = next(decoder.parameters()).device
    config = {k: v for k, v in decoder.config.to_dict().items() if k != "_name_or_path"}
    setting = {
        "depth": depth, "decoder": type(decoder).__name__, "config": config, "attn": decoder.config._attn_implementation,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "device": device_name(device),
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    }
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode())
    for module in (decoder.embed_tokens, *decoder.layers[:depth]):
        for name, tensor in module.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _batch_key(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (a batch's tokens and layout, and any soft tokens' vectors): the name of its file."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name} {tuple(tensor.shape)}".encode())
        if tensor.is_floating_point():
            digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _holds_every_position(cache, length: int) -> bool:
    """Whether a generation's `cache` keeps every position's keys and values as they were computed (a plain DynamicCache)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return (type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)
            and cache.get_seq_length() == length)


@contextmanager
def _prompt_trunk_from(decoder, saved: dict[str, torch.Tensor]):
    """Let `decoder`'s first layers take their pass over the prompt from `saved`; generated tokens run them as usual.

    The prompt's pass of trunk layer i only puts its saved keys and values into the generation
    cache; the last one also hands on the saved states entering the first layer after the trunk.
    A forward the layer had of its own (an accelerate hook, say) is back when the pass is done.
    """
    trunk = list(decoder.layers)[: saved["keys"].shape[0]]
    own = [layer.__dict__.get("forward") for layer in trunk]

    def restore(index: int) -> None:
        trunk[index].__dict__.pop("forward", None)
        if own[index] is not None:
            trunk[index].forward = own[index]

    def from_saved(index: int):
        def forward(hidden_states, *args, cache=None, past_key_values=None, **kwargs):
            restore(index)  # the prompt's pass only: the layer runs itself for the generated tokens
            if hidden_states.shape[1] != saved["hidden"].shape[1]:
                raise RuntimeError(f"the trunk cache holds the whole prompt ({saved['hidden'].shape[1]} tokens), "
                                   f"but generation passed {hidden_states.shape[1]} (prefill in chunks?)")
            (cache if cache is not None else past_key_values).update(saved["keys"][index], saved["values"][index], index)
            return saved["hidden"] if index == len(trunk) - 1 else hidden_states

        return forward

    for index, layer in enumerate(trunk):
        layer.forward = from_saved(index)
    try:
        yield
    finally:
        for index in range(len(trunk)):
            restore(index)


class TrunkCache:
    """What the first `depth` decoder layers of `model` compute, one file per batch under `folder`.

    For ranking (`decoder_output`), the hidden states entering layer `depth` of a packed batch;
    for generation (`generate`), also the trunk layers' keys and values over a batch of prompts.
    """

    def __init__(self, folder: str | Path, model, depth: int):
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
        self.hits = 0  # batches served from the cache

    def decoder_output(self, model, inputs: dict, packed: dict, soft: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder's output [B, L, H] for `inputs` (as `sdpo.lm.scoring` passes them), the trunk from the cache when it holds the batch.

        `packed` is the batch as `sdpo.lm.scoring.pack_answers` made it; it names the file, with
        the soft tokens' positions and vectors where the prompt has any (`inputs` then holds
        ``inputs_embeds``): they enter layer 0, so the trunk's states depend on them, and on the
        projector that made them.
        """
        decoder = self._decoder(model)
        if not self.usable:
            return final_hidden_states(model, decoder, **inputs)
        named = {name: packed[name] for name in ("input_ids", "position_ids", "segment_ids")}
        if soft is not None:
            named.update(soft_positions=soft[0], soft_vectors=soft[1])
        path = self.folder / f"{_batch_key(named)}.safetensors"
        hidden = self._load_hidden(path, packed["input_ids"].shape, decoder.config.hidden_size)
        if hidden is not None:
            self.hits += 1
            rest = {key: value for key, value in inputs.items() if key not in ("input_ids", "inputs_embeds")}
            with only_layers(decoder, self.depth):
                cached = final_hidden_states(model, decoder, **rest, inputs_embeds=hidden.to(packed["input_ids"].device))
            if self.checked:
                return cached
            full = final_hidden_states(model, decoder, **inputs)
            self._check(torch.equal(full, cached), f"largest gap {float((full - cached).abs().max()):.3g}")
            return full
        with states_entering(decoder.layers[self.depth]) as kept:
            output = final_hidden_states(model, decoder, **inputs)
        self._save(path, {"hidden": kept[-1]})
        return output

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **options) -> torch.Tensor:
        """``model.generate(input_ids=..., attention_mask=..., **options).sequences`` [B, P + new], the prompt's trunk from the cache.

        A file per batch of prompts [B, P] holds what the trunk layers leave for generation:
        their keys and values over the prompt [depth, B, kv_heads, P, head_dim] each, and the
        states entering layer `depth` [B, P, H]. With them the prompt's pass skips the trunk
        layers; the generated tokens run every layer as usual.
        """
        decoder = self._decoder(model)
        prompts = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not self.usable:
            return model.generate(**prompts, **options)
        path = self.folder / f"{_batch_key({'prompt_ids': input_ids, 'prompt_mask': attention_mask})}.safetensors"
        saved = self._load_prompt_trunk(path, input_ids.shape)
        if saved is not None:
            self.hits += 1
            saved = {name: tensor.to(input_ids.device) for name, tensor in saved.items()}
            checking = {"return_dict_in_generate": True, "output_logits": True} if not self.checked else {}
            with _prompt_trunk_from(decoder, saved):
                cached = model.generate(**prompts, **options, **checking)
            if self.checked:
                return cached
            full = model.generate(**prompts, **options, **checking)
            same = torch.equal(full.sequences, cached.sequences) and all(
                torch.equal(a, b) for a, b in zip(full.logits, cached.logits, strict=True))
            self._check(same, "other generated tokens or logits")
            return full.sequences
        with states_entering(decoder.layers[self.depth]) as kept:
            output = model.generate(**prompts, **options, return_dict_in_generate=True)
        if not _holds_every_position(output.cache, output.sequences.shape[1] - 1):
            return output.sequences  # no cache, or one that drops or compresses positions: nothing to keep
        width = input_ids.shape[1]
        layers = output.cache.layers[: self.depth]
        self._save(path, {"hidden": kept[0], "keys": torch.stack([layer.keys[:, :, :width] for layer in layers]),
                          "values": torch.stack([layer.values[:, :, :width] for layer in layers])})
        return output.sequences

    def _decoder(self, model):
        """`model`'s decoder, after refusing an adapter that changes a layer inside the trunk."""
        first = first_adapted_layer(model)
        if first is not None and first < self.depth:
            raise UserError(f"an adapter changes decoder layer {first}, inside the cached trunk of {self.depth} layers; "
                            "evaluate it without the trunk cache.")
        return causal_lm_parts(model)[0]

    def _check(self, same: bool, gap: str) -> None:
        """Record how the first loaded batch compared with the full computation; from a difference on, the cache is off."""
        self.checked, self.usable = True, same
        if not same:
            print(f"[evaluate] the cached trunk differs from the full computation for this model ({gap}); "
                  "evaluating without the trunk cache", flush=True)

    def _load_prompt_trunk(self, path: Path, shape: torch.Size) -> dict[str, torch.Tensor] | None:
        """The saved prompt trunk for prompts of `shape` [B, P]; None (and the file removed) when absent, unreadable or another shape."""
        saved = self._read(path)
        if saved is None:
            return None
        batch, width = shape
        if (set(saved) != {"hidden", "keys", "values"} or saved["hidden"].shape[:2] != (batch, width)
                or saved["keys"].shape[0] != self.depth or saved["keys"].shape[1] != batch or saved["keys"].shape[3] != width
                or saved["values"].shape != saved["keys"].shape):
            path.unlink(missing_ok=True)
            return None
        return saved

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor] | None:
        """The tensors saved at `path`; None when there is none, and (the file removed) when a crash cut it short."""
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception:
            path.unlink(missing_ok=True)
            return None

    @staticmethod
    def _load_hidden(path: Path, shape: torch.Size, hidden_size: int) -> torch.Tensor | None:
        """The saved states [B, L, H] at `path`; None (and the file removed) when absent, unreadable or of another shape."""
        hidden = (TrunkCache._read(path) or {}).get("hidden")
        if hidden is None or tuple(hidden.shape) != (*shape, hidden_size):
            path.unlink(missing_ok=True)
            return None
        return hidden

    @staticmethod
    def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        replace_atomic(path, lambda tmp: save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp)))
