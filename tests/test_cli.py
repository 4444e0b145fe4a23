"""The `sdpo` command as a user runs it: clear errors, exit codes, and the pipeline end to end."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sdpo.evaluation.journal import to_float32
from sdpo.io import read_jsonl
from tests.helpers import assert_user_error, sdpo


def test_prepare_from_mirror_and_refusals(mirror, tmp_path):
    out = tmp_path / "lastfm"
    ok = sdpo("data", "prepare", "lastfm", "--out", out, "--mirror", mirror, "--raw-dir", tmp_path / "raw")
    assert ok.returncode == 0, ok.stderr
    assert "train 47872, val 2767, test 2495" in ok.stdout
    again = sdpo("data", "prepare", "lastfm", "--out", out, "--mirror", mirror, "--raw-dir", tmp_path / "raw")
    assert_user_error(again, "not empty", "--overwrite")
    missing = sdpo("data", "fetch", "lastfm", "--mirror", tmp_path / "nowhere", "--raw-dir", tmp_path / "raw2")
    assert_user_error(missing, "is missing")
    assert not any(p for p in (tmp_path / "raw2" / "lastfm").iterdir())


def test_evaluate_refuses_a_bad_dataset_and_writes_nothing(small_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"domain": "music"}))
    lines = (small_data / "test.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["target"] = "Not A Candidate"
    (bad / "test.jsonl").write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    result = sdpo("evaluate", "--data", bad, "--model", "tiny", "--output", tmp_path / "out")
    assert_user_error(result, "test.jsonl:2: bad record: target 'Not A Candidate' is not among the candidates")
    assert not (tmp_path / "out").exists()
    result = sdpo("evaluate", "--data", small_data, "--model", "tiny", "--protocol", "beam", "--output", tmp_path / "out")
    assert_user_error(result, "unknown protocol 'beam'")
    result = sdpo("evaluate", "--data", small_data, "--model", "tiny", "--adapter", tmp_path, "--output", tmp_path / "o2")
    assert_user_error(result, "holds no LoRA adapter")
    result = sdpo("evaluate", "--data", small_data, "--model", "no-such-org/no-such-model", "--output", tmp_path / "o3")
    assert_user_error(result, "cannot load a tokenizer for 'no-such-org/no-such-model'")
    result = sdpo("evaluate", "--data", small_data, "--model", "tiny", "--protocol", "rerank", "--trunk_cache", tmp_path / "c",
                  "--output", tmp_path / "o4")
    assert_user_error(result, "--trunk_cache serves the rank and generate protocols, not rerank")


def test_sft_cli_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nbogus: 3\n")
    assert_user_error(sdpo("sft", tmp_path / "c.yaml"), "unknown option(s) bogus")
    assert_user_error(sdpo("sft", tmp_path / "absent.yaml"), "no such config file")
    if not torch.cuda.is_available():
        assert_user_error(sdpo("sft", "--model", "tiny", "--attn_implementation", "flex_attention", "--output_dir", tmp_path / "f"),
                          "flex_attention trains on CUDA only")
    help_text = sdpo("sft", "--help")
    assert help_text.returncode == 0 and "--lora_r" in help_text.stdout and "--learning_rate" in help_text.stdout


def test_pipeline_on_tiny(tiny_study, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_study.work, work)  # this test retrains and removes stages: a copy of its own
    run, stdout, config = work / tiny_study.out, tiny_study.stdout, tiny_study.config
    out = str(tiny_study.out)

    def pipeline(config_file, output_dir=out):
        return sdpo("pipeline", config_file, "--output_dir", output_dir, cwd=work)

    # LoRA on the last layer only: the evaluations shared what layer 0 computes, removed at the end
    for protocol in ("rank", "generate"):
        assert f"every stage is evaluated with {protocol}: removed the trunk cache {tiny_study.out / 'eval' / 'trunk-cache' / protocol}" in stdout
    # protocol by protocol: every rank pass ran before the first generation
    assert stdout.index("[evaluate] dpo, rank protocol") < stdout.index("[evaluate] zero-shot, generate protocol")
    assert not (run / "eval" / "trunk-cache").exists()
    rows = json.loads((run / "results.json").read_text())
    assert [(r["stage"], r["protocol"]) for r in rows] == [
        ("zero-shot", "rank"), ("zero-shot", "generate"), ("sft", "rank"), ("sft", "rank-reward"), ("sft", "generate"),
        ("dpo", "rank"), ("dpo", "rank-reward"), ("dpo", "generate"), ("popularity", "rank"),
    ]
    assert all(r["n_records"] == 3 for r in rows) and all(r["prompt_seed"] == 3 for r in rows if r["stage"] != "popularity")
    assert "| sft | rank | 3 |" in stdout and "| dpo | rank-reward | 3 |" in stdout
    # every stage trained and was evaluated with the pipeline's one prompt setting
    assert all(yaml.safe_load((run / s / "sdpo_config.yaml").read_text())["prompt_seed"] == 3 for s in ("sft", "dpo"))
    # each stage's reward is its log-prob minus its reference stage's, from the saved (compressed) predictions
    predictions = {s: read_jsonl(run / "eval" / f"{s}-rank" / "predictions.jsonl.gz") for s in ("zero-shot", "sft", "dpo")}
    for stage, reference in (("sft", "zero-shot"), ("dpo", "sft")):
        for row, ref_row in zip(predictions[stage], predictions[reference], strict=True):
            ref = {e["title"]: to_float32(e["logp"]) for e in ref_row["ranking"]}
            # the files keep the float32 log-probs exactly and the rewards to float32 precision
            assert all(abs(e["reward"] - (to_float32(e["logp"]) - ref[e["title"]])) <= 1e-7 * max(1.0, abs(e["reward"]))
                       for e in row["ranking"])
    again = pipeline("tiny.yaml")  # finished stages are reused
    assert again.returncode == 0 and "[sft] reusing" in again.stdout and "[evaluate] reusing" in again.stdout
    # a finished stage trained with other options is refused, not silently reused
    changed = {**config, "align": [{**config["align"][0], "beta": 0.5}]}
    (work / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert_user_error(pipeline("changed.yaml"), "stage dpo", "beta 1.0 -> 0.5", "remove")
    # an evaluation of another adapter of the stage (trained again since) is not reused
    from sdpo.data.datasets import data_fingerprint, load_split
    from sdpo.pipeline.run import _finished_evaluation

    data = config["data"]["path"]
    records, fingerprint = load_split(data, "test", 3, 0), data_fingerprint(data)
    sft_eval = json.loads((run / "eval" / "sft-rank" / "metrics.json").read_text())
    assert _finished_evaluation(run / "eval" / "sft-rank", str(run / "sft"), None, records, fingerprint) == sft_eval
    shutil.copytree(run / "eval" / "sft-rank", tmp_path / "older")
    (tmp_path / "older" / "metrics.json").write_text(json.dumps({**sft_eval, "adapter_sha256": "0" * 64}))
    assert _finished_evaluation(tmp_path / "older", str(run / "sft"), None, records, fingerprint) is None

    # same seed, same machine, same numbers: a fresh run (LoRA dropout on) gives the same table and files
    # (and without the trunk cache: the same numbers, byte for byte)
    uncached = {**config, "evaluate": {**config["evaluate"], "trunk_cache": False}}
    (work / "uncached.yaml").write_text(yaml.safe_dump(uncached))
    second = pipeline("uncached.yaml", "run2")
    assert second.returncode == 0 and "trunk cache" not in second.stdout
    rerun = work / "run2"

    def numbers(folder):
        return [{k: v for k, v in row.items() if k not in ("seconds", "adapter", "reference", "output_dir")}
                for row in json.loads((folder / "results.json").read_text())]

    assert numbers(rerun) == numbers(run)
    for name in ("sft/adapter_model.safetensors", "dpo/adapter_model.safetensors", "eval/sft-generate/predictions.jsonl.gz",
                 "eval/dpo-rank/predictions.jsonl.gz"):
        assert (rerun / name).read_bytes() == (run / name).read_bytes(), name
    # an align stage trained from an SFT run that was trained again since is refused
    shutil.rmtree(run / "sft")
    retrained = {**config, "sft": {**config["sft"], "learning_rate": 0.5}}
    (work / "retrained.yaml").write_text(yaml.safe_dump(retrained))
    assert_user_error(pipeline("retrained.yaml"), "stage dpo", "sft_sha256", "remove")
    config = {**config, "sft": {**config["sft"], "prompt_seed": 1}}
    (work / "p.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(pipeline("p.yaml"), "set prompt_seed at the top level")
    del config["sft"]["prompt_seed"]
    config["evaluate"] = {**config["evaluate"], "trunk_cache": "yes"}
    (work / "p.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(pipeline("p.yaml"), "evaluate.trunk_cache must be true or false")
    # names are checked before any stage runs, not after hours of training
    for section, value, message in (("evaluate", {"stages": ["sft", "sdpo"]}, "evaluate.stages names sdpo"),
                                    ("evaluate", {"protocols": ["rank", "beam"]}, "evaluate.protocols names beam"),
                                    ("baselines", {"models": ["popularity", "bert4rec"]}, "baselines.models names bert4rec")):
        (work / "typo.yaml").write_text(yaml.safe_dump({**tiny_study.config, section: {**tiny_study.config[section], **value}}))
        assert_user_error(pipeline("typo.yaml", "typo-run"), message)
        assert not (work / "typo-run").exists()
    # a stage's reward is against its own reference stage's log-probs: a reference ranking that lost its predictions is
    # ranked again (a damaged evaluation is redone, not reused), then the reward is computed from it
    shutil.rmtree(work / "run2" / "eval" / "dpo-rank")
    (work / "run2" / "eval" / "sft-rank" / "predictions.jsonl.gz").unlink()
    repaired = pipeline("uncached.yaml", "run2")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "sft-rank: its files are damaged" in repaired.stdout and "[evaluate] dpo, rank protocol" in repaired.stdout


def test_baseline_and_align_commands(small_data, tmp_path):
    result = sdpo("baseline", "--model", "popularity", "--data", small_data, "--output", tmp_path / "pop")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "popularity on 8 test records" in result.stdout
    assert json.loads((tmp_path / "pop" / "metrics.json").read_text())["valid_ratio"] == 1.0
    assert_user_error(sdpo("baseline", "--model", "bert4rec", "--data", small_data, "--output", tmp_path / "x"), "unknown baseline")
    again = sdpo("baseline", "--model", "popularity", "--data", small_data, "--output", tmp_path / "pop")
    assert_user_error(again, "is not empty", "--overwrite")
    resume = sdpo("baseline", "--model", "popularity", "--data", small_data, "--output", tmp_path / "pop", "--resume")
    assert_user_error(resume, "no checkpoint.pt", "the run there is finished")
    bench = ("benchmark", "baseline", "--data", small_data, "--json", tmp_path / "b.json")
    assert_user_error(sdpo(*bench, "--models", "caser,popularity"), "popularity cannot be timed")
    assert_user_error(sdpo("benchmark", "baseline", "--data", tmp_path / "nowhere", "--json", tmp_path / "b.json"), "nowhere")
    assert not (tmp_path / "b.json").exists()
    assert_user_error(sdpo("align", "--sft", tmp_path, "--output_dir", tmp_path / "a"), "not an SFT run folder")
    help_text = sdpo("align", "--help")
    assert help_text.returncode == 0 and "--negatives" in help_text.stdout and "--select_by" in help_text.stdout


def test_pipeline_with_baselines_only(small_data, tmp_path):
    """The shape of configs/baselines-lastfm.yaml: no LM protocols, a baseline row per model."""
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "baselines-lastfm.yaml").read_text())
    config.update(output_dir=str(tmp_path / "run"), data={"path": str(small_data)})
    config["baselines"]["models"] = ["popularity", {"model": "caser", "l2": "1e-3", "max_epochs": 1}]  # one model's own options
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", tmp_path / "p.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["stage"], r["protocol"], r["n_records"]) for r in rows] == [("popularity", "rank", 8), ("caser", "rank", 8)]
    assert rows[1]["l2"] == 1e-3 and [entry["l2"] for entry in rows[1]["l2_search"]] == [1e-3]  # no search: the given L2
    for models, expected in (([{"l2": "1e-3"}], "must be a model name or a mapping with 'model'"), (["caser", {"model": "caser"}], "caser more than once"),
                             ("sasrec", "must be a list")):
        config["baselines"]["models"] = models
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
        assert_user_error(sdpo("pipeline", tmp_path / "bad.yaml"), expected)


def test_bad_inputs_each_end_in_one_error_line(small_data, tmp_path):
    """One class of input per case: manifest fields, YAML values, run and adapter folders, CLI values.

    A few go through the command (one error line, status 2, no traceback); the rest call what
    the command calls, whose UserError the command prints the same way."""
    from sdpo.config import build_config, read_yaml
    from sdpo.errors import UserError
    from sdpo.pipeline import evaluate_model
    from sdpo.training.preference import AlignConfig, run_align
    from sdpo.training.sft import SFTConfig

    bad_domain = tmp_path / "bad-domain"
    bad_domain.mkdir()
    (bad_domain / "test.jsonl").write_text((small_data / "test.jsonl").read_text())
    (bad_domain / "manifest.json").write_text(json.dumps({"domain": "podcasts"}))
    assert_user_error(sdpo("evaluate", "--data", bad_domain, "--model", "tiny", "--output_dir", tmp_path / "o1"),
                      "manifest.json: unknown domain 'podcasts'")
    with pytest.raises(UserError, match="--domain 'podcasts': unknown"):
        evaluate_model(small_data, "test", "tiny", None, "rank", None, tmp_path / "o1", domain="podcasts")

    (tmp_path / "typed.yaml").write_text("learning_rate: fast\n")
    assert_user_error(sdpo("sft", tmp_path / "typed.yaml"), "option learning_rate must be a number, got 'fast'")
    with pytest.raises(UserError, match="option train_limit must be an integer \\(or null\\), got 2.5"):
        build_config(SFTConfig, {"train_limit": 2.5})
    assert build_config(SFTConfig, read_yaml(_write(tmp_path / "e.yaml", "learning_rate: 1e-4\n"))).learning_rate == 1e-4

    with pytest.raises(UserError, match="--limit must be at least 1"):
        evaluate_model(small_data, "test", "tiny", None, "rank", -3, tmp_path / "o2")
    with pytest.raises(UserError, match="--beta must be above 0"):
        build_config(AlignConfig, {"beta": 0})
    with pytest.raises(UserError, match="--train_limit must be at least 1"):
        build_config(SFTConfig, {"train_limit": 0})
    assert build_config(SFTConfig, {}, ["--bf16", "false"]).bf16 is False

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    assert_user_error(sdpo("evaluate", "--data", small_data, "--model", "tiny", "--adapter", adapter, "--output_dir", tmp_path / "o3"),
                      "adapter_model.safetensors: damaged")
    (adapter / "sdpo_config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="sdpo_config.yaml: unreadable"):
        run_align(build_config(AlignConfig, {"sft": str(adapter), "output_dir": str(tmp_path / "a")}))
    assert not any(p.exists() for p in (tmp_path / "o1", tmp_path / "o2", tmp_path / "o3", tmp_path / "a"))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_windows_edited_record_file_is_read(small_data, tmp_path):
    """A UTF-8 byte-order mark and CRLF line endings (what Windows editors save) do not make good records bad."""
    folder = tmp_path / "windows"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(b"\xef\xbb\xbf" + (small_data / "manifest.json").read_bytes().replace(b"\n", b"\r\n"))
    text = (small_data / "test.jsonl").read_text(encoding="utf-8")
    (folder / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    from sdpo.data.datasets import load_split

    assert load_split(folder, "test") == load_split(small_data, "test")


def test_the_paper_recipe_parses_into_the_stage_configs():
    """configs/paper-lastfm.yaml holds the authors' settings (FACTS.md) and builds valid SFT and align configs."""
    from sdpo.config import build_config
    from sdpo.training.preference import AlignConfig
    from sdpo.training.sft import SFTConfig

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper-lastfm.yaml").read_text())
    sft = build_config(SFTConfig, {**config["sft"], "model": config["model"]})
    align_section = {k: v for k, v in config["align"].items() if k != "name"}
    align = build_config(AlignConfig, align_section)
    for stage in (sft, align):
        assert stage.per_device_train_batch_size * stage.gradient_accumulation_steps == 128
        assert stage.learning_rate == 1e-5 and stage.lr_scheduler_type == "cosine"
        assert stage.warmup_steps == 0.05 and stage.max_grad_norm == 0.3
        assert stage.load_best_model_at_end and stage.eval_limit == 2000
    assert sft.num_train_epochs == 5 and align.num_train_epochs == 3
    assert (align.loss, align.negatives, align.beta) == ("sdpo", 3, 1.0)
    assert align.metric_for_best_model == "loss" and not align.greater_is_better
    assert sft.metric_for_best_model == "eval_loss" and not sft.greater_is_better


