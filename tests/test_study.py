"""A study folder in git: a fresh checkout holding only what git tracks continues the study to the same results."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sdpo.data.datasets import load_split
from sdpo.errors import UserError
from sdpo.evaluation.journal import JOURNAL_FILE, Journal
from sdpo.pipeline.study import gitignore_text, kept_files
from tests.helpers import sdpo


def git(*args, cwd):
    """git as a fresh clone has it: no global or system configuration (a global excludesFile would change what it tracks)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout


def interrupt_at_journal_batch(monkeypatch, number: int) -> None:
    """Stop the process (as Ctrl-C does) right after the `number`-th evaluation batch reached the journal (the reference
    pass, which keeps a journal of its own, not counted)."""
    real_add, calls = Journal.add, []

    def add_then_stop(self, kind, outputs):
        real_add(self, kind, outputs)
        if self.path.name == JOURNAL_FILE:  # an evaluation's journal, not the reference pass's <key>.progress.jsonl.gz
            calls.append(kind)
        if len(calls) == number:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "add", add_then_stop)


def test_a_fresh_checkout_continues_the_study_to_the_same_results(tiny_study, tmp_path, monkeypatch):
    first = tmp_path / "first-checkout"
    first.mkdir()
    shutil.copy(tiny_study.work / "tiny.yaml", first)
    command = ("pipeline", "tiny.yaml", "--output_dir", str(tiny_study.out))
    # zero-shot's ranking takes two batches of the three test records; stop after sft's first
    interrupt_at_journal_batch(monkeypatch, 3)
    stopped = sdpo(*command, cwd=first)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    monkeypatch.undo()
    study = first / tiny_study.out
    assert (study / "eval" / "sft-rank" / "progress.jsonl.gz").is_file() and not (study / "results.json").exists()

    # what git takes: the study's .gitignore decides, and sdpo's own list of kept files agrees with it
    git("init", "-q", cwd=first)
    git("add", "-A", cwd=first)
    tracked = sorted(git("ls-files", cwd=first).split())
    assert sorted(str(p.relative_to(first)) for p in kept_files(study)) == [t for t in tracked if t != "tiny.yaml"]
    assert (study / ".gitignore").read_text() == gitignore_text()
    out = str(tiny_study.out)
    for needed in ("sft/adapter_model.safetensors", "sft/adapter_config.json", "sft/sdpo_config.yaml", "sft/log.jsonl",
                   "dpo/adapter_model.safetensors", "eval/zero-shot-rank/metrics.json", "eval/zero-shot-rank/predictions.jsonl.gz",
                   "eval/sft-rank/progress.jsonl.gz", ".gitignore"):
        assert f"{out}/{needed}" in tracked, needed
    left_out = [p for p in study.rglob("*") if p.is_file() and str(p.relative_to(first)) not in tracked]
    assert any("checkpoint-" in str(p) for p in left_out)  # checkpoints existed and stay out of git
    assert not [t for t in tracked if "checkpoint-" in t or "trunk-cache" in t or t.endswith("reference-train.safetensors")]

    # a fresh checkout: only the tracked files, elsewhere; the same command continues the study
    fresh = tmp_path / "fresh-checkout"
    for name in tracked:
        (fresh / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(first / name, fresh / name)
    continued = sdpo(*command, cwd=fresh)
    assert continued.returncode == 0, continued.stderr[-3000:]
    for reused in ("[sft] reusing", "[dpo] reusing", f"[evaluate] reusing {out}/eval/zero-shot-rank", "[evaluate] continuing: 2 outputs already in"):
        assert reused in continued.stdout, reused

    # ... and reaches what the uninterrupted run reached, file for file
    done, whole = fresh / tiny_study.out, tiny_study.work / tiny_study.out
    assert [str(p.relative_to(done)) for p in kept_files(done)] == [str(p.relative_to(whole)) for p in kept_files(whole)]
    for path in kept_files(whole):
        name = path.relative_to(whole)
        if path.name in ("metrics.json", "results.json"):
            assert without_seconds(json.loads((done / name).read_text())) == without_seconds(json.loads(path.read_text())), name
        elif path.name == "results.md":  # its last column is the wall time
            assert without_seconds_column(done / name) == without_seconds_column(path)
        elif path.name != "log.jsonl":  # the log records wall times
            assert (done / name).read_bytes() == path.read_bytes(), name
    assert (done / "results.md").read_text().count("|") == (whole / "results.md").read_text().count("|")


def without_seconds_column(table: Path) -> list[str]:
    """The rows of a results table without their last cell, the seconds a stage took."""
    return [line.rsplit("|", 2)[0] for line in table.read_text().splitlines()]


def without_seconds(value):
    """A metrics or results value without its wall times (the only numbers a rerun may change)."""
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k not in ("seconds", "l2_search_seconds")}
    return value


