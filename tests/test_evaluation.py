"""Both protocols end to end on the tiny model, checked against independent computations."""

import gzip
import json

import pytest
import torch

from sdpo.data.datasets import load_split
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.errors import UserError
from sdpo.evaluation.generation import generate_answers
from sdpo.evaluation.metrics import target_ranks
from sdpo.evaluation.protocols import candidate_logps, evaluate
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.pipeline import evaluate_model
from tests.test_scoring import plain_logprob


def test_rank_protocol_orders_by_plain_logprobs(tiny, small_data):
    model, tokenizer = tiny
    records = load_split(small_data, "test", limit=3)
    result = evaluate(model, tokenizer, records, "music", "rank", batch_size=2, progress=False)
    for record, prediction in zip(records, result.predictions, strict=True):
        prompt = record_prompt_ids(tokenizer, record, "music")
        with torch.no_grad():
            expected = {c: plain_logprob(model, prompt, encode_answer(tokenizer, c)) for c in record.candidates}
        order = sorted(record.candidates, key=lambda c: -expected[c])
        got = [entry["title"] for entry in prediction["ranking"]]
        assert got == order
        assert prediction["rank"] == order.index(record.target) + 1
    assert result.metrics["n_records"] == 3 and result.metrics["valid_ratio"] == 1.0


def test_generate_decodes_only_new_tokens(tiny, small_data):
    model, tokenizer = tiny
    records = load_split(small_data, "test", limit=3)
    texts = generate_answers(model, tokenizer, records, "music", batch_size=2, progress=False)
    assert len(texts) == 3
    for record, text in zip(records, texts, strict=True):
        assert "- " + record.candidates[0] not in text  # the prompt's candidate list is not echoed back
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 21
    # batching (left padding) does not change greedy answers
    assert texts == [generate_answers(model, tokenizer, [r], "music", progress=False)[0] for r in records]


def test_generating_by_prompt_length_gives_todays_answers_in_the_records_order(tiny, small_data):
    model, tokenizer = tiny
    records = load_split(small_data, "test", limit=7)
    today = generate_answers(model, tokenizer, records, "music", batch_size=3, progress=False)
    assert generate_answers(model, tokenizer, records, "music", batch_size=3, progress=False, by_length=True) == today
    lengths = [len(record_prompt_ids(tokenizer, r, "music")) for r in records]
    assert lengths != sorted(lengths)  # the records are not in prompt-length order already: the reordering did something


def test_stopping_after_the_longest_title_keeps_the_start_of_todays_answers(tiny, small_data):
    from sdpo.evaluation.generation import MAX_NEW_TOKENS, _answer_budget

    model, tokenizer = tiny
    records = load_split(small_data, "test", limit=4)
    budget = _answer_budget(tokenizer, records)
    longest = max(len(encode_answer(tokenizer, t)) for r in records for t in r.candidates)
    assert budget == min(MAX_NEW_TOKENS, longest) and budget < MAX_NEW_TOKENS  # LastFM's titles are shorter than 20 tokens
    today = generate_answers(model, tokenizer, records, "music", batch_size=4, progress=False)
    stopped = generate_answers(model, tokenizer, records, "music", batch_size=4, progress=False, stop_after_titles=True)
    for full, short in zip(today, stopped, strict=True):
        assert full.startswith(short)  # greedy decoding: the same tokens, fewer of them
    assert any(len(short) < len(full) for full, short in zip(today, stopped, strict=True))  # the random tiny model rambles: cut


def test_evaluate_model_writes_files(small_data, tmp_path):
    metrics = evaluate_model(small_data, "test", "tiny", None, "rank", 4, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == metrics
    for key in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "valid_ratio", "n_records", "model", "adapter", "protocol", "seconds"):
        assert key in saved
    assert saved["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu") and saved["batch_size"] == 8
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["ranking"]) == 20


