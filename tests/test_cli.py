"""The `sdpo` command as a user runs it: clear errors, exit codes, and the pipeline end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def sdpo(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from sdpo.cli import main; main()", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600,
    )


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


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


def test_sft_cli_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nbogus: 3\n")
    assert_user_error(sdpo("sft", tmp_path / "c.yaml"), "unknown option(s) bogus")
    assert_user_error(sdpo("sft", tmp_path / "absent.yaml"), "no such config file")
    help_text = sdpo("sft", "--help")
    assert help_text.returncode == 0 and "--lora_r" in help_text.stdout and "--learning_rate" in help_text.stdout


def test_pipeline_on_tiny(small_data, tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": "tiny",
        "data": {"path": str(small_data)},
        "sft": {"train_limit": 8, "max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "evaluate": {"split": "test", "limit": 3, "protocols": ["generate", "rank"], "batch_size": 2},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", tmp_path / "p.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["stage"], r["protocol"]) for r in rows] == [("zero-shot", "generate"), ("zero-shot", "rank"), ("sft", "generate"), ("sft", "rank")]
    assert all(r["n_records"] == 3 for r in rows)
    assert "| sft | rank | 3 |" in result.stdout
    again = sdpo("pipeline", tmp_path / "p.yaml")  # finished stages are reused
    assert again.returncode == 0 and "[sft] reusing" in again.stdout and "[evaluate] reusing" in again.stdout


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
    config["baselines"]["models"] = ["popularity"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", tmp_path / "p.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [(r["stage"], r["protocol"], r["n_records"]) for r in rows] == [("popularity", "rank", 8)]
