"""Runs with collaborative tokens: SFT, align, evaluation and the recommender read a trained SASRec through the prompt."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.data.prompts import encode_answer
from sdpo.errors import UserError
from sdpo.evaluation.generation import generate_answers
from sdpo.evaluation.protocols import candidate_logps
from sdpo.lm.models import load_model
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.lm.soft_tokens import SoftTokenSpec, collaborative_tokens_of, embed_with_soft_tokens, packed_soft_tokens
from sdpo.pipeline import evaluate_model
from sdpo.recommend import Recommender
from sdpo.training.preference import REFERENCE_ADAPTER, AlignConfig, frozen_adapter_logps, run_align
from sdpo.training.sft import SFTConfig, run_sft

PROJECTOR = "collaborative_tokens"


def sft_run(small_data, sasrec_dir, out, **overrides):
    return run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(out), "max_steps": 2, "learning_rate": 5e-2,
        "projector_learning_rate": 1e-2, "disable_tqdm": True, "train_limit": 8, "bf16": False,
        "collaborative": str(sasrec_dir), "collaborative_score": True, **overrides,
    }))


def align_run(sft_dir, out, **overrides):
    return run_align(build_config(AlignConfig, {
        "sft": str(sft_dir), "output_dir": str(out), "max_steps": 2, "learning_rate": 5e-2, "negatives": 3, "train_limit": 4,
        "disable_tqdm": True, "bf16": False, **overrides,
    }))


def projector_weights(run_dir):
    return {k: v for k, v in load_file(str(run_dir / "adapter_model.safetensors")).items() if PROJECTOR in k}


@pytest.fixture(scope="module")
def runs(small_data, sasrec_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("collaborative-runs")
    sft = sft_run(small_data, sasrec_dir, root / "sft")
    return {"root": root, "sft": sft, "sdpo": align_run(sft, root / "sdpo")}


def test_the_runs_record_the_collaborative_model_and_save_trained_projectors(runs, sasrec_dir):
    model = CollaborativeModel.load(sasrec_dir)
    for name in ("sft", "sdpo"):
        config = (runs[name] / "sdpo_config.yaml").read_text()
        assert f"collaborative_sha256: {model.sha256}" in config and "collaborative_score: true" in config
        report = json.loads((runs[name] / "collaborative.json").read_text())
        # the SASRec trained on the very records the runs trained on: not one of their titles lacks an id
        assert report["sha256"] == model.sha256 and (report["unknown_occurrences"], report["unknown_titles"]) == (0, 0)
    sft, sdpo = projector_weights(runs["sft"]), projector_weights(runs["sdpo"])
    assert sft and sft.keys() == sdpo.keys()
    # both stages trained the projectors: they moved from their seeded initial weights, and again in align
    initial = load_model("tiny", soft_tokens=SoftTokenSpec(model.dim, True))[0].collaborative_tokens.state_dict()
    name = next(k for k in sft if k.endswith("items.net.0.weight"))
    assert not torch.allclose(sft[name], initial["items.net.0.weight"])
    assert not torch.allclose(sdpo[name], sft[name])


def test_a_frozen_projector_stays_as_the_sft_run_left_it(runs):
    frozen = align_run(runs["sft"], runs["root"] / "frozen", train_projector=False)
    sft, aligned = projector_weights(runs["sft"]), projector_weights(frozen)
    assert all(torch.equal(sft[k], aligned[k]) for k in sft)
    lora = {k: v for k, v in load_file(str(frozen / "adapter_model.safetensors")).items() if "lora_B" in k}
    before = {k: v for k, v in load_file(str(runs["sft"] / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert any(not torch.equal(lora[k], before[k]) for k in lora)  # while LoRA trained


def test_the_reference_adapter_scores_with_its_own_frozen_copy_of_the_projectors(runs, small_data, sasrec_dir):
    source = CollaborativeModel.load(sasrec_dir)
    model, tokenizer = load_model("tiny", runs["sft"], trainable_adapter=True, soft_tokens=SoftTokenSpec(source.dim, True))
    model.load_adapter(str(runs["sft"]), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")
    prompts = CollaborativePrompts(tokenizer, "music", 0, source, score=True)
    records = load_split(small_data, "train", 4)
    ids = [prompts.ids(r) for r in records]
    packed = pack_answers(ids, [[encode_answer(tokenizer, c) for c in r.candidates[:4]] for r in records], tokenizer.pad_token_id)
    packed.update(prompts.soft_inputs(records, ids))
    model.eval()
    with torch.no_grad():
        policy = answer_logprobs(model, packed)[0]
    reference = frozen_adapter_logps(model, packed)
    assert torch.allclose(policy, reference, atol=1e-5)  # at the start, policy = reference
    with torch.no_grad():  # a step of the policy's projectors moves the policy, never the reference
        for p in collaborative_tokens_of(model).modules_to_save["default"].parameters():
            p.add_(0.5)
        moved = answer_logprobs(model, packed)[0]
    assert not torch.allclose(moved, policy, atol=1e-3)
    assert torch.equal(frozen_adapter_logps(model, packed), reference)
    assert any(p.requires_grad for p in collaborative_tokens_of(model).modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in collaborative_tokens_of(model).modules_to_save[REFERENCE_ADAPTER].parameters())


def test_evaluation_and_the_recommender_read_the_same_collaborative_prompts(runs, small_data, tmp_path):
    metrics = evaluate_model(small_data, "test", None, runs["sdpo"], "rank", 4, tmp_path / "rank", 2, progress=False,
                             reference_adapter=runs["sft"], bf16=False)
    assert metrics["collaborative"]["sha256"] and "reward_hr@1" in metrics
    recommender = Recommender.load(runs["sdpo"], bf16=False)
    records = load_split(small_data, "test", 4)
    ranked = recommender.rank_records(records, "reward", batch_size=3)
    predictions = [json.loads(line) for line in (tmp_path / "rank" / "predictions.jsonl").read_text().splitlines()]
    for row, mine in zip(predictions, ranked, strict=True):
        by_title = {e["title"]: e["reward"] for e in row["ranking"]}
        assert all(abs(by_title[t] - s) < 1e-4 for t, s in mine)
    # text prompts of the same model score otherwise: the soft tokens are read
    text = candidate_logps(recommender.model, recommender.tokenizer, records, "music", progress=False)
    soft = candidate_logps(recommender.model, recommender.tokenizer, records, "music", progress=False, prompts=recommender.prompts)
    assert not torch.allclose(torch.stack(text), torch.stack(soft))


def test_greedy_generation_with_soft_tokens_is_the_argmax_of_the_full_forward(runs, small_data):
    recommender = Recommender.load(runs["sft"], bf16=False)
    model, tokenizer, prompts = recommender.model, recommender.tokenizer, recommender.prompts
    records = load_split(small_data, "test", 3)
    texts = generate_answers(model, tokenizer, records, "music", batch_size=2, progress=False, prompts=prompts)  # padded batches
    for record, text in zip(records, texts, strict=True):
        ids = prompts.ids(record)
        inputs = prompts.soft_inputs([record], [ids])
        decoder = model.get_base_model().get_decoder()
        tokens = torch.tensor([ids])
        new = []
        with torch.no_grad():
            for _ in range(20):
                embeds = embed_with_soft_tokens(decoder, tokens, *packed_soft_tokens(model, inputs))
                token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_a_changed_collaborative_model_is_refused_in_one_line(runs, sasrec_dir, tmp_path):
    other = tmp_path / "sasrec"
    shutil.copytree(sasrec_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"))
    with pytest.raises(UserError, match="SHA-256 .* not the .* this run was trained with"):
        align_run(runs["sft"], tmp_path / "align", collaborative=str(other))


def test_an_aligned_model_is_not_compared_with_a_reference_of_other_tokens(runs, small_data, tmp_path, sasrec_dir):
    text_sft = run_sft(build_config(SFTConfig, {"model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "text"),
                                                "max_steps": 1, "disable_tqdm": True, "train_limit": 4, "bf16": False}))
    with pytest.raises(UserError, match="trained with other collaborative tokens"):
        evaluate_model(small_data, "test", None, runs["sdpo"], "rank", 2, tmp_path / "e", 2, progress=False, reference_adapter=text_sft)
    with pytest.raises(UserError, match="evaluate it without --trunk_cache"):
        evaluate_model(small_data, "test", None, runs["sdpo"], "rank", 2, tmp_path / "e", 2, progress=False, trunk_cache=tmp_path / "t")


def test_collaborative_options_without_a_model_are_refused():
    with pytest.raises(UserError, match="give --collaborative DIR too"):
        build_config(SFTConfig, {"data": "x", "collaborative_score": True})


def test_an_export_carries_its_collaborative_model_and_ranks_as_the_run(runs, small_data, tmp_path):
    from sdpo.training.export import export_adapter

    sft = export_adapter(runs["sft"], tmp_path / "export" / "sft", dtype="fp32")
    sdpo = export_adapter(runs["sdpo"], tmp_path / "export" / "sdpo", reference=sft, dtype="fp32")
    assert sorted(p.name for p in (sdpo / "collaborative").iterdir()) == ["config.json", "items.json", "model.safetensors"]
    records = load_split(small_data, "test", 4)
    expected = Recommender.load(runs["sdpo"], bf16=False).rank_records(records, "reward")
    exported = Recommender.load(sdpo, bf16=False)
    assert exported.prompts.model.folder == sdpo / "collaborative"  # its own copy, not the run's SASRec
    # an exported SFT run is a start for align too: it reads the model the export carries
    aligned = align_run(sft, tmp_path / "from-export", max_steps=1)
    assert f"collaborative: {sft / 'collaborative'}" in (aligned / "sdpo_config.yaml").read_text()
    got = exported.rank_records(records, "reward")
    for mine, theirs in zip(got, expected, strict=True):
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(mine, theirs, strict=True))


def test_a_pipeline_trains_its_sasrec_first_reads_it_in_the_lm_stages_and_fuses(small_data, tmp_path):
    import yaml

    from sdpo.evaluation.fusion import WEIGHTS
    from tests.helpers import sdpo

    config = {
        "model": "tiny", "prompt_seed": 1, "data": {"path": str(small_data)}, "bf16": False,
        "baselines": {"models": [{"model": "sasrec", "l2": "1e-4", "max_epochs": 1, "max_len": 6}]},
        "sft": {"collaborative": "sasrec", "collaborative_score": True, "train_limit": 8, "max_steps": 2, "disable_tqdm": True},
        "align": [{"name": "s-dpo", "negatives": 3, "train_limit": 4, "max_steps": 1, "disable_tqdm": True}],
        "evaluate": {"split": "test", "limit": 3, "protocols": ["rank"], "stages": ["zero-shot", "sft", "s-dpo"], "batch_size": 2},
        "fusion": {"collaborative": "sasrec", "stages": ["s-dpo"], "val_limit": 4},
    }
    (tmp_path / "collab.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", "collab.yaml", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert "collaborative: baselines/sasrec" in (out / "sft" / "sdpo_config.yaml").read_text()  # relative to the study folder
    assert "no trunk cache (collaborative tokens at the input)" in result.stdout and not (out / "eval" / "trunk-cache").exists()
    rows = {(row["stage"], row["protocol"]): row for row in json.loads((out / "results.json").read_text())}
    fusion = rows["fusion-s-dpo", "rank"]
    assert fusion["weight"] in WEIGHTS and fusion["lm_score"] == "reward" and len(fusion["val_tried"]) == len(WEIGHTS)
    assert fusion["val_records"] == 4 and fusion["n_records"] == 3
    assert (out / "eval" / "s-dpo-rank-val" / "metrics.json").is_file() and (out / "eval" / "sft-rank-val" / "metrics.json").is_file()
    assert ("sasrec", "rank") in rows and ("s-dpo", "rank-reward") in rows
    # the SFT stage's reward is against the base model with its initial projectors, on the same collaborative prompts
    assert json.loads((out / "eval" / "sft-rank" / "metrics.json").read_text())["reference"] == "base model"
    again = sdpo("pipeline", "collab.yaml", "--output_dir", "out", cwd=tmp_path)  # a rerun reuses every stage and row
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[sft] reusing" in again.stdout and "[s-dpo] reusing" in again.stdout and "[fusion] reusing" in again.stdout
    report = sdpo("report", "out", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "fusion-s-dpo" in (tmp_path / "report" / "results.md").read_text()
