"""The ensemble of ID models: weights chosen on val by hand-checkable HR@1, and its pipeline row."""

import json
import math

import pytest
import yaml

from sdpo.baselines.ensemble import choose_weights, ensemble_scores, log_softmax_rows
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.pipeline.config import read_pipeline

RECORDS = [Record(f"r{i}", "u", ["h"], ["t", "a", "b"], "t") for i in range(3)]
# model A is right on the first two records, B on the third; both together, on all three
A = [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
B = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]


def test_log_softmax_rows_by_hand():
    row = log_softmax_rows([[1.0, 0.0]])[0]
    assert row == pytest.approx([1 - math.log(1 + math.e), -math.log(1 + math.e)])


def test_the_weights_with_the_best_val_hr1_are_chosen_the_smallest_among_equals():
    weights, tried = choose_weights(RECORDS, [A, B])
    by_weights = {tuple(row["weights"]): row["hr@1"] for row in tried}
    assert by_weights[(1.0, 0.0)] == pytest.approx(2 / 3) and by_weights[(0.0, 1.0)] == pytest.approx(1 / 3)
    assert by_weights[(1.0, 1.0)] == 1.0
    assert weights == [0.25, 0.25]  # the first of the weight vectors at 1.0: two models, the smallest sum
    assert (0.0, 0.0) not in by_weights and len(tried) == 6 * 6 - 1


def test_ensemble_scores_are_the_weighted_sum_of_log_softmaxed_scores():
    fused = ensemble_scores([A, B], [1.0, 0.5])
    a, b = log_softmax_rows(A), log_softmax_rows(B)
    assert fused[2] == pytest.approx([a[2][c] + 0.5 * b[2][c] for c in range(3)])


def test_a_pipeline_ensemble_needs_two_models_with_vectors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "x"}, "evaluate": {"protocols": []},
                                    "baselines": {"models": ["popularity", "sasrec"], "ensemble": True}}))
    with pytest.raises(UserError, match="two or more"):
        read_pipeline(path)


def test_a_pipeline_adds_the_ensemble_row_and_the_stack_and_reuses_them(small_data, tmp_path):
    from tests.helpers import sdpo

    config = {"data": {"path": str(small_data)}, "evaluate": {"split": "test", "protocols": []},
              "baselines": {"models": ["sasrec", "gru4rec"], "ensemble": True, "stack": True, "l2": "1e-4", "max_epochs": 1,
                            "max_len": 6}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", "e.yaml", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["stage"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert set(rows) == {"sasrec", "gru4rec", "ensemble"}
    ensemble = json.loads((tmp_path / "out" / "baselines" / "ensemble" / "metrics.json").read_text())
    assert set(ensemble["weights"]) == {"sasrec", "gru4rec"} and ensemble["n_records"] == 8 and ensemble["val_records"] == 8
    best = max(row["hr@1"] for row in ensemble["val_tried"])
    assert [row["hr@1"] for row in ensemble["val_tried"] if row["weights"] == list(ensemble["weights"].values())] == [best]
    again = sdpo("pipeline", "e.yaml", "--output_dir", "out", cwd=tmp_path)
    assert again.returncode == 0 and "reusing out/baselines/ensemble" in again.stdout
    assert (tmp_path / "out" / "baselines" / "stack" / "stack.json").is_file() and "reusing out/baselines/stack" in again.stdout
    report = sdpo("report", "out", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| ensemble | rank |" in (tmp_path / "report" / "results.md").read_text()
    # an ensemble whose predictions were cut short is made again, not reused
    cut = tmp_path / "out" / "baselines" / "ensemble" / "predictions.jsonl.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    mended = sdpo("pipeline", "e.yaml", "--output_dir", "out", cwd=tmp_path)
    assert mended.returncode == 0 and "out/baselines/ensemble: its files are damaged" in mended.stdout
    assert "reusing out/baselines/ensemble" not in mended.stdout and "reusing out/baselines/sasrec" in mended.stdout