def test_a_folder_with_a_users_own_gitignore_is_refused_before_anything_is_written(tmp_path):
    from sdpo.errors import UserError
    from sdpo.pipeline.study import write_gitignore

    write_gitignore(tmp_path / "study")
    write_gitignore(tmp_path / "study")  # ours: kept as it is
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".gitignore").write_text("*.log\n")
    with pytest.raises(UserError, match="not one sdpo wrote"):
        write_gitignore(tmp_path / "mine")
    assert (tmp_path / "mine" / ".gitignore").read_text() == "*.log\n"
    (tmp_path / "study" / ".gitignore").write_text(gitignore_text().replace("!log.jsonl\n", ""))  # an older sdpo's
    write_gitignore(tmp_path / "study")
    assert (tmp_path / "study" / ".gitignore").read_text() == gitignore_text()


def test_evaluation_files_hold_one_form_of_the_predictions(tmp_path):
    """Saving again in the other form removes the first: the folder never offers stale predictions."""
    from sdpo.evaluation.results import Evaluation, predictions_file

    Evaluation({"hr@1": 1.0}, [{"id": "a"}]).save(tmp_path, compress=True)
    assert predictions_file(tmp_path).name == "predictions.jsonl.gz"
    Evaluation({"hr@1": 0.0}, [{"id": "b"}]).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]
    assert predictions_file(tmp_path).read_text() == '{"id": "b"}\n'


def test_a_study_imports_stages_trained_elsewhere_and_generates_with_the_stages_it_names(tiny_study, small_data, tmp_path):
    import yaml

    trained = tiny_study.work / tiny_study.out
    config = {
        "model": "tiny", "prompt_seed": 3, "data": {"path": str(small_data)},
        "sft": [{"name": "text-sft", "adapter": str(trained / "sft")}],
        "align": [{"name": "text-dpo", "from": "text-sft", "adapter": str(trained / "dpo")}],
        "evaluate": {"split": "test", "limit": 3, "protocols": ["rank", "generate"], "stages": ["text-sft", "text-dpo"],
                     "generate_stages": ["text-sft"], "batch_size": 2},
    }
    (tmp_path / "imported.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", "imported.yaml", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert "[text-sft] importing" in result.stdout and "training into" not in result.stdout
    assert (out / "text-dpo" / "adapter_model.safetensors").read_bytes() == (trained / "dpo" / "adapter_model.safetensors").read_bytes()
    assert yaml.safe_load((out / "text-dpo" / "sdpo_config.yaml").read_text())["sft"] == "text-sft"  # relative to the study folder
    rows = {(row["stage"], row["protocol"]) for row in json.loads((out / "results.json").read_text())}
    assert {("text-sft", "generate"), ("text-dpo", "rank-reward")} <= rows and ("text-dpo", "generate") not in rows
    # the imported stages score as they did where they were trained (same records, prompts and weights)
    here = json.loads((out / "eval" / "text-dpo-rank" / "metrics.json").read_text())
    there = json.loads((trained / "eval" / "dpo-rank" / "metrics.json").read_text())
    assert here["reward_hr@1"] == there["reward_hr@1"] and here["mrr"] == there["mrr"]

    # git keeps the imported stages' configs but not their weights (the source's bytes), as kept_files says ...
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", "out", cwd=tmp_path)
    tracked = sorted(git("ls-files", cwd=tmp_path).split())
    assert sorted(str(p.relative_to(tmp_path)) for p in kept_files(out, ["text-sft", "text-dpo"])) == tracked
    assert "out/text-dpo/sdpo_config.yaml" in tracked and "out/eval/text-dpo-rank/metrics.json" in tracked
    assert not [name for name in tracked if name.endswith(".safetensors")]
    # ... and a fresh checkout copies them again and reuses every evaluation
    fresh = tmp_path / "fresh"
    for name in tracked:
        (fresh / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp_path / name, fresh / name)
    again = sdpo("pipeline", str(tmp_path / "imported.yaml"), "--output_dir", "out", cwd=fresh)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[text-dpo] importing" in again.stdout and "[evaluate] reusing out/eval/text-dpo-rank" in again.stdout
    assert without_seconds(json.loads((fresh / "out" / "results.json").read_text())) == without_seconds(json.loads((out / "results.json").read_text()))
    assert (fresh / "out" / "text-dpo" / "adapter_model.safetensors").read_bytes() == (trained / "dpo" / "adapter_model.safetensors").read_bytes()

    # an align stage imported onto an SFT stage it was not trained from is refused
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-sft"
    shutil.copytree(trained / "sft", other)
    weights = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "adapter_model.safetensors"))
    config["sft"] = [{"name": "text-sft", "adapter": str(other)}]
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(config))
    wrong = sdpo("pipeline", "wrong.yaml", "--output_dir", "wrong", cwd=tmp_path)
    assert wrong.returncode == 2 and "was not trained from the weights of stage text-sft" in wrong.stderr + wrong.stdout


