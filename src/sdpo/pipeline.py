"""The main job: run the stages a pipeline config lists and print one results table.

A pipeline config (see ``configs/quickstart.yaml``)::

    output_dir: runs/quickstart      # everything goes under here
    model: smollm2-135m              # the base LM
    seed: 0                          # training seed (and the data preparation's)
    prompt_seed: 0                   # prompts, record draws and precision: one setting for
    subset_seed: 0                   #   every stage, so evaluation reads what training read
    bf16: null                       #   (null: on where the hardware computes bf16 natively)
    data: {dataset: lastfm}          # fetch + prepare into OUTPUT/data (or {path: DIR})
    sft: {train_limit: 256, ...}     # any SFTConfig option; output in OUTPUT/sft
    align: {negatives: 3, ...}       # any AlignConfig option, from OUTPUT/sft; output in OUTPUT/<name>
    baselines: {models: [popularity, sasrec], ...}   # any BaselineConfig option; OUTPUT/baselines/NAME
                                     #   (an entry {model: sasrec, l2: "1e-4"} sets options for one model)
    evaluate: {split: test, limit: 200, protocols: [generate, rank]}   # stages: [...] evaluates only those;
                                     #   trunk_cache: false turns the shared-trunk cache off

``sft`` and ``align`` are one stage or a list of them, each named by its ``name`` option
(default: sft; s-dpo or dpo by its loss) and trained into OUTPUT/<name>; an align stage
starts from the SFT stage its ``from`` option names (default: the first). Evaluation covers the
zero-shot base model and every trained stage, protocol by protocol in the order listed; for the rank protocol a trained stage is also
ranked by its reward against its reference (the base model for SFT, the SFT model for an
align stage), from the reference stage's saved log-probs. A stage whose output is complete
is reused, and an interrupted training stage resumes from its last checkpoint, so re-running
a pipeline continues where it stopped; a finished stage trained with other options than the
config now gives is refused, not reused (an unfinished one is checked by ``--resume``). The
evaluations share a trunk cache (OUTPUT/eval/trunk-cache, see `sdpo.trunk`): the decoder
layers that no evaluated adapter changes run once per batch, not once per stage (for
generation: over the prompt); each protocol's part of the cache is removed once every stage
is evaluated with it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from sdpo.config import build_config, read_yaml
from sdpo.datasets import load_split, read_manifest, resolve_domain
from sdpo.errors import UserError
from sdpo.evaluation import PROTOCOLS, evaluate
from sdpo.io import folder_bytes, write_json, write_text_atomic
from sdpo.records import Record
from sdpo.trunk import TrunkCache, shared_trunk_depth

PREPARERS = ("lastfm", "movielens-100k", "interactions", "llara")
SHARED_KEYS = ("domain", "prompt_seed", "subset_seed", "bf16")  # set once, at the top, for every stage
PIPELINE_KEYS = {"output_dir", "model", "seed", "data", "sft", "align", "baselines", "evaluate", *SHARED_KEYS}
EVALUATE_KEYS = {"split", "limit", "protocols", "batch_size", "score", "stages", "trunk_cache"}
TRUNK_CACHE = "trunk-cache"
TABLE_COLUMNS = ("hr@1", "valid_ratio", "strict_hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")


def prepare_dataset(
    dataset: str,
    out: str | Path,
    seed: int = 0,
    mirror=None,
    raw_dir=None,
    overwrite: bool = False,
    *,
    interactions: str | Path | None = None,
    items: str | Path | None = None,
    folder: str | Path | None = None,
    domain: str | None = None,
    min_rating: float | None = None,
    trust_pickles: bool = False,
) -> dict[str, Any]:
    """Build the prepared folder `out` for `dataset`; returns its manifest.

    lastfm and movielens-100k are fetched (or copied from a mirror) first; ``interactions``
    reads the user's files `interactions` + `items`; ``llara`` reads the LLaRA `folder`.
    """
    from sdpo.datasets import write_prepared
    from sdpo.prompts import DOMAINS
    from sdpo.sources.fetch import fetch

    if dataset not in PREPARERS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(PREPARERS)}.")
    if dataset in ("interactions", "llara") and domain not in DOMAINS:
        raise UserError(f"{dataset}: --domain must be one of {', '.join(DOMAINS)}.")
    if dataset == "lastfm":
        from sdpo.sources.lastfm import prepare_lastfm

        splits, manifest = prepare_lastfm(fetch(dataset, raw_dir, mirror), seed)
    elif dataset == "movielens-100k":
        from sdpo.sources.movielens import prepare_movielens

        splits, manifest = prepare_movielens(fetch(dataset, raw_dir, mirror), seed, min_rating)
    elif dataset == "interactions":
        from sdpo.sources.interactions import build_records, parse_interactions, parse_titles

        if not interactions or not items:
            raise UserError("interactions: give both --interactions FILE and --items FILE.")
        splits, info = build_records(parse_interactions(Path(interactions), min_rating), parse_titles(Path(items)), seed)
        manifest = {"dataset": "interactions", "domain": domain, "seed": seed, "min_rating": min_rating,
                    "sources": {"interactions": str(interactions), "items": str(items)}, **info}
    else:
        from sdpo.sources.llara import prepare_llara

        if not folder:
            raise UserError("llara: give the folder with --dir DIR.")
        splits, manifest = prepare_llara(Path(folder), domain, seed, trust_pickles)
    write_prepared(out, splits, manifest, overwrite=overwrite)
    return read_manifest(out)


def evaluate_model(
    data, split, model_name, adapter, protocol, limit, output, batch_size=8, domain=None, prompt_seed=None, progress=True,
    *, subset_seed=0, bf16=None, score="logp", reference_adapter=None, reference_scores=None, retriever=None, top=20,
    reward=True, trunk_cache=None, trunk_depth=None,
) -> dict[str, Any]:
    """Evaluate a model (+ adapter) on a prepared split and save metrics.json / predictions.jsonl.

    With an adapter that a training run wrote, the base model and the prompt settings come
    from its sdpo_config.yaml (a contradicting --model, --domain or --prompt_seed is refused).
    With an adapter, the rank protocol also ranks by reward against the reference: the base
    model, or `reference_adapter`, or `reference_scores` (per record, the reference's log-prob
    of each candidate) when they were computed already; ``reward=False`` skips it. The ``rerank`` protocol re-ranks the
    `top` items a trained baseline (`retriever`) picks from its whole catalogue, against the
    retriever alone (see `sdpo.recommend.evaluate_rerank`). With a `trunk_cache` folder, rank and
    generate keep what the layers below `trunk_depth` (default: the adapter's first layer) compute
    there and reuse it (`sdpo.trunk`).
    """
    from sdpo.evaluation import SCORES
    from sdpo.models import load_model
    from sdpo.precision import model_dtype, resolve_bf16
    from sdpo.runs import adapter_sha256

    if protocol not in (*PROTOCOLS, "rerank"):
        raise UserError(f"unknown protocol {protocol!r}; choose generate, rank or rerank.")
    if (protocol == "rerank") != (retriever is not None):
        raise UserError("--protocol rerank and --retriever DIR go together: the retriever picks what the LM re-ranks.")
    if score not in SCORES:
        raise UserError(f"--score {score!r}: choose logp or reward.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}.")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}.")
    if adapter is None and (score == "reward" or reference_adapter is not None):
        raise UserError("--score reward / --reference_adapter rank by log pi(c|x) - log pi_ref(c|x): give the policy with --adapter DIR.")
    model_name, domain, prompt_seed = _settings_of_adapter(adapter, model_name, domain, prompt_seed)
    domain = resolve_domain(data, domain)
    records = load_split(data, split, limit, subset_seed)
    bf16 = resolve_bf16(bf16)
    model, tokenizer = load_model(model_name, adapter, dtype=model_dtype(bf16))
    if reference_adapter is not None:
        from sdpo.runs import check_adapter_folder

        check_adapter_folder(reference_adapter, "reference adapter")
    reference = None
    if adapter is not None and protocol == "rank" and reward:
        reference = reference_scores if reference_scores is not None else (str(reference_adapter) if reference_adapter else True)
    info = {"model": model_name, "adapter": str(adapter) if adapter else None, "data": str(data), "split": split,
            "limit": limit, "subset_seed": subset_seed, "domain": domain, "prompt_seed": prompt_seed,
            "bf16": bf16, "reference": _reference_label(adapter, reference_adapter, reference_scores) if reward else None,
            "adapter_sha256": adapter_sha256(adapter) if adapter else None,
            "reference_sha256": adapter_sha256(reference_adapter) if reference_adapter and reward else None}
    if protocol == "rerank":
        return _evaluate_rerank(model, tokenizer, records, domain, prompt_seed, retriever, top, score, batch_size, progress,
                                {**info, "reference": None if score == "logp" else info["reference"]}, output, reference_adapter)
    trunk = None
    if trunk_cache is not None:
        if trunk_depth is None:
            trunk_depth = shared_trunk_depth([a for a in (adapter, reference_adapter) if a is not None]) if adapter else None
            if trunk_depth is None:
                raise UserError("--trunk_cache keeps the layers below an adapter's: give an --adapter trained on the last "
                                "layers only (--lora_layers N), and a --reference_adapter of the same kind if any.")
        trunk = TrunkCache(trunk_cache, model, trunk_depth)
    result = evaluate(model, tokenizer, records, domain, protocol, batch_size, prompt_seed, progress, info,
                      score=score, reference=reference, journal_dir=output, trunk=trunk)
    result.save(output)
    return result.metrics


def _evaluate_rerank(model, tokenizer, records, domain, prompt_seed, retriever, top, score, batch_size, progress, info, output,
                     reference_adapter) -> dict[str, Any]:
    from sdpo.recommend import Recommender, Retriever, evaluate_rerank

    start = time.perf_counter()
    recommender = Recommender(model, tokenizer, domain, prompt_seed, str(reference_adapter) if reference_adapter else None)
    result = evaluate_rerank(recommender, Retriever.load(retriever), records, top, score, batch_size, progress)
    result.metrics = {**result.metrics, "n_records": len(records), "protocol": "rerank", "retriever_dir": str(retriever),
                      "seconds": round(time.perf_counter() - start, 2), **info}
    result.save(output)
    return result.metrics


def _reference_label(adapter, reference_adapter, reference_scores) -> str | None:
    if adapter is None:
        return None
    if reference_adapter is not None:
        return str(reference_adapter)
    return "given scores" if reference_scores is not None else "base model"


def _settings_of_adapter(adapter, model_name, domain, prompt_seed):
    """(model, domain, prompt_seed): the adapter's training settings, unless given; contradictions refused."""
    from sdpo.runs import CONFIG_FILE, read_run_config

    if adapter is None or not (Path(adapter) / CONFIG_FILE).is_file():
        return model_name or "smollm2-135m", domain, prompt_seed or 0
    trained = read_run_config(adapter)
    resolved = []
    for flag, mine, key in (("--model", model_name, "model"), ("--domain", domain, "domain"), ("--prompt_seed", prompt_seed, "prompt_seed")):
        theirs = trained.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise UserError(f"{flag} {mine!r} differs from {theirs!r}, which {adapter} was trained with. Leave {flag} out to use the adapter's.")
        resolved.append(mine if mine is not None else theirs)
    model_name, domain, prompt_seed = resolved
    return model_name or "smollm2-135m", domain, prompt_seed or 0


def read_candidate_logps(predictions: str | Path, records: list[Record]) -> list[list[float]] | None:
    """Per record, the log-prob of each candidate (candidate order) from a rank predictions.jsonl; None if it does not cover `records`."""
    path = Path(predictions)
    if not path.is_file():
        return None
    by_id = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_id[row["id"]] = {entry["title"]: entry["logp"] for entry in row["ranking"]}
    try:
        return [[by_id[r.id][c] for c in r.candidates] for r in records]
    except KeyError:
        return None


def _section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' must be a mapping of options.")
    shared = sorted(set(value) & set(SHARED_KEYS))
    if shared:
        raise UserError(f"{path}: set {', '.join(shared)} at the top level of the pipeline, not in '{key}': "
                        "every stage must read the same prompts and records.")
    return value


RESERVED_NAMES = ("zero-shot", "data", "eval", "baselines")


def _stages(config: dict[str, Any], key: str, path: Path, default_name) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) of every stage of section `key`: one mapping or a list of them, each with an optional `name`."""
    value = config.get(key)
    if value is None:
        return []
    sections = value if isinstance(value, list) else [value]
    stages = []
    for number, section in enumerate(sections, start=1):
        if not isinstance(section, dict):
            raise UserError(f"{path}: {key} stage {number} must be a mapping of options.")
        options = dict(_section({key: section}, key, path))
        stages.append((str(options.pop("name", default_name(options))), options))
    return stages


def _training_stages(config: dict[str, Any], path: Path) -> tuple[list, list]:
    """The SFT stages and the align stages, each align stage with the SFT stage it starts from (`from`)."""
    sft_stages = _stages(config, "sft", path, lambda options: "sft")
    align_stages = _stages(config, "align", path, lambda options: "s-dpo" if options.get("loss", "sdpo") == "sdpo" else "dpo")
    names = [name for name, _ in sft_stages + align_stages]
    for name in names:
        if names.count(name) > 1 or name in RESERVED_NAMES or "/" in name or not name:
            raise UserError(f"{path}: stage name {name!r} is taken or not a folder name; give each stage its own name.")
    if align_stages and not sft_stages:
        raise UserError(f"{path}: the align stage starts from the SFT model; add an sft section.")
    sft_names = [name for name, _ in sft_stages]
    linked = []
    for name, options in align_stages:
        start = options.pop("from", sft_names[0])
        if start not in sft_names:
            raise UserError(f"{path}: align stage {name!r} starts from {start!r}, which is not an sft stage ({', '.join(sft_names)}).")
        linked.append((name, options, start))
    return sft_stages, linked


def run_pipeline(path: str | Path) -> list[dict[str, Any]]:
    """Run the pipeline config at `path`; returns the results rows (also saved as results.json/.md)."""
    path = Path(path)
    config = read_yaml(path)
    unknown = sorted(set(config) - PIPELINE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(PIPELINE_KEYS))}.")
    out = Path(config.get("output_dir", "runs/pipeline"))
    base_model = str(config.get("model", "smollm2-135m"))
    seed = _integer(config, "seed", path)
    shared = {"prompt_seed": _integer(config, "prompt_seed", path), "subset_seed": _integer(config, "subset_seed", path),
              "domain": config.get("domain"), "bf16": config.get("bf16")}
    if shared["bf16"] not in (None, True, False):
        raise UserError(f"{path}: bf16 must be true, false or null (null: on where the hardware computes bf16 natively).")
    eval_cfg = _section(config, "evaluate", path)
    unknown = sorted(set(eval_cfg) - EVALUATE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown evaluate option(s) {', '.join(unknown)}; known: {', '.join(sorted(EVALUATE_KEYS))}.")
    if eval_cfg.get("trunk_cache", True) not in (True, False):
        raise UserError(f"{path}: evaluate.trunk_cache must be true or false.")
    sft_stages, align_stages = _training_stages(config, path)
    _baseline_models(_section(config, "baselines", path).get("models", []), path)  # a typo fails now, not hours later
    started = time.perf_counter()

    data_cfg = _section(config, "data", path)
    if "path" in data_cfg:
        data_dir = Path(data_cfg["path"])
        read_manifest(data_dir)
    else:
        data_dir = out / "data"
        if not (data_dir / "manifest.json").is_file():
            dataset = data_cfg.get("dataset", "lastfm")
            print(f"[data] preparing {dataset} into {data_dir}")
            prepare_dataset(dataset, data_dir, seed=seed, mirror=data_cfg.get("mirror"))
        else:
            print(f"[data] reusing {data_dir}")
    shared["domain"] = resolve_domain(data_dir, shared["domain"])

    from sdpo.runs import adapter_sha256
    from sdpo.training.preference import AlignConfig, run_align
    from sdpo.training.sft import SFTConfig, run_sft

    # (label, adapter folder, label of the stage whose log-probs are its reference)
    models: list[tuple[str, str | None, str | None]] = [("zero-shot", None, None)]
    common = {"model": base_model, "data": str(data_dir), "seed": seed, **shared}
    for name, options in sft_stages:
        models.append((name, str(_run_training_stage(name, SFTConfig, run_sft, {**common, **options}, out / name, path)), "zero-shot"))
    for name, options, start in align_stages:
        # the SFT adapter's hash: a stage trained from an SFT run that was trained again since is not reused
        section = {**common, "sft": str(out / start), "sft_sha256": adapter_sha256(out / start), **options}
        models.append((name, str(_run_training_stage(name, AlignConfig, run_align, section, out / name, path)), start))

    protocols = eval_cfg.get("protocols", list(PROTOCOLS))
    split, limit = eval_cfg.get("split", "test"), eval_cfg.get("limit")
    evaluated = eval_cfg.get("stages", [label for label, _, _ in models])
    unknown = sorted(set(evaluated) - {label for label, _, _ in models})
    if unknown:
        raise UserError(f"{path}: evaluate.stages names {', '.join(unknown)}, which the pipeline has no stage of.")
    # the layers no evaluated adapter changes run once per batch for all stages (sdpo.trunk)
    trunk_dir, trunk_depth = out / "eval" / TRUNK_CACHE, None
    if eval_cfg.get("trunk_cache", True) and {"rank", "generate"} & set(protocols):
        trunk_depth = shared_trunk_depth([a for label, a, _ in models if label in evaluated and a])
        print(f"[evaluate] layers 0-{trunk_depth - 1} are shared by every stage and computed once (trunk cache)" if trunk_depth
              else "[evaluate] no trunk cache (no evaluated adapter, or one that changes the first layer or every layer)")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for protocol in protocols:
        for label, adapter, reference_label in models:
            if label not in evaluated:
                continue
            target = out / "eval" / f"{label}-{protocol}"
            metrics = _finished_evaluation(target, adapter)
            if metrics is not None:
                print(f"[evaluate] reusing {target}")
            else:
                print(f"[evaluate] {label}, {protocol} protocol, {split} split")
                # a stage's reward needs its reference stage's log-probs: free when that stage is evaluated too
                reward = reference_label in evaluated and protocol == "rank"
                reference_scores = None
                if reward:
                    records = load_split(data_dir, split, limit, shared["subset_seed"])
                    reference_scores = read_candidate_logps(out / "eval" / f"{reference_label}-rank" / "predictions.jsonl", records)
                metrics = evaluate_model(
                    data_dir, split, base_model, adapter, protocol, limit, target, eval_cfg.get("batch_size", 8),
                    shared["domain"], shared["prompt_seed"], subset_seed=shared["subset_seed"], bf16=shared["bf16"],
                    score=eval_cfg.get("score", "logp"), reference_scores=reference_scores, reward=reward,
                    trunk_cache=trunk_dir / protocol if trunk_depth else None, trunk_depth=trunk_depth,
                )
            results[label, protocol] = metrics
        _remove_trunk_cache(trunk_dir / protocol, f"every stage is evaluated with {protocol}")
    _remove_trunk_cache(trunk_dir, "every stage is evaluated")
    rows = []
    for label, _, _ in models:  # the table: stage by stage
        for protocol in protocols:
            if (label, protocol) in results:
                rows.append({**results[label, protocol], "stage": label})
                if "reward_hr@1" in results[label, protocol]:
                    rows.append({**reward_row(results[label, protocol]), "stage": label})
    rows.extend(_run_baselines(config, path, out, data_dir, seed, split, limit, shared["subset_seed"]))
    table = results_table(rows)
    write_json(out / "results.json", rows)
    write_text_atomic(out / "results.md", table + "\n")
    print(table)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; results in {out / 'results.md'}")
    return rows


def _remove_trunk_cache(folder: Path, why: str) -> None:
    if folder.exists():
        size = folder_bytes(folder)
        shutil.rmtree(folder)
        print(f"[evaluate] {why}: removed the trunk cache {folder} ({size / 1e9:.2f} GB)")


def _finished_evaluation(target: Path, adapter: str | None) -> dict[str, Any] | None:
    """The metrics of a finished evaluation of this very adapter in `target` (None: evaluate it)."""
    from sdpo.runs import adapter_sha256

    if not (target / "metrics.json").is_file():
        return None
    metrics = json.loads((target / "metrics.json").read_text())
    if adapter is not None and metrics.get("adapter_sha256", "unrecorded") not in ("unrecorded", adapter_sha256(adapter)):
        print(f"[evaluate] {target} evaluated another adapter of that stage (it was trained again since): evaluating again")
        return None
    return metrics


def _integer(config: dict[str, Any], key: str, path: Path) -> int:
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{path}: {key} must be an integer, got {value!r}.")
    return value


def reward_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rank metrics by reward, under the plain metric names, as a row of its own (protocol rank-reward)."""
    row = {k: v for k, v in metrics.items() if k not in TABLE_COLUMNS and not k.startswith("reward_") and k != "ci95"}
    row.update({k[len("reward_"):]: v for k, v in metrics.items() if k.startswith("reward_")})
    row["ci95"] = {k[len("reward_"):]: v for k, v in metrics["ci95"].items() if k.startswith("reward_")}
    row["protocol"] = "rank-reward"
    row["valid_ratio"] = 1.0
    return row


