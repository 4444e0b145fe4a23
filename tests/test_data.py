import itertools
import json
from collections import Counter

import pytest

from sdpo.data.candidates import record_rng, sample_candidates
from sdpo.data.datasets import load_split, read_manifest, write_prepared
from sdpo.data.records import Record
from sdpo.data.sources.lastfm import read_id2name, sliding_window_users
from sdpo.errors import UserError


def test_lastfm_counts_and_manifest(lastfm_dir):
    manifest = read_manifest(lastfm_dir)
    assert manifest["counts"] == {"train": 47872, "val": 2767, "test": 2495}
    assert manifest["domain"] == "music" and manifest["seed"] == 0 and manifest["n_items"] == 4606
    assert manifest["sources"]["train_data.df"]["sha256"].startswith("7db71a60")
    # LLaRA's Test_data.df / Val_data.df hold one row (the last window) per held-out user: 122 of them
    assert manifest["users"] == {"train": 976, "val": 122, "test": 122}


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_records_know_their_users(lastfm_dir, split):
    """Each recovered user's records are consecutive, start from a 3-item history and grow one item at a time up to 10."""
    records = load_split(lastfm_dir, split)
    runs = [list(group) for _, group in itertools.groupby(records, key=lambda r: r.user)]
    assert len(runs) == len({r.user for r in records}) == 122  # no user comes back after another's records
    for run in runs:
        assert [len(r.history) for r in run] == [min(3 + k, 10) for k in range(len(run))]
        assert all(later.history[-1] == earlier.target for earlier, later in itertools.pairwise(run))


def test_sliding_window_users_by_hand():
    def window(i, history, target):
        return Record(f"r{i}", None, history, ["x", target], target)

    records = [window(0, ["a", "b", "c"], "d"), window(1, ["a", "b", "c", "d"], "e"),  # one user
               window(2, ["a", "b", "c"], "d"),  # the same start again: a new user
               window(3, ["p", "q", "r"], "s"), window(4, ["q", "r", "s"], "t")]  # a full window slides (here at 3 items)
    assert [r.user for r in sliding_window_users(records, "test")] == ["test-user-0", "test-user-0", "test-user-1", "test-user-2",
                                                                       "test-user-2"]


@pytest.mark.parametrize("split, name", [("test", "sdpo-lastfm-test.json"), ("val", "sdpo-lastfm-val.json")])
def test_eval_splits_are_the_papers_records_exactly(lastfm_dir, mirror, split, name):
    paper = json.loads((mirror / "lastfm" / name).read_text(encoding="utf-8"))
    records = load_split(lastfm_dir, split)
    assert len(records) == len(paper)
    for record, row in zip(records, paper, strict=True):
        assert record.history == row["historyList"].split("::")
        assert record.candidates == row["itemList"]
        assert record.target == row["trueSelection"]


def test_train_records(lastfm_dir, mirror):
    titles = set(read_id2name(mirror / "lastfm" / "id2name.txt"))
    train = load_split(lastfm_dir, "train")
    assert all(len(r.candidates) == 20 and len(r.history) >= 3 for r in train)
    assert all(set(r.candidates) <= titles for r in train[:2000])
    assert {r.id for r in train[:3]} == {"train-3", "train-4", "train-5"}
    # the target sits at varied positions, not always first
    assert len(Counter(r.candidates.index(r.target) for r in train[:500])) == 20
    # seeded per record: records sharing a target share few negatives (the leak would give ~6 of 19)
    by_target: dict[str, list[Record]] = {}
    for record in train:
        by_target.setdefault(record.target, []).append(record)
    shared = [len(set(a.negatives) & set(b.negatives)) for rs in by_target.values() if len(rs) > 1 for a, b in [rs[:2]]]
    assert sum(shared) / len(shared) < 0.5


def test_prepare_is_deterministic(lastfm_dir, mirror, tmp_path):
    from sdpo.data.prepare import prepare_dataset

    again = tmp_path / "again"
    prepare_dataset("lastfm", again, seed=0, mirror=mirror, raw_dir=tmp_path / "raw")
    assert (again / "train.jsonl").read_bytes() == (lastfm_dir / "train.jsonl").read_bytes()
    other = tmp_path / "other"
    prepare_dataset("lastfm", other, seed=1, mirror=mirror, raw_dir=tmp_path / "raw")
    assert load_split(other, "train", limit=5) != load_split(again, "train", limit=5)
    assert (other / "test.jsonl").read_bytes() == (again / "test.jsonl").read_bytes()


def test_sample_candidates_excludes_history():
    rng = record_rng(0, 7)
    candidates = sample_candidates(rng, 25, target=3, history=[0, 1, 2, 4, 5])
    assert len(candidates) == 20 and len(set(candidates)) == 20 and 3 in candidates
    assert not {0, 1, 2, 4, 5} & set(candidates)
    with pytest.raises(ValueError, match="only"):
        sample_candidates(rng, 20, target=3, history=[0, 1])


def test_write_prepared_refuses_bad_records_and_writes_nothing(tmp_path):
    good = Record("a", None, ["x"], ["y", "z"], "y")
    bad = Record("b", None, ["x"], ["x", "z"], "z")
    with pytest.raises(UserError, match=r"test record 1 \(id 'b'\): candidate 'x' is inside the history"):
        write_prepared(tmp_path / "out", {"train": [good], "test": [good, bad]}, {"domain": "music"})
    assert list(tmp_path.iterdir()) == []
    write_prepared(tmp_path / "out", {"train": [good]}, {"domain": "music"})
    with pytest.raises(UserError, match="not empty"):
        write_prepared(tmp_path / "out", {"train": [good]}, {"domain": "music"})


def test_a_limited_subset_spans_many_users_and_nests(lastfm_dir):
    """--train_limit 256 draws records from all over the file; the first 256 lines are a few users' windows."""
    from sdpo.data.datasets import subset
    from sdpo.data.records import read_records

    users = {r.id: r.user for r in load_split(lastfm_dir, "train")}  # recovered from the windows (sources/lastfm.py)
    drawn = load_split(lastfm_dir, "train", 256)
    first = read_records(lastfm_dir / "train.jsonl", limit=256)
    assert len({users[r.id] for r in first}) <= 10
    assert len({users[r.id] for r in drawn}) >= 150 and len(drawn) == 256
    assert drawn == load_split(lastfm_dir, "train", 256, seed=0)  # seeded
    assert drawn != load_split(lastfm_dir, "train", 256, seed=1)
    smaller = {r.id for r in load_split(lastfm_dir, "train", 128)}
    assert smaller <= {r.id for r in drawn}  # a smaller draw lies inside a larger one
    ids = [r.id for r in drawn]
    every = load_split(lastfm_dir, "train")
    position = {r.id: i for i, r in enumerate(every)}
    assert [position[i] for i in ids] == sorted(position[i] for i in ids)  # kept in file order
    assert subset(every, None) == every
