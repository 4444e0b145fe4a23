"""Titles a collaborative model never saw: the unknown vector learns in training, and every command counts them."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdpo.benchmarks.unknown_titles import UNSEEN, with_unseen_history
from sdpo.data.datasets import load_split
from sdpo.lm.soft_tokens import CollaborativeTokens, SoftTokenSpec
from tests.test_collaborative_runs import sft_run


def unknown_vectors(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "adapter_model.safetensors")).items() if k.endswith(".unknown")}


def test_in_train_mode_a_share_of_known_items_reads_the_unknown_vector_and_none_in_eval_mode():
    tokens = CollaborativeTokens(SoftTokenSpec(dim=4), hidden_size=8, norm=1.0)
    with torch.no_grad():
        tokens.items.unknown.fill_(3.0)  # an unknown row then differs from every known one
    vectors, known = torch.randn(1, 4000, 4), torch.ones(1, 4000, dtype=torch.bool)
    is_user = torch.zeros(1, 4000, dtype=torch.bool)
    unknown_row = tokens.items(torch.full((1, 4), 3.0))[0]
    tokens.unknown_rate = 0.25

    def share_unknown(out):
        return (out[0] - unknown_row).abs().amax(-1).lt(1e-6).float().mean().item()

    torch.manual_seed(0)
    assert share_unknown(tokens.train()(vectors, is_user, known)) == pytest.approx(0.25, abs=0.03)
    assert share_unknown(tokens.eval()(vectors, is_user, known)) == 0.0
    tokens.unknown_rate = 0.0
    assert share_unknown(tokens.train()(vectors, is_user, known)) == 0.0


def test_the_unknown_vector_trains_only_with_a_rate(small_data, sasrec_dir, tmp_path):
    # the collaborative model was trained on these very records: without a rate, no title reads the unknown vector
    plain = unknown_vectors(sft_run(small_data, sasrec_dir, tmp_path / "plain"))
    learned = unknown_vectors(sft_run(small_data, sasrec_dir, tmp_path / "rate", collaborative_unknown_rate=0.3))
    assert plain and all(v.abs().max() == 0 for v in plain.values())
    items = [k for k in learned if ".items." in k]
    assert items and all(learned[k].abs().max() > 0 for k in items)


def test_unseen_history_titles_are_drawn_with_the_seed_and_counted(small_data):
    records = load_split(small_data, "val")
    changed, replaced = with_unseen_history(records, 0.2, seed=1)
    placed = sum(title.startswith(UNSEEN.split("{")[0]) for r in changed for title in r.history)
    assert replaced == placed == sum(round(0.2 * len(r.history)) for r in records) > 0
    assert with_unseen_history(records, 0.2, seed=1)[0] == changed != with_unseen_history(records, 0.2, seed=2)[0]
    assert [(r.candidates, r.target) for r in changed] == [(r.candidates, r.target) for r in records]


PLANTED = ["Planted Band", "Planted Band", "Another Planted Band"]  # 3 occurrences, 2 distinct titles


@pytest.fixture(scope="module")
def planted(small_data, sasrec_dir, tmp_path_factory):
    """A collaborative SFT run, and a prepared folder whose 4 test records are train records (every title known to the
    SASRec, which trained on them) with the planted titles put into their histories."""
    from sdpo.data.datasets import read_manifest, write_prepared
    from sdpo.data.records import Record

    root = tmp_path_factory.mktemp("planted")
    train = load_split(small_data, "train")
    chosen = train[:4]
    test = [Record(r.id, r.user, [*r.history[:-1], PLANTED[i]] if i < len(PLANTED) else r.history, r.candidates, r.target)
            for i, r in enumerate(chosen)]
    data = root / "data"
    write_prepared(data, {"train": train, "val": load_split(small_data, "val"), "test": test},
                   {k: v for k, v in read_manifest(small_data).items() if k != "counts"})
    return {"data": data, "run": sft_run(small_data, sasrec_dir, root / "sft"), "records": test}


def test_an_evaluation_counts_the_planted_unknown_titles_exactly(planted, tmp_path, capsys):
    from sdpo.pipeline import evaluate_model

    metrics = evaluate_model(planted["data"], "test", None, planted["run"], "rank", None, tmp_path, progress=False, bf16=False, reward=False)
    counted = metrics["collaborative"]
    assert (counted["unknown_occurrences"], counted["unknown_titles"]) == (3, 2)
    assert [tuple(entry) for entry in counted["most_common_unknown"]] == [("Planted Band", 2), ("Another Planted Band", 1)]
    assert json.loads((tmp_path / "metrics.json").read_text())["collaborative"]["unknown_occurrences"] == 3
    assert "3 title occurrences (2 distinct titles) of the 4 test records had no id" in capsys.readouterr().err


def test_recommend_names_the_unknown_titles_on_stderr_and_in_each_output_line(planted, tmp_path):
    from tests.helpers import sdpo

    record = planted["records"][0]
    one = sdpo("recommend", "--run", planted["run"], "--history", *record.history, "--candidates", *record.candidates[:3])
    assert one.returncode == 0, one.stderr[-2000:]
    assert "1 titles of 1 queries have no id" in one.stderr and "'Planted Band'" in one.stderr
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": r.id, "history": r.history, "candidates": [*r.candidates[:2], "Unheard Of"]}) + "\n"
                               for r in planted["records"]))
    many = sdpo("recommend", "--run", planted["run"], "--input", queries, "--output", tmp_path / "ranked.jsonl")
    assert many.returncode == 0, many.stderr[-2000:]
    assert "7 titles of 4 queries have no id" in many.stderr
    rows = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert [row["unknown_titles"] for row in rows] == [["Planted Band", "Unheard Of"], ["Planted Band", "Unheard Of"],
                                                       ["Another Planted Band", "Unheard Of"], ["Unheard Of"]]


def foreign_copy(sasrec_dir, out):
    """The SASRec with every title renamed: a model of another catalogue, with the same shapes."""
    shutil.copytree(sasrec_dir, out)
    table = json.loads((out / "items.json").read_text())
    table["titles"] = [f"Foreign title {i}" for i, _ in enumerate(table["titles"])]
    (out / "items.json").write_text(json.dumps(table))
    return out


def test_a_collaborative_model_of_another_catalogue_is_refused_but_recommend_answers(planted, small_data, sasrec_dir, tmp_path):
    import yaml

    from sdpo.baselines.collaborative import model_sha256
    from tests.helpers import sdpo

    foreign = foreign_copy(sasrec_dir, tmp_path / "foreign")
    trained = sdpo("sft", "--model", "tiny", "--data", small_data, "--output_dir", tmp_path / "sft", "--max_steps", "1",
                   "--collaborative", foreign, "--bf16", "false", "--disable_tqdm", "true")
    assert trained.returncode == 2 and "knows 0% of the" in trained.stderr and "sdpo baseline --model sasrec --data DIR" in trained.stderr
    assert len(trained.stderr.strip().splitlines()) == 1 and not (tmp_path / "sft").exists()
    # a run that recorded the foreign model (its config edited, as a user's mix-up would leave it)
    run = tmp_path / "run"
    shutil.copytree(planted["run"], run)
    config = yaml.safe_load((run / "sdpo_config.yaml").read_text())
    config.update(collaborative=str(foreign), collaborative_sha256=model_sha256(foreign))
    (run / "sdpo_config.yaml").write_text(yaml.safe_dump(config))
    evaluated = sdpo("evaluate", "--data", small_data, "--adapter", run, "--output_dir", tmp_path / "eval", "--limit", "2")
    assert evaluated.returncode == 2 and "knows 0% of the" in evaluated.stderr
    aligned = sdpo("align", "--sft", run, "--output_dir", tmp_path / "align", "--max_steps", "1", "--negatives", "1",
                   "--bf16", "false", "--disable_tqdm", "true")
    assert aligned.returncode == 2 and "knows 0% of the" in aligned.stderr
    answered = sdpo("recommend", "--run", run, "--history", "Someone New", "--candidates", "Band A", "Band B")
    assert answered.returncode == 0 and "Band A" in answered.stdout and "Band B" in answered.stdout, answered.stderr[-1000:]
    assert "3 titles of 1 queries have no id" in answered.stderr
