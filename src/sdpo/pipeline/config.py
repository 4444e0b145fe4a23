"""A pipeline config read and checked before any stage runs: its sections, its stages, its baselines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.config import read_yaml
from sdpo.errors import UserError
from sdpo.evaluation.protocols import PROTOCOLS, SCORES

SHARED_KEYS = ("domain", "prompt_seed", "subset_seed", "bf16")  # set once, at the top, for every stage
PIPELINE_KEYS = {"output_dir", "model", "seed", "data", "sft", "align", "baselines", "evaluate", "fusion", *SHARED_KEYS}
FUSION_KEYS = {"collaborative", "stages", "val_limit"}
EVALUATE_KEYS = {"split", "limit", "protocols", "batch_size", "score", "stages", "generate_stages", "trunk_cache"}
RESERVED_NAMES = ("zero-shot", "data", "eval", "baselines", "runs", "reference-cache", "trunk-cache", "ensemble", "stack")  # and checkpoint-N


@dataclass
class Pipeline:
    """A pipeline config, read and checked before any stage runs (a typo fails now, not hours later)."""

    path: Path  # the config file
    out: Path  # where everything goes
    model: str
    seed: int
    shared: dict[str, Any]  # prompt_seed, subset_seed, domain, bf16: one setting for every stage
    data: dict[str, Any]  # {path: DIR} or {dataset: NAME, mirror: DIR}
    sft_stages: list[tuple[str, dict[str, Any]]]  # (name, options)
    align_stages: list[tuple[str, dict[str, Any], str]]  # (name, options, the SFT stage it starts from)
    evaluate: dict[str, Any]
    baselines: dict[str, Any] | None  # the baselines section, None where there is none
    fusion: dict[str, Any] | None = None  # late fusion: {collaborative: a baseline, stages: [...], val_limit: N}

    @property
    def protocols(self) -> list[str]:
        return list(self.evaluate.get("protocols", PROTOCOLS))

    @property
    def split(self) -> str:
        return self.evaluate.get("split", "test")

    @property
    def limit(self) -> int | None:
        return self.evaluate.get("limit")

    @property
    def imported_stages(self) -> list[str]:
        """The stages copied from a run elsewhere (``adapter: DIR``), not trained here."""
        return [name for name, options, *_ in [*self.sft_stages, *self.align_stages] if "adapter" in options]


def read_pipeline(path: str | Path, output_dir: str | Path | None = None) -> Pipeline:
    """The pipeline config at `path`, checked; `output_dir` (if given) replaces its ``output_dir``."""
    path = Path(path)
    config = read_yaml(path)
    unknown = sorted(set(config) - PIPELINE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(PIPELINE_KEYS))}.")
    seed = integer(config, "seed", path)
    shared = {"prompt_seed": integer(config, "prompt_seed", path), "subset_seed": integer(config, "subset_seed", path),
              "domain": config.get("domain"), "bf16": config.get("bf16")}
    if shared["bf16"] not in (None, True, False):
        raise UserError(f"{path}: bf16 must be true, false or null (null: on where the hardware computes bf16 natively).")
    evaluate = config_section(config, "evaluate", path)
    unknown = sorted(set(evaluate) - EVALUATE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown evaluate option(s) {', '.join(unknown)}; known: {', '.join(sorted(EVALUATE_KEYS))}.")
    if evaluate.get("trunk_cache", True) not in (True, False):
        raise UserError(f"{path}: evaluate.trunk_cache must be true or false.")
    unknown = sorted(set(evaluate.get("protocols", PROTOCOLS)) - set(PROTOCOLS))
    if unknown:
        raise UserError(f"{path}: evaluate.protocols names {', '.join(unknown)}; a pipeline evaluates with {' and '.join(PROTOCOLS)}.")
    if evaluate.get("score", "logp") not in SCORES:
        raise UserError(f"{path}: evaluate.score must be one of {', '.join(SCORES)}.")
    sft_stages, align_stages = parse_training_stages(config, path)
    labels = ["zero-shot", *(name for name, _ in sft_stages), *(name for name, *_ in align_stages)]
    for key in ("stages", "generate_stages"):
        unknown = sorted(set(evaluate.get(key, labels)) - set(labels))
        if unknown:
            raise UserError(f"{path}: evaluate.{key} names {', '.join(unknown)}, which the pipeline has no stage of.")
    baselines = dict(config_section(config, "baselines", path)) if "baselines" in config else None
    if baselines is not None:
        baselines["models"] = baseline_models(baselines.get("models", ["popularity", "sasrec"]), path)
        vectors = [name for name, _ in baselines["models"] if name != "popularity"]
        for key in ("ensemble", "stack"):
            if baselines.get(key) and len(vectors) < 2:
                raise UserError(f"{path}: baselines.{key} needs two or more of sasrec, gru4rec and caser; "
                                f"baselines.models has {', '.join(vectors) or 'none'}.")
    fusion = fusion_section(config, path, evaluate.get("stages", labels), evaluate.get("protocols", PROTOCOLS), baselines)
    out = Path(output_dir if output_dir is not None else config.get("output_dir", "runs/pipeline"))
    return Pipeline(path, out, str(config.get("model", "smollm2-135m")), seed, shared,
                    config_section(config, "data", path), sft_stages, align_stages, evaluate, baselines, fusion)


def fusion_section(config: dict[str, Any], path: Path, evaluated: list[str], protocols, baselines) -> dict[str, Any] | None:
    """The late-fusion section, checked: evaluated stages (rank protocol) fused with a trained baseline of the pipeline."""
    if "fusion" not in config:
        return None
    fusion = dict(config_section(config, "fusion", path))
    unknown = sorted(set(fusion) - FUSION_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown fusion option(s) {', '.join(unknown)}; known: {', '.join(sorted(FUSION_KEYS))}.")
    models = [name for name, _ in (baselines or {}).get("models", [])]
    if fusion.get("collaborative") not in models or fusion.get("collaborative") == "popularity":
        raise UserError(f"{path}: fusion.collaborative must name a model of the baselines section with item vectors "
                        f"(sasrec, gru4rec or caser), got {fusion.get('collaborative')!r}.")
    stages = fusion.get("stages")
    if not isinstance(stages, list) or not stages or not set(stages) <= set(evaluated) or "rank" not in protocols:
        raise UserError(f"{path}: fusion.stages must list stages the pipeline evaluates with the rank protocol, got {stages!r}.")
    if config.get("evaluate", {}).get("split", "test") == "val":
        raise UserError(f"{path}: fusion chooses its weight on val records; it needs evaluate.split test, not val.")
    fusion["val_limit"] = fusion.get("val_limit", 200)
    if isinstance(fusion["val_limit"], bool) or not isinstance(fusion["val_limit"], int) or fusion["val_limit"] < 1:
        raise UserError(f"{path}: fusion.val_limit must be a positive integer (validation records the weight is chosen on).")
    return fusion


def config_section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' must be a mapping of options.")
    shared = sorted(set(value) & set(SHARED_KEYS))
    if shared:
        raise UserError(f"{path}: set {', '.join(shared)} at the top level of the pipeline, not in '{key}': "
                        "every stage must read the same prompts and records.")
    return value


def stage_sections(config: dict[str, Any], key: str, path: Path, default_name) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) of every stage of section `key`: one mapping or a list of them, each with an optional `name`."""
    value = config.get(key)
    if value is None:
        return []
    sections = value if isinstance(value, list) else [value]
    found = []
    for number, section in enumerate(sections, start=1):
        if not isinstance(section, dict):
            raise UserError(f"{path}: {key} stage {number} must be a mapping of options.")
        options = dict(config_section({key: section}, key, path))
        found.append((str(options.pop("name", default_name(options))), options))
    return found


