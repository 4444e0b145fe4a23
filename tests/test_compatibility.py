"""What users already have keeps working after the package moved: the public import, the configs, the committed outputs.

(The shipped adapter folders are loaded and checked against the study in test_shipped_adapters.py,
and run folders written before predictions were compressed in test_report.py.)
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.config import build_config, read_yaml
from sdpo.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PIPELINE_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "sft-lastfm.yaml")


def test_the_public_import_is_where_it_was_and_stays_light():
    """`import sdpo` does not import torch; `from sdpo import Recommender, Retriever` gives the API (a fresh interpreter)."""
    code = ("import sys, sdpo; assert 'torch' not in sys.modules, 'import sdpo pulled in torch'; "
            "from sdpo import Recommender, Retriever; print(Recommender.load.__qualname__, Retriever.load.__qualname__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Recommender.load", "Retriever.load"]


@pytest.mark.parametrize("name", PIPELINE_CONFIGS)
def test_every_committed_pipeline_config_still_reads(name):
    """Each pipeline config in configs/ reads, and every stage's options build that stage's config."""
    from sdpo.baselines.train import BaselineConfig
    from sdpo.lm.adapters import check_adapter_folder
    from sdpo.pipeline.config import read_pipeline
    from sdpo.training.preference import AlignConfig
    from sdpo.training.sft import SFTConfig

    plan = read_pipeline(REPO / "configs" / name)
    assert plan.sft_stages or plan.baselines, "a pipeline trains or runs baselines"
    for stage, options in plan.sft_stages:
        if "adapter" in options:  # a stage imported from a committed folder
            check_adapter_folder(REPO / options["adapter"])
        else:
            build_config(SFTConfig, options, where=f"{name}: {stage}")
    for stage, options, start in plan.align_stages:
        assert start in [s for s, _ in plan.sft_stages]
        if "adapter" in options:
            check_adapter_folder(REPO / options["adapter"])
        else:
            build_config(AlignConfig, options, where=f"{name}: {stage}")
    for model, options in (plan.baselines or {}).get("models", []):
        section = {k: v for k, v in plan.baselines.items() if k != "models"}
        build_config(BaselineConfig, {**section, **options, "model": model}, where=f"{name}: baselines")


def test_the_sft_config_still_reads():
    from sdpo.training.sft import SFTConfig

    config = build_config(SFTConfig, read_yaml(REPO / "configs" / "sft-lastfm.yaml"))
    assert config.learning_rate > 0


def test_the_committed_lastfm_study_report_rebuilds_from_its_records(tmp_path):
    """docs/results/study-lastfm: its per-record CSV and the study config give the committed report, digit for digit."""
    from sdpo.report import write_report

    folder = REPO / "docs" / "results" / "study-lastfm"
    write_report([folder / "study-lastfm-records.csv.gz"], tmp_path, REPO / "configs" / "study-lastfm.yaml")
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == (folder / "results.md").read_text(encoding="utf-8")
    assert (tmp_path / "study-lastfm-records.csv.gz").read_bytes() == (folder / "study-lastfm-records.csv.gz").read_bytes()


def test_a_smollm2_tokenizer_with_the_wrong_end_token_is_refused(tmp_path, monkeypatch):
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with <|im_start|> as its end token, which moves every answer's log-prob."""
    from sdpo.lm.models import load_tokenizer, smollm2_tokenizer_path

    assert load_tokenizer("smollm2-135m").eos_token == "<|im_end|>"
    bad = tmp_path / "home" / "models" / "smollm2-135m-tokenizer"
    shutil.copytree(smollm2_tokenizer_path(), bad)
    config = json.loads((bad / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"
    (bad / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("SDPO_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=re.escape("ends answers with '<|im_start|>', not '<|im_end|>'")):
        load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("adapter", ["lastfm-collab-sft-smollm2-135m", "lastfm-collab-sdpo-smollm2-135m"])
def test_runs_that_recorded_the_weights_hash_alone_still_load_their_collaborative_model(adapter):
    """The shipped collaborative adapters recorded the SHA-256 of the SASRec's weights only, as sdpo did before the whole fingerprint."""
    from sdpo.baselines.collaborative import WEIGHTS, model_sha256
    from sdpo.data.sources.fetch import sha256_of
    from sdpo.training.collaborative import load_collaborative
    from sdpo.training.runs import read_run_config

    config = read_run_config(REPO / "adapters" / adapter)
    folder = REPO / "adapters" / adapter / "collaborative"
    assert Path(config["collaborative"]) == folder and config["collaborative_sha256"] == sha256_of(folder / WEIGHTS)
    source = load_collaborative(config)
    assert source.sha256 == model_sha256(folder) != config["collaborative_sha256"] and source.matches(config["collaborative_sha256"])


@pytest.mark.parametrize("changed", ["items.json", "config.json", "model.safetensors"])
def test_the_whole_fingerprint_refuses_a_changed_item_table_config_or_weights(tmp_path, changed):
    from sdpo.baselines.collaborative import CollaborativeModel, model_sha256

    original = REPO / "adapters" / "lastfm-collab-sft-smollm2-135m" / "collaborative"
    copy = tmp_path / "sasrec"
    shutil.copytree(original, copy)
    recorded = model_sha256(original)
    assert CollaborativeModel.load(copy, recorded).sha256 == recorded
    path = copy / changed
    if changed == "items.json":  # two titles swap ids: the weights still load, and every vector would go to the wrong title
        table = json.loads(path.read_text())
        table["titles"][:2] = table["titles"][1::-1]
        path.write_text(json.dumps(table))
    elif changed == "config.json":  # another history length: the same weights, other user states
        config = json.loads(path.read_text())
        config["max_len"] += 1
        path.write_text(json.dumps(config))
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not the .* this run was trained with"):
        CollaborativeModel.load(copy, recorded)


def test_a_study_rewriting_the_paths_in_a_baseline_config_keeps_its_fingerprint(tmp_path):
    """sdpo.pipeline.study rewrites config.json's data and output_dir relative to the study: the model is the same one."""
    from sdpo.baselines.collaborative import model_sha256

    original = REPO / "adapters" / "lastfm-collab-sft-smollm2-135m" / "collaborative"
    copy = tmp_path / "sasrec"
    shutil.copytree(original, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(data="/somewhere/else/data", output_dir="baselines/sasrec", progress=False)
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert model_sha256(copy) == model_sha256(original)