def _run_baselines(config, path, out, data_dir, seed, split, limit, subset_seed) -> list[dict[str, Any]]:
    """Rows for the classic recommenders, evaluated on the same split and records as the LMs."""
    if "baselines" not in config:
        return []
    from sdpo.baselines.train import CHECKPOINT, BaselineConfig, run_baseline

    section = dict(_section(config, "baselines", path))
    rows = []
    for name, options in _baseline_models(section.pop("models", ["popularity", "sasrec"]), path):
        target = out / "baselines" / name
        if (target / "metrics.json").is_file():
            print(f"[baseline] reusing {target}")
            metrics = json.loads((target / "metrics.json").read_text())
        else:
            resume = (target / CHECKPOINT).is_file()
            print(f"[baseline] {name}" + (" (resuming)" if resume else ""))
            values = {"data": str(data_dir), "seed": seed, "eval_split": split, "eval_limit": limit, "subset_seed": subset_seed,
                      **section, **options, "model": name, "output_dir": str(target), "resume": resume, "overwrite": True}
            metrics = run_baseline(build_config(BaselineConfig, values, where=f"{path}: baselines"))
        rows.append({**metrics, "stage": name, "protocol": "rank"})
    return rows


def _baseline_models(entries: Any, path: Path) -> list[tuple[str, dict[str, Any]]]:
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
    names = [name for name, _ in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: baselines.models lists {', '.join(repeated)} more than once; each model has one folder.")
    return models


def _run_training_stage(name: str, config_cls, runner, values: dict[str, Any], out: Path, path: Path) -> Path:
    """Run a training stage into `out`, reusing a finished run and resuming an interrupted one."""
    from sdpo.runs import CONFIG_FILE, changed_training_options, read_run_config

    values = {**values, "output_dir": str(out)}
    if (out / CONFIG_FILE).is_file() and (out / "adapter_config.json").is_file():
        changed = changed_training_options(read_run_config(out), build_config(config_cls, values, where=f"{path}: {name}"))
        if changed:
            raise UserError(f"{path}: stage {name}: {out} was trained with other options ({'; '.join(changed)}). "
                            f"Set them back to reuse it, or remove {out} to train the stage again.")
        print(f"[{name}] reusing {out}")
        return out
    values["resume"] = out.is_dir() and any(out.glob("checkpoint-*"))
    values["overwrite"] = True  # the pipeline owns this folder (e.g. a reference table left by a crash)
    print(f"[{name}] training into {out}" + (" (resuming)" if values["resume"] else ""))
    return runner(build_config(config_cls, values, where=f"{path}: {name}"))


def format_metric(row: dict[str, Any], column: str) -> str:
    """A metric cell: the value, and its 95% interval for the HR@1 columns."""
    if column not in row:
        return "–"
    cell = f"{row[column]:.4f}"
    interval = row.get("ci95", {}).get(column)
    if interval is not None and column in ("hr@1", "strict_hr@1"):
        cell += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return cell


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, protocol), the metrics each protocol has, 95% intervals beside HR@1."""
    header = ["stage", "protocol", "n", *TABLE_COLUMNS, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["stage"], row["protocol"], str(row["n_records"])]
        cells += [format_metric(row, c) for c in TABLE_COLUMNS]
        cells.append(f"{row.get('seconds', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
