"""The Recommender API, the retriever, two-stage evaluation and `sdpo recommend` on the tiny model."""

import json
from pathlib import Path

import pytest
import torch

from sdpo.baselines.train import BaselineConfig, run_baseline
from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.errors import UserError
from sdpo.evaluation.protocols import candidate_logps
from sdpo.recommend import Recommender, Retriever, evaluate_rerank, make_record
from sdpo.training.preference import AlignConfig, run_align
from sdpo.training.sft import SFTConfig, run_sft
from tests.helpers import assert_user_error, sdpo


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """An SFT run, an S-DPO run from it, and a GRU4Rec retriever, all small."""
    root = tmp_path_factory.mktemp("recommend")
    sft = run_sft(build_config(SFTConfig, {"model": "tiny", "data": str(small_data), "output_dir": str(root / "sft"), "max_steps": 2,
                                           "learning_rate": 5e-2, "disable_tqdm": True, "train_limit": 8, "prompt_seed": 2}))
    align = run_align(build_config(AlignConfig, {"sft": str(sft), "output_dir": str(root / "sdpo"), "negatives": 3, "max_steps": 2,
                                                 "learning_rate": 5e-2, "disable_tqdm": True, "train_limit": 8}))
    run_baseline(BaselineConfig(model="gru4rec", data=str(small_data), output_dir=str(root / "gru4rec"), l2="1e-4", max_epochs=1, progress=False))
    return {"sft": sft, "sdpo": align, "retriever": root / "gru4rec"}


def test_rank_orders_by_the_evaluation_scores_with_the_run_prompts(runs, small_data):
    recommender = Recommender.load(runs["sft"])
    assert recommender.prompt_seed == 2 and recommender.domain == "music"  # the run's prompts, from its config
    record = load_split(small_data, "test", 1)[0]
    ranked = recommender.rank(record.history, record.candidates)
    assert sorted(t for t, _ in ranked) == sorted(record.candidates)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    query = make_record(record.history, record.candidates)
    expected = candidate_logps(recommender.model, recommender.tokenizer, [query], "music", seed=2, progress=False)[0]
    assert dict(ranked) == pytest.approx(dict(zip(record.candidates, expected.tolist(), strict=True)), abs=1e-5)


def test_reward_of_an_align_run_is_against_its_sft_run(runs, small_data):
    policy, sft = Recommender.load(runs["sdpo"]), Recommender.load(runs["sft"])
    assert policy.reference_adapter == str(runs["sft"])
    record = load_split(small_data, "test", 1)[0]
    reward = dict(policy.rank(record.history, record.candidates, "reward"))
    logp, reference = dict(policy.rank(record.history, record.candidates)), dict(sft.rank(record.history, record.candidates))
    assert all(reward[c] == pytest.approx(logp[c] - reference[c], abs=1e-4) for c in record.candidates)
    answer = policy.generate(record.history, record.candidates)
    assert isinstance(answer["text"], str) and (answer["choice"] is None or answer["choice"] in record.candidates)


def test_batched_generation_answers_as_one_query_at_a_time(runs, small_data):
    """generate_records pads a batch on the left; each answer is the one its query gets alone.

    In fp32: under bf16 (the default on a CPU whose bf16 matmuls are fast) padding changes the sums' rounding."""
    policy = Recommender.load(runs["sdpo"], bf16=False)
    # histories of 10, 8, 6, 4 and 2 items: prompts of different lengths share a batch
    queries = [make_record(r.history[2 * i:], r.candidates) for i, r in enumerate(load_split(small_data, "test", 5))]
    assert len({len(q.history) for q in queries}) == 5
    alone = [policy.generate(q.history, q.candidates) for q in queries]
    assert policy.generate_records(queries, batch_size=5) == alone


