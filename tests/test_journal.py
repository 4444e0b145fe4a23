"""The evaluation journal and the compact float32 scores that journals and predictions files keep."""

import gzip
import json
import random
import struct

from sdpo.evaluation.journal import JOURNAL_FILE, PLAIN_JOURNAL_FILE, Journal, float32_compact, to_float32
from sdpo.evaluation.results import Evaluation
from sdpo.io import read_jsonl


def float32_values(count: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [struct.unpack("f", struct.pack("f", rng.gauss(-12.0, 8.0)))[0] for _ in range(count)]


def test_compact_scores_give_back_the_same_float32_in_fewer_characters():
    values = float32_values(20_000) + [0.0, -0.0, 1e-30, -3.0e38, 0.1]
    compact = float32_compact(values)
    assert [to_float32(x) for x in compact] == [to_float32(x) for x in values]
    assert len(json.dumps(compact)) < 0.7 * len(json.dumps(values))
    assert float32_compact({"a": [1.5, "text", 2, True, None]}) == {"a": [1.5, "text", 2, True, None]}
    assert float32_compact(float("inf")) == float("inf") and float32_compact(1e39) == 1e39


def test_a_journal_reads_back_what_it_was_given_as_float32_and_drops_a_cut_batch(tmp_path):
    path = tmp_path / JOURNAL_FILE
    settings = {"model": "tiny", "records": ["a", "b", "c"]}
    journal = Journal(path, settings)
    first, second = float32_values(20, 1), float32_values(20, 2)
    journal.add("logp", [("a", first), ("b", second)])
    journal.add("text", [("a", "Glee Cast")])
    member = gzip.compress(json.dumps({"kind": "logp", "id": "c", "value": float32_values(20, 3)}).encode() + b"\n", mtime=0)
    with open(path, "ab") as f:  # a kill while the next batch was being written: its line is not whole
        f.write(member[: len(member) // 2])
    again = Journal(path, settings)
    assert len(again) == 3 and again.get("logp", "c") is None
    assert [to_float32(x) for x in again.get("logp", "a")] == first
    assert [to_float32(x) for x in again.get("logp", "b")] == second
    assert again.get("text", "a") == "Glee Cast"
    assert again.get("logp", "a") == journal.get("logp", "a")  # an uninterrupted run reads the same values
    assert len(Journal(path, {**settings, "model": "other"})) == 0  # other settings: started over


def test_an_older_plain_journal_is_read_once_and_rewritten_compressed(tmp_path):
    settings = {"model": "tiny"}
    values = float32_values(5)
    plain = tmp_path / PLAIN_JOURNAL_FILE
    plain.write_text(json.dumps({"settings": settings}) + "\n" + json.dumps({"kind": "logp", "id": "a", "value": values}) + "\n")
    journal = Journal(tmp_path / JOURNAL_FILE, settings)
    assert [to_float32(x) for x in journal.get("logp", "a")] == values
    assert not plain.exists() and (tmp_path / JOURNAL_FILE).is_file()


def test_predictions_keep_scores_as_compact_float32(tmp_path):
    values = float32_values(20)
    row = {"id": "test-0", "rank": 1, "ranking": [{"title": str(i), "logp": v} for i, v in enumerate(values)]}
    for journal in (JOURNAL_FILE, PLAIN_JOURNAL_FILE):
        (tmp_path / journal).write_text("")
    Evaluation({"hr@1": 1.0}, [row]).save(tmp_path, compress=True)
    assert not (tmp_path / JOURNAL_FILE).exists() and not (tmp_path / PLAIN_JOURNAL_FILE).exists()
    (saved,) = read_jsonl(tmp_path / "predictions.jsonl.gz")
    assert [to_float32(entry["logp"]) for entry in saved["ranking"]] == values
    assert saved["ranking"][0]["logp"] == float32_compact(values[0])
