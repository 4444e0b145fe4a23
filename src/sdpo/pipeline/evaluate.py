"""Evaluate one model (+ adapter) on a prepared split: what `sdpo evaluate` and every pipeline stage run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdpo.data.datasets import data_fingerprint, load_split, resolve_domain
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.journal import to_float32
from sdpo.evaluation.protocols import PROTOCOLS, SCORES, evaluate
from sdpo.evaluation.results import predictions_file
from sdpo.io import read_jsonl
from sdpo.lm.adapters import adapter_sha256, check_adapter_folder, shared_trunk_depth
from sdpo.lm.trunk import TrunkCache
from sdpo.training.collaborative import check_catalogue, load_collaborative, run_prompts, say_unknown, soft_token_spec, unknown_summary


def evaluate_model(
    data, split, model_name, adapter, protocol, limit, output, batch_size=8, domain=None, prompt_seed=None, progress=True,
    *, subset_seed=0, bf16=None, score="logp", reference_adapter=None, reference_scores=None, retriever=None, top=20,
    reward=True, trunk_cache=None, trunk_depth=None, compress_predictions=False, device=None,
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
    there and reuse it (`sdpo.lm.trunk`); with collaborative tokens, rank only, and only for an
    adapter whose projectors stayed frozen in training. ``compress_predictions`` writes predictions.jsonl.gz. The model runs on
    `device` (default: the GPU if there is one, else the CPU); metrics.json records which, and the batch size.
    """
    from sdpo.lm.models import device_name, evaluation_device, load_model
    from sdpo.lm.precision import model_dtype, resolve_bf16

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
    device = evaluation_device(device)
    bf16 = resolve_bf16(bf16, device)
    trained = _run_settings(adapter)
    source = load_collaborative(trained)
    if source is not None:  # against the data's own catalogue: its training records, which a model of this data was built from
        check_catalogue(source, load_split(data, "train"))
    model, tokenizer = load_model(model_name, adapter, dtype=model_dtype(bf16), soft_tokens=soft_token_spec(trained, source))
    model.to(device)
    prompts = run_prompts(tokenizer, domain, prompt_seed, trained, source)
    if reference_adapter is not None:
        check_adapter_folder(reference_adapter, "reference adapter")
        _check_same_collaborative(trained, source, _run_settings(reference_adapter), reference_adapter)
    reference = None
    if adapter is not None and protocol == "rank" and reward:
        reference = reference_scores if reference_scores is not None else (str(reference_adapter) if reference_adapter else True)
    info = {"model": model_name, "adapter": str(adapter) if adapter else None, "data": str(data), "split": split,
            "limit": limit, "subset_seed": subset_seed, "domain": domain, "prompt_seed": prompt_seed,
            "bf16": bf16, "device": device_name(device), "batch_size": batch_size,
            "reference": _reference_label(adapter, reference_adapter, reference_scores) if reward else None,
            "adapter_sha256": adapter_sha256(adapter) if adapter else None,
            "reference_sha256": adapter_sha256(reference_adapter) if reference_adapter and reward else None,
            "data_sha256": data_fingerprint(data)}
    if source is not None:
        info["collaborative"] = {**source.describe(), **unknown_summary(source, records)}
        say_unknown(source, info["collaborative"], f"the {len(records)} {split} records")
    if protocol == "rerank":
        return _evaluate_rerank(model, tokenizer, records, domain, prompt_seed, prompts, retriever, top, score, batch_size, progress,
                                {**info, "reference": None if score == "logp" else info["reference"]}, output, reference_adapter,
                                compress_predictions)
    trunk = None
    if trunk_cache is not None and source is not None:
        _check_trunk_cache_serves_collaborative(adapter, trained, protocol)
    if trunk_cache is not None:
        if trunk_depth is None:
            trunk_depth = shared_trunk_depth([a for a in (adapter, reference_adapter) if a is not None]) if adapter else None
            if trunk_depth is None:
                raise UserError("--trunk_cache keeps the layers below an adapter's: give an --adapter trained on the last "
                                "layers only (--lora_layers N), and a --reference_adapter of the same kind if any.")
        trunk = TrunkCache(trunk_cache, model, trunk_depth)
    result = evaluate(model, tokenizer, records, domain, protocol, batch_size, prompt_seed, progress, info,
                      score=score, reference=reference, journal_dir=output, trunk=trunk, prompts=prompts)
    result.save(output, compress=compress_predictions)
    return result.metrics