def test_bad_queries_are_user_errors(runs):
    with pytest.raises(UserError, match="the history is empty"):
        make_record([], ["a", "b"])
    with pytest.raises(UserError, match="candidate 'a' is listed twice"):
        make_record(["x"], ["a", "b", "a"])
    with pytest.raises(UserError, match="non-empty one-line string"):
        make_record(["x"], ["a", "b\nc"])
    with pytest.raises(UserError, match="not a training run folder"):
        Recommender.load(runs["retriever"])
    with pytest.raises(UserError, match="--device 'gpu' is not a device"):
        Recommender.load(runs["sdpo"], device="gpu")
    assert next(Recommender.load(runs["sdpo"], device="cpu").model.parameters()).device.type == "cpu"


def test_retriever_picks_from_the_catalogue_outside_the_history(runs, small_data):
    retriever = Retriever.load(runs["retriever"])
    record = load_split(small_data, "train", 1)[0]
    top = retriever.top([record.history], 20)[0]
    titles = [t for t, _ in top]
    assert len(titles) == 20 == len(set(titles)) and not set(titles) & set(record.history)
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    pool = record.candidates[:5]
    assert {t for t, _ in retriever.top([record.history], 3, [pool])[0]} <= set(pool)
    assert len(retriever.top([["Nobody Knows This", *record.history]], 20)[0]) == 20  # unseen history items are skipped
    with pytest.raises(UserError, match="candidate item 'Nobody Knows This' is not in the retriever's catalogue"):
        retriever.top([record.history], 3, [[*pool, "Nobody Knows This"]])
    with pytest.raises(UserError, match="not a trained retriever"):
        Retriever.load(runs["sft"])


def test_rerank_evaluation_against_the_retriever_alone(runs, small_data):
    records = load_split(small_data, "test")
    result = evaluate_rerank(Recommender.load(runs["sft"]), Retriever.load(runs["retriever"]), records, top=20, progress=False)
    metrics = result.metrics
    assert set(metrics["lm_minus_retriever"]) == {"hr@1", "ndcg@10"}
    for prediction in result.predictions:
        retrieved = prediction["target"] in prediction["retrieved"]
        assert (prediction["rank"] is None) == (not retrieved) == (prediction["retriever_rank"] is None)
        assert sorted(prediction["reranked"]) == sorted(prediction["retrieved"])
    recall = sum(p["retriever_rank"] is not None for p in result.predictions) / len(records)
    assert metrics["recall@20"] == recall and metrics["hr@1"] <= recall and metrics["retriever_hr@1"] <= recall


def test_recommend_command(runs, small_data, tmp_path):
    record = load_split(small_data, "test", 1)[0]
    one = sdpo("recommend", "--run", runs["sft"], "--history", *record.history, "--candidates", *record.candidates[:4])
    assert one.returncode == 0, one.stderr[-2000:]
    lines = [line for line in one.stdout.splitlines() if line.strip()[:2] in ("1.", "2.", "3.", "4.")]
    assert len(lines) == 4 and all(any(c in line for c in record.candidates[:4]) for line in lines)
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(json.dumps({"id": r.id, "history": r.history}) for r in load_split(small_data, "test", 2)) + "\n")
    many = sdpo("recommend", "--run", runs["sdpo"], "--input", queries, "--output", tmp_path / "out.jsonl", "--retriever", runs["retriever"],
                "--top", "5", "--score", "reward")
    assert many.returncode == 0, many.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["ranking"]) == 5 for r in rows)
    assert_user_error(sdpo("recommend", "--run", runs["sft"], "--history", "--candidates", "a", "b"), "give either --history")
    assert_user_error(sdpo("recommend", "--run", runs["sft"], "--history", "x", "--candidates", "a", "a"), "listed twice")
    assert_user_error(sdpo("recommend", "--run", runs["sft"], "--history", "x", "--candidates", "a", "Unheard Of",
                           "--retriever", runs["retriever"]),
                      "not in the retriever's catalogue")
    assert_user_error(sdpo("recommend", "--run", tmp_path, "--history", "x", "--candidates", "a", "b"), "not a training run folder")
    assert torch.get_num_threads() >= 1