def random_adapter(folder, scale: float):
    """A saved LoRA adapter on the tiny model whose B matrices are `scale`-sized noise (0: the base model)."""
    base, tokenizer = load_model("tiny")
    model = add_lora(base, LoraSettings(dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale) if scale else param.zero_()
    model.save_pretrained(folder)
    return model.eval(), tokenizer


def test_rank_by_reward_against_the_base_model(small_data, tmp_path):
    policy, tokenizer = random_adapter(tmp_path / "adapter", 0.5)
    metrics = evaluate_model(small_data, "test", "tiny", tmp_path / "adapter", "rank", 3, tmp_path / "out", score="reward", progress=False,
                             bf16=False)  # as the fp32 reference computation below
    assert metrics["score"] == "reward" and metrics["reference"] == "base model"
    for key in ("hr@1", "reward_hr@1", "reward_mrr"):
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high
    prediction = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    record = load_split(small_data, "test", 3)[0]
    prompt = record_prompt_ids(tokenizer, record, "music")
    base, _ = load_model("tiny")
    with torch.no_grad():
        for entry in prediction["ranking"][:3]:
            answer = encode_answer(tokenizer, entry["title"])
            expected = plain_logprob(policy, prompt, answer) - plain_logprob(base.eval(), prompt, answer)
            assert entry["reward"] == pytest.approx(expected, abs=1e-3)
    rewards = [entry["reward"] for entry in prediction["ranking"]]
    assert rewards == sorted(rewards, reverse=True) and prediction["rank"] == prediction["reward_rank"]


def test_an_untrained_adapter_ties_every_reward_and_the_ties_are_seeded(small_data, tmp_path):
    random_adapter(tmp_path / "adapter", 0.0)
    metrics = evaluate_model(small_data, "test", "tiny", tmp_path / "adapter", "rank", None, tmp_path / "out", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all(entry["reward"] == 0.0 for row in rows for entry in row["ranking"])
    records = load_split(small_data, "test")
    assert [row["reward_rank"] for row in rows] == target_ranks(records, [[0.0] * 20] * len(records))
    assert metrics["reward_hr@1"] == sum(row["reward_rank"] == 1 for row in rows) / len(rows)


def test_evaluation_refuses_reward_without_an_adapter_and_contradicting_settings(small_data, tmp_path):
    with pytest.raises(UserError, match="give the policy with --adapter"):
        evaluate_model(small_data, "test", "tiny", None, "rank", 2, tmp_path / "o", score="reward")
    with pytest.raises(UserError, match="--score 'best'"):
        evaluate_model(small_data, "test", "tiny", None, "rank", 2, tmp_path / "o", score="best")
    with pytest.raises(UserError, match="--batch_size must be at least 1"):
        evaluate_model(small_data, "test", "tiny", None, "rank", 2, tmp_path / "o", batch_size=0)
    with pytest.raises(UserError, match="--device 'gpu' is not a device"):
        evaluate_model(small_data, "test", "tiny", None, "rank", 2, tmp_path / "o", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: this machine has no CUDA GPU"):
            evaluate_model(small_data, "test", "tiny", None, "rank", 2, tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists()


def test_bf16_scores_follow_fp32_within_bf16_noise(small_data):
    records = load_split(small_data, "test", 2)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_model("tiny", dtype=dtype)
        rows[dtype] = torch.stack(candidate_logps(model, tokenizer, records, "music", progress=False))
    gap = (rows[torch.float32] - rows[torch.bfloat16]).abs()
    assert rows[torch.bfloat16].dtype == torch.float32  # log-probs are summed in fp32
    assert 0 < gap.max() < 0.5 and gap.mean() < 0.1


@pytest.mark.parametrize("protocol, stop_at, remaining", [("rank", 9, 4), ("generate", 5, 2)])
def test_an_interrupted_evaluation_continues_to_the_same_result(small_data, tmp_path, monkeypatch, protocol, stop_at, remaining):
    """Killed mid-way, an evaluation rerun computes only what its journal lacks and ends where an uninterrupted one does.

    6 records in batches of 2: rank makes a log-prob pass and a reference pass (6 prompts each),
    generate one pass; stop_at is the prompt being encoded when the process is interrupted.
    """
    from sdpo.data.prompts import TextPrompts

    random_adapter(tmp_path / "adapter", 0.5)
    encode = TextPrompts.ids
    calls = []
    interrupt = {"at": stop_at}  # the prompt (1-based, since the last run began) at which to interrupt

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt["at"]:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    def run(out, prompt_seed=0):
        calls.clear()
        return evaluate_model(small_data, "test", "tiny", tmp_path / "adapter", protocol, 6, out, 2, prompt_seed=prompt_seed, progress=False)

    full = run(tmp_path / "full")  # before the patch: uninterrupted, nothing counted
    monkeypatch.setattr(TextPrompts, "ids", counting)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    journal = tmp_path / "cut" / "progress.jsonl.gz"
    assert journal.is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    with open(journal, "ab") as f:
        f.write(gzip.compress(b'{"kind": "logp", "id": "test-5", "value": [1.0, 2.0, 3.0]}\n')[:20])  # a batch a kill cut off
    interrupt["at"] = None
    resumed = run(tmp_path / "cut")
    assert len(calls) == remaining
    assert not journal.exists()
    drop = ("seconds",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
    assert (tmp_path / "cut" / "predictions.jsonl").read_text() == (tmp_path / "full" / "predictions.jsonl").read_text()
    # a journal written under other settings is started over
    interrupt["at"] = 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "other")
    interrupt["at"] = None
    run(tmp_path / "other", prompt_seed=1)
    assert len(calls) == (12 if protocol == "rank" else 6)
