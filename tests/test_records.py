import json

import pytest

from sdpo.data.records import Record, read_records, record_problem, write_records
from sdpo.errors import UserError

GOOD = {"id": "r1", "user": None, "history": ["A", "B, the band"], "candidates": ["C", "D", "E"], "target": "D"}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    records = [Record(**GOOD), Record(**{**GOOD, "id": "r2", "user": "u7"})]
    write_records(tmp_path / "x.jsonl", records)
    assert read_records(tmp_path / "x.jsonl") == records
    assert read_records(tmp_path / "x.jsonl", limit=1) == records[:1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target": "Z"}, "not among the candidates"),
        ({"candidates": ["C", "D", "C"]}, "duplicate candidate 'C'"),
        ({"candidates": ["A", "D", "E"]}, "inside the history"),
        ({"history": []}, "empty history"),
        ({"candidates": ["C", " ", "D"]}, "empty title"),
        ({"history": ["A\nB"]}, "line break"),
        ({"candidates": ["D"]}, "at least 2 candidates"),
        ({"history": ["A", 3]}, "must be a string"),
        ({"history": "A"}, "field 'history' has type str"),
        ({"user": 5}, "field 'user' has type int"),
        ({"extra": 1}, "unknown field(s) extra"),
    ],
)
def test_bad_record_is_named_with_file_and_line(tmp_path, change, message):
    bad = {**GOOD, "id": "r2", **change}
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(UserError) as info:
        read_records(path)
    assert f"{path}:2: bad record: " in str(info.value)
    assert message in str(info.value)


def test_missing_field(tmp_path):
    bad = {k: v for k, v in GOOD.items() if k != "target"}
    with pytest.raises(UserError, match=r":1: bad record: missing field\(s\) target"):
        read_records(write_lines(tmp_path / "m.jsonl", [json.dumps(bad)]))


def test_not_json_duplicate_id_empty_and_unreadable(tmp_path):
    with pytest.raises(UserError, match=r"j.jsonl:1: not valid JSON"):
        read_records(write_lines(tmp_path / "j.jsonl", ["{nope"]))
    with pytest.raises(UserError, match=r":2: bad record: duplicate id 'r1'"):
        read_records(write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)] * 2))
    with pytest.raises(UserError, match="holds no records"):
        read_records(write_lines(tmp_path / "e.jsonl", [""]))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).replace("B", "\xe9").encode("latin-1"))
    with pytest.raises(UserError, match="cannot read it as UTF-8"):
        read_records(tmp_path / "latin1.jsonl")
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "absent.jsonl")


def test_valid_record_has_no_problem():
    assert record_problem(Record(**GOOD)) is None
    assert Record(**GOOD).negatives == ["C", "E"]