def parse_training_stages(config: dict[str, Any], path: Path) -> tuple[list, list]:
    """The SFT stages and the align stages, each align stage with the SFT stage it starts from (`from`)."""
    sft_stages = stage_sections(config, "sft", path, lambda options: "sft")
    align_stages = stage_sections(config, "align", path, lambda options: "s-dpo" if options.get("loss", "sdpo") == "sdpo" else "dpo")
    names = [name for name, _ in sft_stages + align_stages]
    for name in names:
        if names.count(name) > 1 or name in RESERVED_NAMES or re.fullmatch(r"checkpoint-\d+", name) or "/" in name or not name:
            raise UserError(f"{path}: stage name {name!r} is taken or not a folder name; give each stage its own name.")
    if align_stages and not sft_stages:
        raise UserError(f"{path}: the align stage starts from the SFT model; add an sft section.")
    for name, options in sft_stages + align_stages:
        if "adapter" in options and set(options) - {"adapter", "from"}:
            raise UserError(f"{path}: stage {name!r} imports a trained adapter (adapter: DIR); it takes no training options "
                            f"({', '.join(sorted(set(options) - {'adapter', 'from'}))}).")
    sft_names = [name for name, _ in sft_stages]
    linked = []
    for name, options in align_stages:
        start = options.pop("from", sft_names[0])
        if start not in sft_names:
            raise UserError(f"{path}: align stage {name!r} starts from {start!r}, which is not an sft stage ({', '.join(sft_names)}).")
        linked.append((name, options, start))
    return sft_stages, linked


def baseline_models(entries: Any, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(model, its own options) per entry of baselines.models: a name, or a mapping with `model` and options."""
    if not isinstance(entries, list):
        raise UserError(f"{path}: baselines.models must be a list, e.g. [popularity, sasrec].")
    models = []
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, str):
            models.append((entry, {}))
        elif isinstance(entry, dict) and isinstance(entry.get("model"), str):
            options = dict(entry)
            models.append((options.pop("model"), options))
        else:
            raise UserError(f"{path}: baselines.models entry {number} must be a model name or a mapping with 'model' "
                            f"(e.g. {{model: sasrec, l2: '1e-4'}}), got {entry!r}.")
    from sdpo.baselines.train import MODELS

    unknown = sorted({name for name, _ in models} - set(MODELS))
    if unknown:
        raise UserError(f"{path}: baselines.models names {', '.join(unknown)}; known: {', '.join(MODELS)}.")
    names = [name for name, _ in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: baselines.models lists {', '.join(repeated)} more than once; each model has one folder.")
    return models


def integer(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{path}: {key} must be an integer, got {value!r}.")
    return value