def test_only_an_imported_stages_weights_are_left_to_be_copied_again_whatever_its_name(tmp_path):
    """Stage names are literal in the .gitignore: an imported 'a*b' leaves out its own weights, not those of a trained 'axb'."""
    from sdpo.pipeline.study import write_gitignore

    imported = ["a*b", "#c", "!d", "sft"]
    study = tmp_path / "study"
    write_gitignore(study, imported)
    for stage in [*imported, "axb", "dpo"]:
        for name in ("adapter_model.safetensors", "sdpo_config.yaml", "collaborative/model.safetensors", "collaborative/config.json"):
            (study / stage / name).parent.mkdir(parents=True, exist_ok=True)
            (study / stage / name).write_text(stage)
    git("init", "-q", cwd=tmp_path)
    git("add", "-A", cwd=tmp_path)
    tracked = sorted(git("ls-files", cwd=tmp_path).splitlines())
    assert sorted(str(p.relative_to(tmp_path)) for p in kept_files(study, imported)) == tracked
    assert "study/axb/adapter_model.safetensors" in tracked and "study/dpo/collaborative/model.safetensors" in tracked
    assert "study/a*b/sdpo_config.yaml" in tracked and "study/a*b/adapter_model.safetensors" not in tracked
    assert not [name for name in tracked if name.startswith(("study/sft/collaborative", "study/#c/adapter", "study/!d/adapter"))]


def test_files_too_large_to_commit_are_named(tmp_path, capsys):
    from sdpo.pipeline.study import warn_about_large_files, write_gitignore

    write_gitignore(tmp_path)
    sizes = {"sft/adapter_model.safetensors": 9 << 20, "dpo/adapter_model.safetensors": 6 << 20,
             "eval/sft-rank/predictions.jsonl.gz": (1 << 20) + 1, "eval/dpo-rank/predictions.jsonl.gz": 900 << 10,
             "checkpoint-8/adapter_model.safetensors": 20 << 20}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    large = warn_about_large_files(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in large) == ["eval/sft-rank/predictions.jsonl.gz", "sft/adapter_model.safetensors"]
    said = capsys.readouterr().out
    assert "over the 8 MiB" in said and "adapter_dtype: bf16" in said and "over the 1 MiB" in said


def test_only_a_folder_git_would_carry_is_committable(tmp_path):
    """The large-file warning is for study folders: not for one outside a repository, nor one its .gitignore leaves out."""
    from sdpo.pipeline.study import committable

    outside = tmp_path / "outside"
    outside.mkdir()
    assert not committable(outside)
    repo = tmp_path / "repo"
    (repo / "runs" / "quickstart").mkdir(parents=True)
    (repo / "studies" / "x").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/runs/\n")
    assert committable(repo / "studies" / "x")
    assert not committable(repo / "runs" / "quickstart")


def finished_evaluation(folder: Path, **metrics) -> list:
    """A finished evaluation of two records in `folder` (metrics.json and predictions.jsonl.gz); returns the records."""
    from sdpo.data.records import Record
    from sdpo.evaluation.results import Evaluation

    records = [Record(f"r{i}", None, ["a"], ["b", "c"], "b") for i in range(2)]
    Evaluation({"hr@1": 0.5, "n_records": 2, "data_sha256": "d1", **metrics}, [{"id": r.id, "hit": True} for r in records]).save(
        folder, compress=True)
    return records