def test_the_gpu_study_differs_from_the_cpu_study_in_scale_only():
    """configs/study-lastfm-gpu.yaml: more records, same stages, seeds, lr, beta, records per step and test set."""
    folder = Path(__file__).parents[1] / "configs"
    cpu, gpu = (yaml.safe_load((folder / name).read_text()) for name in ("study-lastfm.yaml", "study-lastfm-gpu.yaml"))
    scale = {"train_limit", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"}

    def same_part(stage):
        return {k: v for k, v in stage.items() if k not in scale}

    def records_per_step(stage):
        return stage["per_device_train_batch_size"] * stage["gradient_accumulation_steps"]

    for key in ("model", "seed", "subset_seed", "data"):
        assert cpu[key] == gpu[key]
    assert same_part(cpu["sft"]) == same_part(gpu["sft"]) and records_per_step(cpu["sft"]) == records_per_step(gpu["sft"])
    assert [same_part(s) for s in cpu["align"]] == [same_part(s) for s in gpu["align"]]
    assert {records_per_step(s) for s in cpu["align"] + gpu["align"]} == {records_per_step(cpu["sft"])}
    assert gpu["sft"]["train_limit"] > cpu["sft"]["train_limit"]
    assert all(g["train_limit"] > c["train_limit"] for c, g in zip(cpu["align"], gpu["align"], strict=True))
    assert {k: v for k, v in cpu["evaluate"].items() if k != "batch_size"} == {k: v for k, v in gpu["evaluate"].items() if k != "batch_size"}


@pytest.mark.parametrize("old_name, new_name", [("study-lastfm.yaml", "study-sft-term-lastfm.yaml"),
                                                ("study-ml100k.yaml", "study-sft-term-ml100k.yaml")])
def test_the_sft_term_studies_rerun_the_text_align_stages_with_only_the_sweeps_choice_changed(old_name, new_name):
    """Issue 34's studies: from the older study's SFT, on the same records, steps, seed and test records; the chosen
    alpha, beta and lr, and the shared trunk (the same function, computed once) are all that change."""
    folder = Path(__file__).parents[1] / "configs"
    old, new = (yaml.safe_load((folder / name).read_text()) for name in (old_name, new_name))
    sweep = yaml.safe_load((folder / "sweep-sft-term-lastfm.yaml").read_text())
    chosen = next(s for s in sweep["align"] if s["name"] == "w1-b1")  # docs/results/sweep-sft-term-lastfm.md
    changed = {"sft_weight", "beta", "learning_rate", "share_trunk", "adapter_dtype", "name", "from"}
    for key in ("model", "seed", "subset_seed", "data", "bf16"):
        assert old.get(key) == new.get(key), key
    old_sft = old["sft"][0] if isinstance(old["sft"], list) else old["sft"]
    assert [s["name"] for s in new["sft"]] == ["sft"] and Path(new["sft"][0]["adapter"]).name in (old_sft["name"], "lastfm-sft-smollm2-135m")
    old_text = {s["name"]: s for s in old["align"] if s.get("from", old_sft["name"]) == old_sft["name"]}
    assert {s["name"] for s in new["align"]} == {"dpo", "s-dpo-k3", "s-dpo-k19"} <= set(old_text)
    for stage in new["align"]:
        assert {k: v for k, v in stage.items() if k not in changed} == {k: v for k, v in old_text[stage["name"]].items() if k not in changed}
        assert (stage["sft_weight"], stage["beta"], stage["learning_rate"]) == (chosen["sft_weight"], chosen["beta"], chosen["learning_rate"])
    assert new["evaluate"].get("limit") == old["evaluate"].get("limit") and new["evaluate"]["split"] == old["evaluate"]["split"] == "test"
    from sdpo.pipeline.config import read_pipeline

    assert read_pipeline(folder / new_name).align_stages  # it parses as a pipeline


def test_pipeline_stages_are_named_and_linked(tmp_path):
    from sdpo.errors import UserError
    from sdpo.pipeline.config import parse_training_stages

    config = {
        "sft": [{"name": "sft-small", "train_limit": 8}, {"name": "sft-big", "train_limit": 16}],
        "align": [{"loss": "dpo", "negatives": 1}, {"name": "sdpo-k3", "from": "sft-big", "negatives": 3}],
    }
    sft, align = parse_training_stages(config, tmp_path / "p.yaml")
    assert [name for name, _ in sft] == ["sft-small", "sft-big"]
    assert [(name, start) for name, _, start in align] == [("dpo", "sft-small"), ("sdpo-k3", "sft-big")]
    assert align[1][1] == {"negatives": 3}  # name and from are the pipeline's, not the stage's options
    single = parse_training_stages({"sft": {"train_limit": 8}, "align": {"negatives": 3}}, tmp_path / "p.yaml")
    assert [n for n, _ in single[0]] == ["sft"] and [(n, s) for n, _, s in single[1]] == [("s-dpo", "sft")]
    for bad, message in (
        ({"sft": {}, "align": [{"name": "a"}, {"name": "a"}]}, "stage name 'a' is taken"),
        ({"sft": {}, "align": {"from": "nope"}}, "starts from 'nope', which is not an sft stage"),
        ({"align": {}}, "add an sft section"),
        ({"sft": {"name": "zero-shot"}}, "stage name 'zero-shot' is taken"),
        ({"sft": {"name": "runs"}}, "stage name 'runs' is taken"),  # a study's .gitignore leaves these folders out
        ({"sft": {"name": "checkpoint-2"}}, "stage name 'checkpoint-2' is taken"),
    ):
        with pytest.raises(UserError, match=message):
            parse_training_stages(bad, tmp_path / "p.yaml")


def test_the_study_config_runs_end_to_end_on_tiny(small_data, tmp_path):
    """The committed study config, shrunk to the tiny model and a handful of records, runs and reports."""
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "study-lastfm.yaml").read_text())
    config.update(output_dir=str(tmp_path / "study"), model="tiny", data={"path": str(small_data)})
    for stage in [config["sft"], *config["align"]]:
        stage.update(train_limit=8, max_steps=1, gradient_accumulation_steps=1, save_steps=1)
        if "lora_layers" in stage:
            stage["lora_layers"] = 1  # tiny has 2
    config["evaluate"].update(limit=3, batch_size=4)
    config["baselines"]["models"] = ["popularity"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", tmp_path / "study.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "study" / "results.json").read_text())
    stages = [s["name"] for s in config["align"]]
    assert {r["stage"] for r in rows} == {"zero-shot", "sft", *stages, "popularity"}
    # every align stage started from the same SFT run, on the same records, for the same steps
    configs = [yaml.safe_load((tmp_path / "study" / s / "sdpo_config.yaml").read_text()) for s in stages]
    assert {c["sft"] for c in configs} == {"sft"}  # recorded relative to the study folder
    assert len({(c["train_limit"], c["subset_seed"], c["seed"], c["max_steps"]) for c in configs}) == 1
    assert sorted(c["negatives"] for c in configs) == [1, 3, 7, 19]
    report = sdpo("report", tmp_path / "study", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report" / "study-records.csv.gz").is_file() and (tmp_path / "report" / "study-hr1-vs-k.png").is_file()
    # the committed per-record CSV and the config are enough to recompute the tables and the paired comparisons
    again = sdpo("report", tmp_path / "report" / "study-records.csv.gz", "--config", tmp_path / "study.yaml", "--data", small_data,
                 "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"| {stages[-1]} | {stages[0]} | rank |" in (tmp_path / "again" / "results.md").read_text()


def test_the_ml100k_study_config_runs_both_families_on_tiny(small_data, tmp_path):
    """The committed ML-100K study, shrunk to the tiny model: text and collaborative families, baselines, fusion, report."""
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "study-ml100k.yaml").read_text())
    config.update(output_dir=str(tmp_path / "study"), model="tiny", data={"path": str(small_data)})
    for stage in [*config["sft"], *config["align"]]:
        stage.update(train_limit=8, max_steps=1, gradient_accumulation_steps=1, save_steps=1)
        if "lora_layers" in stage:
            stage["lora_layers"] = 1  # tiny has 2
    config["evaluate"].update(limit=3, batch_size=4)
    config["fusion"]["val_limit"] = 4
    config["baselines"]["models"] = ["popularity", {"model": "sasrec", "l2": "1e-7", "max_epochs": 1, "dim": 8}]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", tmp_path / "study.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "study"
    rows = json.loads((study / "results.json").read_text())
    stages = {s["name"]: s for s in config["align"]}
    assert {r["stage"] for r in rows} == {"zero-shot", "sft", "collab-sft", *stages, "popularity", "sasrec",
                                          "fusion-s-dpo-k19", "fusion-collab-s-dpo-k19"}
    for family, sft in (("text", "sft"), ("collab", "collab-sft")):
        names = [n for n, s in stages.items() if s["from"] == sft]
        configs = [yaml.safe_load((study / n / "sdpo_config.yaml").read_text()) for n in names]
        assert {c["sft"] for c in configs} == {sft}, family  # relative to the study folder
        assert sorted(c["negatives"] for c in configs) == [1, 3, 19], family
        assert len({(c["train_limit"], c["subset_seed"], c["seed"], c["max_steps"]) for c in configs}) == 1, family
        assert all(c["share_trunk"] == (family == "text") for c in configs), family
        assert all(bool(c["collaborative"]) == (family == "collab") for c in configs), family
    from safetensors.torch import load_file

    assert all(w.dtype == torch.bfloat16 for w in load_file(study / "collab-s-dpo-k19" / "adapter_model.safetensors").values())
    trained = ["sft", "collab-sft", *stages]  # every trained stage generates (issue 34: the README shows it for every LM row)
    assert all((study / "eval" / f"{name}-generate" / "metrics.json").is_file() for name in trained)
    assert not (study / "eval" / "zero-shot-generate").exists()
    report = sdpo("report", study, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr[-2000:]


def test_accelerate_configs_parse_and_4bit_is_refused_without_cuda(small_data, tmp_path):
    """configs/accelerate/*.yaml are read by accelerate itself; --load_in_4bit says plainly it needs a GPU."""
    from accelerate.commands.config.config_args import load_config_from_file

    from sdpo.config import build_config
    from sdpo.errors import UserError
    from sdpo.lm.models import load_model
    from sdpo.training.sft import SFTConfig

    folder = Path(__file__).parents[1] / "configs" / "accelerate"
    kinds = {path.stem: load_config_from_file(str(path)).distributed_type.value for path in folder.glob("*.yaml")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED"}
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--load_in_4bit needs a CUDA GPU"):
            load_model("smollm2-135m", load_in_4bit=True)
    assert build_config(SFTConfig, {"load_in_4bit": True}).load_in_4bit is True
