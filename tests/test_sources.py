"""Interaction logs, MovieLens-100K and LLaRA folders become records the same checked way."""

import json
import shutil

import pytest

from sdpo.data.datasets import load_split, read_manifest
from sdpo.data.prepare import prepare_dataset
from sdpo.data.sources.interactions import split_users
from sdpo.errors import UserError

N_USERS = 10


def write_log(folder, rows, items, name="interactions.csv"):
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / name
    if name.endswith(".csv"):
        header = list(rows[0])
        log.write_text(",".join(header) + "\n" + "".join(",".join(str(r[h]) for h in header) + "\n" for r in rows))
    else:
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items_file = folder / "items.csv"
    items_file.write_text("item,title\n" + "".join(f'{i},"{t}"\n' for i, t in items.items()))
    return log, items_file


def hand_made(tmp_path):
    """User u<k> rates items k, k+1, ..., k+5 (ids mod 30); timestamps written in reverse to test ordering."""
    rows = []
    for u in range(N_USERS):
        for step in reversed(range(6)):
            rows.append({"user": f"u{u}", "item": (u + step) % 30, "timestamp": 1000 + 10 * step, "rating": 5 if step != 4 else 1})
    items = {i: f"Film {i}" for i in range(30)}
    items[7] = "Film 3"  # two items share a title
    return write_log(tmp_path / "log", rows, items)


def title(item: int) -> str:
    return {3: "Film 3 (#3)", 7: "Film 3 (#7)"}.get(item, f"Film {item}")


def test_hand_made_windows_splits_and_candidates(tmp_path):
    log, items = hand_made(tmp_path)
    manifest = prepare_dataset("interactions", tmp_path / "out", seed=3, interactions=log, items=items, domain="movies")
    # 6 items per user -> windows at t = 3, 4, 5: three records per user
    assert sum(manifest["counts"].values()) == 3 * N_USERS
    assert manifest["users"] == {"train": 8, "val": 1, "test": 1}
    assignment = split_users([f"u{u}" for u in range(N_USERS)], 3)
    for split in ("train", "val", "test"):
        records = load_split(tmp_path / "out", split)
        assert {r.user for r in records} == {u for u, s in assignment.items() if s == split}
        for r in records:
            k, position = int(r.user[1:]), len(r.history)
            assert r.history == [title((k + s) % 30) for s in range(position)]  # time order, not file order
            assert r.target == title((k + position) % 30)
            assert len(r.candidates) == 20 and r.target in r.candidates and not set(r.history) & set(r.candidates)
    titles = {t for s in ("train", "val", "test") for r in load_split(tmp_path / "out", s) for t in r.candidates}
    assert "Film 3 (#3)" in titles and "Film 3 (#7)" in titles and "Film 3" not in titles
    assert manifest["renamed_duplicate_titles"] == 2


def test_min_rating_and_jsonl(tmp_path):
    rows = [{"user": f"u{u}", "item": (u + s) % 30, "timestamp": f"2024-01-0{s + 1}T00:00:00", "rating": 5 if s != 4 else 1}
            for u in range(N_USERS) for s in range(6)]
    log, items = write_log(tmp_path / "j", rows, {i: f"Film {i}" for i in range(30)}, name="log.jsonl")
    manifest = prepare_dataset("interactions", tmp_path / "out", interactions=log, items=items, domain="movies", min_rating=3)
    assert sum(manifest["counts"].values()) == 2 * N_USERS  # 5 items left per user -> windows at t = 3, 4


@pytest.mark.parametrize(
    "rows, items, message",
    [
        ([{"user": "a", "item": 1}], {1: "x"}, "missing column(s) timestamp"),
        ([{"user": "a", "item": 1, "timestamp": "yesterday"}], {1: "x"}, "unparsable timestamp 'yesterday'"),
        ([{"user": "a", "item": 99, "timestamp": 1}], {1: "x"}, "have interactions but no title"),
        ([{"user": "a", "item": 1, "timestamp": 1}], {1: "x"}, "no user has more than 3 interactions"),
    ],
)
def test_bad_logs_are_refused_and_nothing_is_written(tmp_path, rows, items, message):
    log, items_file = write_log(tmp_path / "bad", rows, items)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_dataset("interactions", tmp_path / "out", interactions=log, items=items_file, domain="movies")
    assert not (tmp_path / "out").exists()


def test_bad_encoding_empty_split_and_domain(tmp_path):
    log, items = hand_made(tmp_path)
    (tmp_path / "latin.csv").write_bytes("user,item,timestamp\nJos\xe9,1,1\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare_dataset("interactions", tmp_path / "o", interactions=tmp_path / "latin.csv", items=items, domain="movies")
    with pytest.raises(UserError, match="--domain must be one of"):
        prepare_dataset("interactions", tmp_path / "o", interactions=log, items=items, domain="podcasts")
    rows = [{"user": "u0", "item": s, "timestamp": s} for s in range(25)]
    small_log, small_items = write_log(tmp_path / "one", rows, {i: f"Film {i}" for i in range(40)})
    with pytest.raises(UserError, match="came out empty"):
        prepare_dataset("interactions", tmp_path / "o", interactions=small_log, items=small_items, domain="movies")
    assert not (tmp_path / "o").exists()


def test_movielens_100k(mirror, tmp_path):
    manifest = prepare_dataset("movielens-100k", tmp_path / "ml", mirror=mirror, raw_dir=tmp_path / "raw")
    assert manifest["domain"] == "movies" and manifest["n_items"] == 1682 and manifest["n_users"] == 943
    assert manifest["users"] == {"train": 754, "val": 94, "test": 95}
    counts = manifest["counts"]
    assert sum(counts.values()) == 100_000 - 3 * 943  # every rating after a user's third is one window
    test = load_split(tmp_path / "ml", "test", limit=50)
    assert all(len(r.candidates) == 20 for r in test)
    assert any("(19" in t for r in test for t in r.history)  # titles keep their year


def test_llara_folder_steam(mirror, tmp_path):
    manifest = prepare_dataset("llara", tmp_path / "steam", folder=mirror / "steam", domain="games")
    assert manifest["domain"] == "games" and manifest["n_items"] == 3581
    assert manifest["counts"]["train"] <= 1000 and manifest["counts"]["val"] <= 1184 and manifest["counts"]["test"] <= 1186
    assert read_manifest(tmp_path / "steam")["sources"]["Test_data.df"]["known_as"] == "steam/Test_data.df"


def test_llara_refuses_unknown_pickles(mirror, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(mirror / "steam", folder)
    (folder / "Val_data.df").chmod(0o644)
    (folder / "Val_data.df").write_bytes((mirror / "steam" / "Val_data.df").read_bytes() + b"\n")  # same pickle, another SHA-256
    with pytest.raises(UserError, match="unknown pickle .* pass --trust-pickles"):
        prepare_dataset("llara", tmp_path / "out", folder=folder, domain="games")
    assert not (tmp_path / "out").exists()
    (folder / "id2name.txt").unlink()
    with pytest.raises(UserError, match="missing id2name.txt"):
        prepare_dataset("llara", tmp_path / "out", folder=folder, domain="games", trust_pickles=True)