def test_an_evaluation_in_another_precision_than_the_pipeline_pins_is_redone(tmp_path):
    from sdpo.pipeline.run import _finished_evaluation

    records = finished_evaluation(tmp_path, bf16=True)
    assert _finished_evaluation(tmp_path, None, True, records, "d1")["hr@1"] == 0.5
    assert _finished_evaluation(tmp_path, None, None, records, "d1")["hr@1"] == 0.5  # not pinned: whatever it ran in
    assert _finished_evaluation(tmp_path, None, False, records, "d1") is None


def test_an_evaluation_of_data_prepared_again_differently_is_redone(tmp_path, capsys):
    from sdpo.pipeline.run import _finished_evaluation

    records = finished_evaluation(tmp_path)
    assert _finished_evaluation(tmp_path, None, None, records, "d1")["hr@1"] == 0.5
    assert _finished_evaluation(tmp_path, None, None, records, "d2") is None
    assert "evaluated other prepared data" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["cut", "missing", "fewer"])
def test_an_evaluation_whose_predictions_are_damaged_is_redone(tmp_path, capsys, damage):
    from sdpo.pipeline.run import _finished_evaluation

    records = finished_evaluation(tmp_path)
    path = tmp_path / "predictions.jsonl.gz"
    if damage == "cut":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "missing":
        path.unlink()
    else:
        finished_evaluation(tmp_path)
        records = [*records, records[0].__class__("r9", None, ["a"], ["b", "c"], "b")]  # the pipeline evaluates three now
    assert _finished_evaluation(tmp_path, None, None, records, "d1") is None
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[evaluate] {tmp_path}: ") and line.endswith("evaluating again") and len(line.splitlines()) == 1


def test_a_baseline_whose_predictions_were_cut_short_is_trained_again(small_data, tmp_path, capsys):
    from sdpo.evaluation.results import read_whole_evaluation
    from sdpo.pipeline.run import run_pipeline

    config = {"output_dir": str(tmp_path / "study"), "data": {"path": str(small_data)},
              "evaluate": {"split": "test", "limit": 3, "protocols": []}, "baselines": {"models": ["popularity"]}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    run_pipeline(tmp_path / "p.yaml")
    folder = tmp_path / "study" / "baselines" / "popularity"
    path = folder / "predictions.jsonl.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    run_pipeline(tmp_path / "p.yaml")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[baseline]")]
    assert said[0].startswith(f"[baseline] {folder}: its files are damaged") and said[0].endswith("training it again")
    assert "reusing" not in "\n".join(said)
    metrics, problem = read_whole_evaluation(folder, load_split(small_data, "test", 3, 0))
    assert problem is None and metrics["n_records"] == 3
    run_pipeline(tmp_path / "p.yaml")
    assert f"[baseline] reusing {folder}" in capsys.readouterr().out
    (folder / "metrics.json").write_text('{"hr@1": 0.')  # cut short
    run_pipeline(tmp_path / "p.yaml")
    assert "its metrics.json is damaged (JSONDecodeError): training it again" in capsys.readouterr().out
    metrics = json.loads((folder / "metrics.json").read_text())
    # a baseline of other prepared data is refused first, whatever else is wrong with it
    metrics["data_sha256"] = "another preparation"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(UserError, match="trained on other prepared data"):
        run_pipeline(tmp_path / "p.yaml")


def test_a_stage_whose_weights_git_did_not_keep_is_trained_again(tmp_path):
    from sdpo.pipeline.stages import run_training_stage
    from sdpo.training.sft import SFTConfig

    out = tmp_path / "sft"
    out.mkdir()
    (out / "sdpo_config.yaml").write_text("model: tiny\n")
    (out / "adapter_config.json").write_text("{}")
    trained = []
    run_training_stage("sft", SFTConfig, lambda config: trained.append(config) or out, {"model": "tiny", "data": "d"}, out, Path("c.yaml"))
    assert len(trained) == 1 and trained[0].overwrite and not trained[0].resume


