"""Both protocols end to end on the tiny model, checked against independent computations."""

import json

import torch

from sdpo.datasets import load_split
from sdpo.evaluation import evaluate, generate_answers
from sdpo.pipeline import evaluate_model
from sdpo.prompts import encode_answer, record_prompt_ids
from tests.test_scoring import plain_logprob


def test_rank_protocol_orders_by_plain_logprobs(tiny, small_data):
    model, tokenizer = tiny
    records = load_split(small_data, "test", limit=3)
    result = evaluate(model, tokenizer, records, "music", "rank", batch_size=2, progress=False)
    for record, prediction in zip(records, result.predictions):
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
    for record, text in zip(records, texts):
        assert "- " + record.candidates[0] not in text  # the prompt's candidate list is not echoed back
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 21
    # batching (left padding) does not change greedy answers
    assert texts == [generate_answers(model, tokenizer, [r], "music", progress=False)[0] for r in records]


def test_evaluate_model_writes_files(small_data, tmp_path):
    metrics = evaluate_model(small_data, "test", "tiny", None, "rank", 4, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == metrics
    for key in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", "valid_ratio", "n_records", "model", "adapter", "protocol", "seconds"):
        assert key in saved
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["ranking"]) == 20