def test_evaluate_rerank_protocol_writes_metrics(runs, small_data, tmp_path):
    from sdpo.pipeline import evaluate_model

    metrics = evaluate_model(small_data, "test", None, runs["sft"], "rerank", 4, tmp_path / "out", retriever=runs["retriever"], top=10,
                             progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == metrics and metrics["protocol"] == "rerank" and metrics["top"] == 10 and metrics["n_records"] == 4
    for key in ("hr@1", "ndcg@10", "recall@10", "retriever_hr@1", "retriever_ndcg@10"):
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high
    with pytest.raises(UserError, match="rerank and --retriever DIR go together"):
        evaluate_model(small_data, "test", None, runs["sft"], "rerank", 4, tmp_path / "o2")


def test_export_writes_a_small_folder_that_ranks_as_the_run(runs, small_data, tmp_path, monkeypatch):
    """sdpo export: bf16 (or exact fp32) weights, the run config pointing at the exported SFT, errors said plainly."""
    from safetensors import safe_open

    sft_out, policy_out, exact_out = tmp_path / "sft", tmp_path / "sdpo", tmp_path / "sdpo-fp32"
    assert sdpo("export", runs["sft"], "--out", sft_out).returncode == 0
    done = sdpo("export", runs["sdpo"], "--out", policy_out, "--reference", sft_out)
    assert done.returncode == 0 and "bf16 weights" in done.stdout, done.stderr[-2000:]
    assert sdpo("export", runs["sft"], "--out", tmp_path / "sft-fp32", "--dtype", "fp32").returncode == 0
    assert sdpo("export", runs["sdpo"], "--out", exact_out, "--reference", tmp_path / "sft-fp32", "--dtype", "fp32").returncode == 0
    assert sorted(p.name for p in policy_out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "log.jsonl", "sdpo_config.yaml"]
    with safe_open(policy_out / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    record = load_split(small_data, "test", 1)[0]
    # in fp32, so that the bf16 export's rounding is all that differs (under bf16 compute it would vanish in the matmuls' own)
    trained, exported, exact = (Recommender.load(folder, bf16=False) for folder in (runs["sdpo"], policy_out, exact_out))
    assert Path(exported.reference_adapter).resolve() == sft_out.resolve() and exported.prompt_seed == trained.prompt_seed == 2
    for score in ("logp", "reward"):
        before = dict(trained.rank(record.history, record.candidates, score))
        assert dict(exact.rank(record.history, record.candidates, score)) == pytest.approx(before, abs=1e-6)
        after = dict(exported.rank(record.history, record.candidates, score))
        assert after == pytest.approx(before, abs=0.05) and after != pytest.approx(before, abs=1e-6)  # bf16 rounding, small
    # the pair works wherever the two folders travel together, from any working folder
    rewards = dict(exported.rank(record.history, record.candidates, "reward"))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for folder in (sft_out, policy_out):
        folder.rename(moved / folder.name)
    monkeypatch.chdir(moved.parent.parent)
    travelled = Recommender.load(moved / policy_out.name, bf16=False)
    assert dict(travelled.rank(record.history, record.candidates, "reward")) == rewards
    monkeypatch.chdir(tmp_path)
    assert_user_error(sdpo("export", runs["sdpo"], "--out", tmp_path / "x"), "export that run first", "--reference")
    assert_user_error(sdpo("export", runs["sdpo"], "--out", tmp_path / "x", "--reference", runs["sft"]), "not an exported folder")
    assert_user_error(sdpo("export", runs["sdpo"], "--out", tmp_path / "x", "--reference", exact_out), "was exported from")
    assert_user_error(sdpo("export", runs["sft"], "--out", exact_out), "not an empty folder")
    assert_user_error(sdpo("export", runs["sft"], "--out", tmp_path / "x", "--reference", tmp_path / "sft-fp32"), "Leave --reference out")
    assert_user_error(sdpo("export", runs["sft"], "--out", tmp_path / "x", "--dtype", "fp16"), "choose bf16 or fp32")
    assert not (tmp_path / "x").exists()