def test_a_stage_killed_before_its_bf16_cast_is_cast_when_reused(tmp_path):
    """save_model wrote fp32 weights, then the process died before storing them in bf16: reuse finishes the cast."""
    import torch
    from safetensors.torch import load_file, save_file

    from sdpo.pipeline.stages import run_training_stage
    from sdpo.training.sft import SFTConfig

    out = tmp_path / "sft"
    out.mkdir()
    (out / "sdpo_config.yaml").write_text("model: tiny\nadapter_dtype: bf16\n")
    (out / "adapter_config.json").write_text("{}")
    weights = {"a.lora_A.weight": torch.randn(4, 8), "b.lora_B.weight": torch.randn(8, 4)}
    save_file(weights, out / "adapter_model.safetensors")
    values = {"model": "tiny", "data": "d", "adapter_dtype": "bf16"}
    run_training_stage("sft", SFTConfig, lambda config: pytest.fail("trained again"), values, out, Path("c.yaml"))
    stored = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(stored[k], v.to(torch.bfloat16)) for k, v in weights.items())
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    run_training_stage("sft", SFTConfig, lambda config: pytest.fail("trained again"), values, out, Path("c.yaml"))
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before  # already bf16: left as it is


def copied_study(tiny_study, tmp_path) -> Path:
    """A copy of the tiny study's work folder (config and study, checkpoints included), to change without touching the original."""
    work = tmp_path / "work"
    shutil.copytree(tiny_study.work, work)
    return work


def test_a_study_continued_from_another_folder_with_an_absolute_output_dir_reuses_every_stage(tiny_study, tmp_path):
    work = copied_study(tiny_study, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    study = work / tiny_study.out
    continued = sdpo("pipeline", work / "tiny.yaml", "--output_dir", study, cwd=elsewhere)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "[sft] reusing" in continued.stdout and "[dpo] reusing" in continued.stdout and "training into" not in continued.stdout
    assert "[evaluate] sft" not in continued.stdout  # every evaluation reused
    for config in study.glob("*/sdpo_config.yaml"):  # what the study records inside itself, relative to itself
        recorded = yaml.safe_load(config.read_text())
        assert recorded["output_dir"] == config.parent.name and recorded.get("sft") in (None, "sft"), config


def test_a_study_with_predictions_cut_short_evaluates_them_again_and_reports(tiny_study, tmp_path):
    work = copied_study(tiny_study, tmp_path)
    study = work / tiny_study.out
    predictions = study / "eval" / "sft-rank" / "predictions.jsonl.gz"
    whole = predictions.read_bytes()
    predictions.write_bytes(whole[: len(whole) // 2])
    assert sdpo("report", study, "--out", tmp_path / "report").returncode == 2  # what the user met: report refuses it
    continued = sdpo("pipeline", "tiny.yaml", "--output_dir", tiny_study.out, cwd=work)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert f"[evaluate] {tiny_study.out / 'eval' / 'sft-rank'}: its files are damaged" in continued.stdout
    assert predictions.read_bytes() == whole
    assert sdpo("report", study, "--out", tmp_path / "report").returncode == 0


def test_a_stage_whose_adapter_was_cut_short_is_trained_again(tiny_study, tmp_path):
    work = copied_study(tiny_study, tmp_path)
    study = work / tiny_study.out
    weights = study / "sft" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    continued = sdpo("pipeline", "tiny.yaml", "--output_dir", tiny_study.out, cwd=work)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "[sft] not reusing" in continued.stdout and "damaged" in continued.stdout and "[sft] training into" in continued.stdout
    assert weights.read_bytes() == whole  # resumed from its last checkpoint: the same adapter, so the later stages stand
    assert "[dpo] reusing" in continued.stdout and "trained again since" not in continued.stdout


def test_a_stage_trained_on_data_prepared_otherwise_is_refused(tmp_path):
    from sdpo.errors import UserError
    from sdpo.pipeline.stages import run_training_stage
    from sdpo.training.sft import SFTConfig

    out = tmp_path / "sft"
    out.mkdir()
    (out / "sdpo_config.yaml").write_text("model: tiny\ndata_sha256: aaaa\n")
    (out / "adapter_config.json").write_text("{}")
    import torch
    from safetensors.torch import save_file

    save_file({"a.lora_A.weight": torch.zeros(2, 2)}, out / "adapter_model.safetensors")
    values = {"model": "tiny", "data": "d", "data_sha256": "bbbb"}
    with pytest.raises(UserError, match="data_sha256 'aaaa' -> 'bbbb'"):
        run_training_stage("sft", SFTConfig, lambda config: pytest.fail("trained"), values, out, Path("c.yaml"))
    run_training_stage("sft", SFTConfig, lambda config: pytest.fail("trained"), {**values, "data_sha256": "aaaa"}, out, Path("c.yaml"))
