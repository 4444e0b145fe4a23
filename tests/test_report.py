"""sdpo report on small fake pipeline folders: every file, numbers recomputed from the records, clear errors."""

import csv
import gzip
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from sdpo.errors import UserError
from sdpo.evaluation.stats import paired_difference
from sdpo.report import comparisons, load_run, write_report
from sdpo.report.tables import across_runs

N = 40
REPO = Path(__file__).resolve().parents[1]


def fake_pipeline(folder, seed: int = 0):
    """A finished pipeline's files: zero-shot, sft, dpo (K=1), s-dpo-k7, s-dpo-k3 and popularity, N records each."""
    rng = random.Random(seed)
    ids = [f"test-{i}" for i in range(N)]
    strength = {"zero-shot": 0.05, "sft": 0.1, "dpo": 0.2, "s-dpo-k7": 0.4, "s-dpo-k3": 0.35, "popularity": 0.25}
    rows = []

    def ranks(stage):
        return [1 if rng.random() < strength[stage] else rng.randint(2, 20) for _ in ids]

    def write_jsonl(path, items):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))

    for stage in ("zero-shot", "sft", "dpo", "s-dpo-k7", "s-dpo-k3"):  # K=7 first: comparisons order by K, not by listing
        logp, reward = ranks(stage), ranks(stage)
        trained = stage != "zero-shot"
        write_jsonl(folder / "eval" / f"{stage}-rank" / "predictions.jsonl", [
            {"id": i, "rank": a, **({"logp_rank": a, "reward_rank": b} if trained else {}), "ranking": []}
            for i, a, b in zip(ids, logp, reward, strict=True)])
        hits = [rng.random() < strength[stage] for _ in ids]
        write_jsonl(folder / "eval" / f"{stage}-generate" / "predictions.jsonl", [
            {"id": i, "hit": h, "valid": h or rng.random() < 0.5, "strict_hit": h, "strict_valid": True} for i, h in zip(ids, hits, strict=True)])
        rows += [{"stage": stage, "protocol": "generate"}, {"stage": stage, "protocol": "rank"}]
        if trained:
            rows.append({"stage": stage, "protocol": "rank-reward"})
            config = {"model": "tiny", "negatives": {"dpo": 1, "s-dpo-k3": 3, "s-dpo-k7": 7}.get(stage),
                      "loss": {"dpo": "dpo", "s-dpo-k3": "sdpo", "s-dpo-k7": "sdpo"}.get(stage),
                      "sft": str(folder / "sft") if stage != "sft" else None}
            (folder / stage).mkdir(parents=True, exist_ok=True)
            (folder / stage / "sdpo_config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
            log = [{"step": s, "loss": 1.0 / s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "rewards/margins": 0.2 * s,
                    "rewards/accuracies": 0.5, "logps/chosen": -5.0 + s} for s in (1, 2, 3)]
            log.append({"step": 3, "eval_loss": 0.5, "eval_hr@1": 0.2})
            write_jsonl(folder / stage / "log.jsonl", log)
    write_jsonl(folder / "baselines" / "popularity" / "predictions.jsonl", [{"id": i, "rank": r} for i, r in zip(ids, ranks("popularity"), strict=True)])
    rows.append({"stage": "popularity", "protocol": "rank"})
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_report_writes_every_file_from_the_records(tmp_path):
    run = fake_pipeline(tmp_path / "study-lastfm")
    written = write_report([run], tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == sorted(["results.md", "study-lastfm-records.csv.gz", "study-lastfm-hr1.png", "study-lastfm-training.png",
                            "study-lastfm-val-hr1.png", "study-lastfm-hr1-vs-k.png"])
    assert all(p.stat().st_size > 0 for p in written)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written if p.suffix == ".png")
    with gzip.open(tmp_path / "report" / "study-lastfm-records.csv.gz", "rt", newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == ["id", "stage", "protocol", "rank", "hit", "valid"]
    # 5 LM stages x (rank, generate, generate-strict) + 4 trained x rank-reward + popularity, N records each
    assert len(records) == N * (5 * 3 + 4 + 1)
    # the table's numbers are the CSV's means
    dpo_rank = [int(r["hit"]) for r in records if r["stage"] == "dpo" and r["protocol"] == "rank"]
    text = (tmp_path / "report" / "results.md").read_text()
    assert f"| dpo | rank | {N} | {sum(dpo_rank) / N:.4f} [" in text
    assert "paired HR@1 differences" in text and "![study-lastfm-hr1](study-lastfm-hr1.png)" in text


def test_comparisons_are_paired_on_the_same_records(tmp_path):
    run = load_run(fake_pipeline(tmp_path / "run"))
    rows = {(r["a"], r["b"], r["protocol"]): r for r in comparisons(run)}
    # each trained stage against where it started, each S-DPO stage against each DPO stage and against the fewest negatives,
    # the most negatives against the baseline
    assert {k[:2] for k in rows} == {("sft", "zero-shot"), ("dpo", "sft"), ("s-dpo-k3", "sft"), ("s-dpo-k7", "sft"), ("s-dpo-k3", "dpo"),
                                     ("s-dpo-k7", "dpo"), ("s-dpo-k7", "s-dpo-k3"), ("s-dpo-k7", "popularity")}
    by_key = {(r.stage, r.protocol): r for r in run.results}
    ids = list(by_key[("s-dpo-k3", "rank")].values)
    expected = paired_difference(by_key[("s-dpo-k3", "rank")].column("hr@1", ids), by_key[("dpo", "rank")].column("hr@1", ids))
    got = rows[("s-dpo-k3", "dpo", "rank")]
    assert (got["difference"], got["interval"], got["p_le_0"]) == (expected["difference"], expected["interval"], expected["p_le_0"])
    assert rows[("sft", "zero-shot", "rank-reward")]["b_protocol"] == "rank"  # against what the other model ranks by itself
    assert rows[("s-dpo-k3", "dpo", "rank-reward")]["b_protocol"] == "rank"
    assert {k for k in rows if k[1] == "popularity"} == {("s-dpo-k7", "popularity", "rank"), ("s-dpo-k7", "popularity", "rank-reward")}


def test_comparisons_pair_within_each_family_and_across_families_and_with_late_fusion(tmp_path):
    """A second family (collab-sft and its S-DPO K=3) and a fusion row for each family's S-DPO with the most negatives."""
    folder = fake_pipeline(tmp_path / "run")
    rows = json.loads((folder / "results.json").read_text())
    for stage, config in (("collab-sft", {"model": "tiny"}), ("collab-s-dpo-k3", {"model": "tiny", "loss": "sdpo", "negatives": 3,
                                                                                 "sft": str(folder / "collab-sft")})):
        (folder / stage).mkdir()
        (folder / stage / "sdpo_config.yaml").write_text(yaml.safe_dump(config))
        shutil.copytree(folder / "eval" / "sft-rank", folder / "eval" / f"{stage}-rank")
        rows += [{"stage": stage, "protocol": "rank"}, {"stage": stage, "protocol": "rank-reward"}]
    for stage in ("s-dpo-k7", "collab-s-dpo-k3"):
        shutil.copytree(folder / "baselines" / "popularity", folder / "eval" / f"fusion-{stage}-rank")
        rows.append({"stage": f"fusion-{stage}", "protocol": "rank"})
    (folder / "results.json").write_text(json.dumps(rows))
    pairs = {(r["a"], r["b"]) for r in comparisons(load_run(folder))}
    first_family = {("sft", "zero-shot"), ("dpo", "sft"), ("s-dpo-k3", "sft"), ("s-dpo-k7", "sft"), ("s-dpo-k3", "dpo"), ("s-dpo-k7", "dpo"),
                    ("s-dpo-k7", "s-dpo-k3"), ("s-dpo-k7", "popularity")}
    assert first_family <= pairs
    assert pairs - first_family == {
        ("collab-sft", "zero-shot"), ("collab-s-dpo-k3", "collab-sft"), ("collab-s-dpo-k3", "popularity"),
        ("s-dpo-k7", "fusion-s-dpo-k7"), ("collab-s-dpo-k3", "fusion-collab-s-dpo-k3"), ("collab-s-dpo-k3", "s-dpo-k7")}


def test_a_pipeline_that_has_not_finished_is_reported_from_its_finished_evaluations(tmp_path, capsys):
    """A study takes hours: its finished evaluations can be reported before the pipeline writes results.json."""
    run = fake_pipeline(tmp_path / "run")
    (run / "results.json").unlink()
    for name, metrics in (("sft-rank", {"hr@1": 0.1}), ("sft-generate", {"hr@1": 0.1}), ("dpo-rank", {"hr@1": 0.2, "reward_hr@1": 0.2})):
        (run / "eval" / name / "metrics.json").write_text(json.dumps(metrics))
    (run / "baselines" / "popularity" / "metrics.json").write_text(json.dumps({"hr@1": 0.25}))
    shutil.copytree(run / "eval" / "sft-rank", run / "eval" / "dpo-rank-val")  # a fusion weight's val ranking: no results row
    (run / "eval" / "s-dpo-k3-rank" / "metrics.json").write_text("{}")
    (run / "eval" / "s-dpo-k3-rank" / "predictions.jsonl").rename(run / "eval" / "s-dpo-k3-rank" / "progress.jsonl")  # under way
    loaded = load_run(run)
    assert [(r.stage, r.protocol) for r in loaded.results] == [("dpo", "rank"), ("dpo", "rank-reward"), ("sft", "generate"),
                                                               ("sft", "rank"), ("popularity", "rank")]
    assert "the 5 evaluations finished so far" in capsys.readouterr().out
    write_report([run], tmp_path / "out")
    assert "| dpo | sft | rank |" in (tmp_path / "out" / "results.md").read_text()


def test_finished_evaluations_are_the_rows_of_every_committed_study():
    from sdpo.report.loading import finished_evaluations

    studies = sorted(REPO.glob("studies/*/results.json"))
    assert len(studies) >= 5
    for summary in studies:
        rows = {(row["stage"], row["protocol"]) for row in json.loads(summary.read_text())}
        assert {(row["stage"], row["protocol"]) for row in finished_evaluations(summary.parent)} == rows, summary.parent.name


def test_report_refuses_incomplete_run_folders(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        write_report([tmp_path], tmp_path / "out")
    run = fake_pipeline(tmp_path / "run")
    (run / "eval" / "sft-generate" / "predictions.jsonl").unlink()
    with pytest.raises(UserError, match="sft-generate/predictions.jsonl: missing"):
        write_report([run], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written when a folder is incomplete


def test_a_stage_keeps_its_colour_in_every_training_panel(tmp_path, monkeypatch):
    """SFT logs only its loss; the align stages must not shift colours in the reward panels."""
    import sdpo.report.plots as report

    run = fake_pipeline(tmp_path / "run")
    (run / "sft" / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    figures = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figures.append(fig))
    assert report.plot_training_curves(load_run(run), tmp_path / "curves.png")
    colours = {}
    for ax in figures[0].axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"sft", "dpo", "s-dpo-k7", "s-dpo-k3"} and all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == 4


def with_users(folder, users):
    """Give a fake run the split it evaluated: data/test.jsonl naming each record's user, and an eval metrics.json pointing there."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    candidates = [f"item {j}" for j in range(20)]
    data.joinpath("test.jsonl").write_text("".join(
        json.dumps({"id": f"test-{i}", "user": user, "history": ["item 30", "item 31", "item 32"], "candidates": candidates,
                    "target": "item 0"}) + "\n" for i, user in enumerate(users)))
    (folder / "eval" / "sft-rank" / "metrics.json").write_text(json.dumps({"data": str(data), "split": "test", "hr@1": 0.1}))
    return folder


def test_records_sharing_users_get_per_user_intervals(tmp_path):
    users = [f"user-{i % 5}" for i in range(N)]
    folder = with_users(fake_pipeline(tmp_path / "study-ml100k"), users)
    run = load_run(folder)
    assert run.users == {f"test-{i}": users[i] for i in range(N)}
    by_key = {(r.stage, r.protocol): r for r in run.results}
    ids = list(by_key[("s-dpo-k7", "rank")].values)
    expected = paired_difference(by_key[("s-dpo-k7", "rank")].column("hr@1", ids), by_key[("dpo", "rank")].column("hr@1", ids),
                                 groups=[run.users[i] for i in ids])
    row = next(r for r in comparisons(run) if (r["a"], r["b"], r["protocol"]) == ("s-dpo-k7", "dpo", "rank"))
    assert (row["user_interval"], row["user_p_le_0"]) == (expected["interval"], expected["p_le_0"])
    write_report([folder], tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert f"the {N} evaluated records come from 5 users" in text
    assert text.count("per-user 95% CI") == 3  # the stage table, the paired differences, every metric
    with gzip.open(tmp_path / "report" / "study-ml100k-records.csv.gz", "rt", newline="") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == ["id", "stage", "protocol", "rank", "hit", "valid", "user"]
    assert {r["user"] for r in records if r["id"] == "test-7"} == {"user-2"}


@pytest.mark.parametrize("users", [[None] * N, [f"user-{i}" for i in range(N)]], ids=["unknown", "one record each"])
def test_no_per_user_intervals_without_shared_users(tmp_path, users):
    run = load_run(with_users(fake_pipeline(tmp_path / "run"), users))
    assert run.users is None
    assert "user_interval" not in comparisons(run)[0]


FAKE_STUDY = {"output_dir": "runs/fake", "sft": {"name": "sft"}, "evaluate": {"split": "test"}, "baselines": {"models": ["popularity"]},
              "align": [{"name": "dpo", "loss": "dpo", "negatives": 1}, {"name": "s-dpo-k7", "loss": "sdpo", "negatives": 7},
                        {"name": "s-dpo-k3", "loss": "sdpo", "negatives": 3}]}


def tables(results_md):
    """results.md's non-empty lines but its plots (a records table has no training logs to draw) and the one saying where it came from."""
    return [line for line in results_md.read_text().splitlines() if line and not line.startswith("![") and "rebuilt from" not in line]


def test_a_records_table_gives_the_run_folders_report(tmp_path):
    """From the CSV and the pipeline config alone: every table, interval and paired difference, to the digit."""
    users = [f"user-{i % 5}" for i in range(N)]
    folder = with_users(fake_pipeline(tmp_path / "study-ml100k"), users)
    write_report([folder], tmp_path / "from-run")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(FAKE_STUDY))
    csv_path = tmp_path / "from-run" / "study-ml100k-records.csv.gz"
    written = write_report([csv_path], tmp_path / "from-csv", config=config)
    assert sorted(p.name for p in written) == sorted(["results.md", "study-ml100k-records.csv.gz", "study-ml100k-hr1.png",
                                                      "study-ml100k-hr1-vs-k.png"])
    assert "study-ml100k: rebuilt from its per-record table" in (tmp_path / "from-csv" / "results.md").read_text()
    assert tables(tmp_path / "from-csv" / "results.md") == tables(tmp_path / "from-run" / "results.md")
    assert (tmp_path / "from-csv" / "study-ml100k-records.csv.gz").read_bytes() == csv_path.read_bytes()
    # without the config: the same stage tables, no paired comparisons
    write_report([csv_path], tmp_path / "bare")
    text = (tmp_path / "bare" / "results.md").read_text()
    assert "| s-dpo-k3 | rank-reward |" in text and "| s-dpo-k7 | dpo |" not in text


def test_a_run_folder_without_its_data_takes_its_users_from_the_data_it_evaluated(tmp_path, monkeypatch, capsys):
    """A study's data/ is not committed: in a fresh checkout --data gives its users, once the fingerprint matches."""
    from sdpo.data.datasets import data_fingerprint

    users = [f"user-{i % 4}" for i in range(N)]
    prepared = with_users(fake_pipeline(tmp_path / "elsewhere"), users) / "data"
    folder = fake_pipeline(tmp_path / "study-lastfm")
    (folder / "eval" / "sft-rank" / "metrics.json").write_text(json.dumps(
        {"data": "data", "split": "test", "data_sha256": data_fingerprint(prepared)}))  # the study's data/ is not here
    write_report([folder], tmp_path / "without")
    assert "users" not in (tmp_path / "without" / "results.md").read_text()
    write_report([folder], tmp_path / "with", data=prepared)
    assert "come from 4 users" in (tmp_path / "with" / "results.md").read_text()
    (prepared / "test.jsonl").write_text((prepared / "test.jsonl").read_text().replace("user-1", "user-9"))
    (tmp_path / "data").mkdir()  # a data/ in the working folder is not the study's data/ either
    (tmp_path / "data" / "test.jsonl").write_text((prepared / "test.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    write_report([folder], tmp_path / "other", data=prepared)
    assert "users" not in (tmp_path / "other" / "results.md").read_text()
    assert "is not the prepared data it evaluated" in capsys.readouterr().out

    # a run older than the fingerprint: only that the data holds every evaluated record can be checked
    shutil.rmtree(tmp_path / "data")  # (such a run's path, read from the working folder as older runs wrote it, is not here)
    (folder / "eval" / "sft-rank" / "metrics.json").write_text(json.dumps({"data": "data", "split": "test"}))
    write_report([folder], tmp_path / "older", data=prepared)
    assert "come from 4 users" in (tmp_path / "older" / "results.md").read_text()
    (prepared / "test.jsonl").write_text("".join((prepared / "test.jsonl").read_text().splitlines(keepends=True)[:-1]))
    write_report([folder], tmp_path / "older-short", data=prepared)
    assert "users" not in (tmp_path / "older-short" / "results.md").read_text()
    assert "records it lacks" in capsys.readouterr().out


def test_a_records_table_without_users_takes_them_from_the_data(tmp_path):
    users = [f"user-{i % 4}" for i in range(N)]
    folder = fake_pipeline(tmp_path / "study-lastfm")
    write_report([folder], tmp_path / "old")  # no users known: no user column
    with_users(folder, users)
    csv_path = tmp_path / "old" / "study-lastfm-records.csv.gz"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(FAKE_STUDY))
    write_report([csv_path], tmp_path / "new", config=config, data=folder / "data")
    assert "come from 4 users" in (tmp_path / "new" / "results.md").read_text()
    with gzip.open(tmp_path / "new" / "study-lastfm-records.csv.gz", "rt", newline="") as f:
        assert {r["user"] for r in csv.DictReader(f) if r["id"] == "test-5"} == {"user-1"}
    (folder / "data" / "test.jsonl").write_text("\n".join((folder / "data" / "test.jsonl").read_text().splitlines()[:3]) + "\n")
    with pytest.raises(UserError, match="record.s. have no user"):
        write_report([csv_path], tmp_path / "none", config=config, data=folder / "data")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("text, message", [
    ("", "no rows or no column"),
    ("id,stage,protocol,rank,hit\ntest-0,sft,rank,1,1\n", r"no column\(s\) valid"),
    ("id,stage,protocol,rank,hit,valid\ntest-0,sft,ranked,1,1,1\n", "unknown protocol 'ranked'"),
    ("id,stage,protocol,rank,hit,valid\ntest-0,sft,rank,first,1,1\n", "not a number"),
    ("id,stage,protocol,rank,hit,valid\ntest-0,sft,generate,,1,1\n", "without the same records' generate-strict rows"),
])
def test_a_bad_records_table_is_refused_before_writing(tmp_path, text, message):
    path = tmp_path / "x-records.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        write_report([path], tmp_path / "out")
    with pytest.raises(UserError, match="no such records table"):
        write_report([tmp_path / "missing-records.csv.gz"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_baselines_only_run_gets_per_user_intervals_and_no_empty_comparison_table(tmp_path):
    """configs/baselines-ml100k.yaml: no LM stage, so no eval folder; the baselines' metrics.json name the split."""
    folder = with_users(fake_pipeline(tmp_path / "baselines"), [f"user-{i % 6}" for i in range(N)])
    (folder / "eval" / "sft-rank" / "metrics.json").rename(folder / "baselines" / "popularity" / "metrics.json")
    for stage_files in [folder / "eval", *(folder / s for s in ("sft", "dpo", "s-dpo-k3", "s-dpo-k7"))]:
        shutil.rmtree(stage_files)
    (folder / "results.json").write_text(json.dumps([{"stage": "popularity", "protocol": "rank"}]))
    run = load_run(folder)
    assert run.baselines == ["popularity"] and run.users is not None and len(set(run.users.values())) == 6
    write_report([folder], tmp_path / "report")
    text = (tmp_path / "report" / "results.md").read_text()
    assert "come from 6 users" in text and "paired HR@1 differences" not in text


def test_a_pipeline_folder_with_compressed_predictions_reports_the_same(tmp_path):
    """Pipelines now write predictions.jsonl.gz (a study folder lives in git); older folders hold predictions.jsonl: one report."""
    from sdpo.io import read_jsonl, write_jsonl

    run = fake_pipeline(tmp_path / "run")
    write_report([run], tmp_path / "plain")
    for path in sorted(run.rglob("predictions.jsonl")):
        write_jsonl(path.with_suffix(".jsonl.gz"), read_jsonl(path))
        path.unlink()
    assert list(run.rglob("predictions.jsonl.gz"))
    write_report([run], tmp_path / "compressed")
    for name in ("results.md", "run-records.csv.gz"):
        assert (tmp_path / "compressed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_stages_of_two_runs_are_compared_on_their_shared_records(tmp_path):
    new, old = fake_pipeline(tmp_path / "new", seed=1), fake_pipeline(tmp_path / "old", seed=2)
    written = write_report([new, old], tmp_path / "report", compare=["new/s-dpo-k7,old/zero-shot"])
    text = (tmp_path / "report" / "results.md").read_text()
    assert "Across runs" in text and written[0].name == "results.md"
    runs = {name: {(r.stage, r.protocol): r for r in load_run(tmp_path / name).results} for name in ("new", "old")}
    rows = {(r["protocol"], r["metric"]): r for r in across_runs([load_run(new), load_run(old)], ["new/s-dpo-k7,old/zero-shot"])}
    # zero-shot has no reward ranking: its log-prob one stands in; a generation is compared by ValidRatio too
    assert set(rows) == {("rank", "hr@1"), ("rank-reward", "hr@1"), ("generate", "hr@1"), ("generate", "valid_ratio")}
    assert rows["rank-reward", "hr@1"]["b_protocol"] == "rank" and rows["rank", "hr@1"]["b_protocol"] == "rank"
    a, b = runs["new"][("s-dpo-k7", "generate")], runs["old"][("zero-shot", "generate")]
    ids = list(a.values)
    for metric, name in (("hr@1", "HR@1"), ("valid_ratio", "ValidRatio")):
        expected = paired_difference([r[metric] for r in map(a.values.get, ids)], [r[metric] for r in map(b.values.get, ids)])
        assert rows["generate", metric]["difference"] == expected["difference"] and rows["generate", metric]["interval"] == expected["interval"]
        assert f"| new/s-dpo-k7 | old/zero-shot | generate, {name} | {N} | {expected['difference']:+.4f} |" in text
    assert rows["generate", "valid_ratio"]["difference"] != rows["generate", "hr@1"]["difference"]


@pytest.mark.parametrize("spec, message", [("new/s-dpo-k7", "two stages"), ("new/s-dpo-k9,old/sft", "no stage 'new/s-dpo-k9'"),
                                           ("other/sft,old/sft", "no stage 'other/sft'")])
def test_a_bad_comparison_across_runs_is_refused_before_writing(tmp_path, spec, message):
    new, old = fake_pipeline(tmp_path / "new", seed=1), fake_pipeline(tmp_path / "old", seed=2)
    with pytest.raises(UserError, match=message):
        write_report([new, old], tmp_path / "report", compare=[spec])
    assert not (tmp_path / "report").exists()