def _evaluate_rerank(model, tokenizer, records, domain, prompt_seed, prompts, retriever, top, score, batch_size, progress, info, output,
                     reference_adapter, compress_predictions) -> dict[str, Any]:
    from sdpo.recommend import Recommender, Retriever, evaluate_rerank

    start = time.perf_counter()
    recommender = Recommender(model, tokenizer, domain, prompt_seed, str(reference_adapter) if reference_adapter else None, prompts)
    result = evaluate_rerank(recommender, Retriever.load(retriever), records, top, score, batch_size, progress)
    result.metrics = {**result.metrics, "n_records": len(records), "protocol": "rerank", "retriever_dir": str(retriever),
                      "seconds": round(time.perf_counter() - start, 2), **info}
    result.save(output, compress=compress_predictions)
    return result.metrics


def _check_trunk_cache_serves_collaborative(adapter, trained: dict[str, Any], protocol: str) -> None:
    """A user error unless a trunk cache serves this collaborative adapter: ranking, with projectors it did not train.

    The soft tokens enter layer 0, and the cache names each batch's file by them (`sdpo.lm.trunk`), so it is exact
    whatever made them; but only projectors that training left as they were (``--no_train_projector``) put the same
    soft tokens in other models' prompts, so that another pass reads the states one pass saved: the align runs' that
    kept them, and, where the SFT run froze them too, the base model's (the reward's reference). Generation from
    collaborative prompts runs every layer (the cache keeps text prompts' passes only).
    """
    if trained.get("collaborative_layer"):  # late injection: the layers below the soft tokens read text, whatever the projectors
        return
    if protocol != "rank":
        raise UserError("--trunk_cache: generating from collaborative prompts runs every layer (the cache keeps text prompts' "
                        "passes); use it with --protocol rank, or leave it out.")
    if trained.get("train_projector", True):
        raise UserError(f"--trunk_cache: {adapter} trained its collaborative tokens' projectors, and those tokens enter at layer 0, "
                        "so no other model's pass shares its trunk states; evaluate it without --trunk_cache "
                        "(or train with --no_train_projector).")


def _reference_label(adapter, reference_adapter, reference_scores) -> str | None:
    if adapter is None:
        return None
    if reference_adapter is not None:
        return str(reference_adapter)
    return "given scores" if reference_scores is not None else "base model"


def _run_settings(adapter) -> dict[str, Any]:
    """The resolved config of the training run that wrote `adapter` ({} for none, or an adapter without one)."""
    from sdpo.training.runs import CONFIG_FILE, read_run_config

    return read_run_config(adapter) if adapter is not None and (Path(adapter) / CONFIG_FILE).is_file() else {}


def _check_same_collaborative(policy: dict[str, Any], source, reference: dict[str, Any], reference_adapter) -> None:
    """A reward compares two models on the same prompts: the reference must read the policy's collaborative tokens (`source`)."""
    keys = ("collaborative_sha256", "collaborative_place", "collaborative_score")
    mine, theirs = ([settings.get(k) for k in keys] if settings.get("collaborative") else None for settings in (policy, reference))
    if mine and theirs and source is not None and source.matches(theirs[0]):  # one model, fingerprinted whole or by its weights
        theirs[0] = mine[0]
    if reference and mine != theirs:
        raise UserError(f"--reference_adapter {reference_adapter} was trained with other collaborative tokens than the adapter "
                        f"({', '.join(keys)}: {theirs} against {mine}); give the SFT run the adapter was aligned from.")


def _settings_of_adapter(adapter, model_name, domain, prompt_seed):
    """(model, domain, prompt_seed): the adapter's training settings, unless given; contradictions refused."""
    from sdpo.training.runs import CONFIG_FILE, read_run_config

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


def in_pinned_precision(metrics: dict[str, Any], bf16: bool | None) -> bool:
    """Whether a finished evaluation's metrics are in the precision a pipeline pins (any, where it pins none): one table, one precision."""
    return bf16 is None or metrics.get("bf16", bf16) == bf16


def read_candidate_logps(folder: str | Path, records: list[Record]) -> list[list[float]] | None:
    """Per record, the log-prob of each candidate (candidate order) from a rank evaluation's predictions; None if they do not cover `records`.

    The values are the float32 log-probs that evaluation computed (its file keeps them as short decimals)."""
    path = predictions_file(folder)
    if not path.is_file():
        return None
    by_id = {row["id"]: {entry["title"]: entry["logp"] for entry in row["ranking"]} for row in read_jsonl(path)}
    try:
        return [[to_float32(by_id[r.id][c]) for c in r.candidates] for r in records]
    except KeyError:
        return None
