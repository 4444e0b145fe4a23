"""The step benchmark runs both ways and agrees on the log-probs (timings are not asserted)."""

import json

import torch

from sdpo.benchmarks.step import benchmark_step, format_table, naive_logps, naive_sequences, save_results
from sdpo.data.datasets import load_split
from sdpo.lm.models import load_model
from sdpo.lm.precision import compute_context
from tests.test_scoring import random_batch


def test_benchmark_step_on_tiny(small_data, tmp_path):
    records = load_split(small_data, "test", limit=2)
    results = benchmark_step("tiny", records, "music", [1, 3], repeats=1)
    assert [r["negatives"] for r in results] == [1, 3]
    for row in results:
        assert row["max_abs_logp_diff"] <= 1e-4
        assert row["naive_seconds"] > 0 and row["shared_seconds"] > 0 and row["speedup"] > 0
        assert row["shared_tokens"] < row["naive_tokens"]
    save_results(tmp_path / "b.json", "tiny", "cpu", results, 1)
    assert json.loads((tmp_path / "b.json").read_text())["results"] == results
    assert "| 3 |" in format_table(results)


def test_naive_sequences_layout():
    ids, mask, labels = naive_sequences([[1, 2]], [[[3], [4, 5]]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 3, -100], [-100, -100, 4, 5]]


def test_naive_reference_uses_the_fp32_head_in_bf16():
    """The published way's log-probs come from the head the packed kernel uses: fp32 on a bf16 model.

    Old code: the naive way's logits were bf16 (a gap of 0.0048 here against the fp32 head).
    """
    model, tokenizer = load_model("tiny", dtype=torch.bfloat16)
    input_ids, attention, labels = naive_sequences(*random_batch(6, 2, 4), tokenizer.pad_token_id)
    weight = model.lm_head.weight
    with torch.no_grad():
        got = naive_logps(model.eval(), input_ids, attention, labels)  # [R]
        with compute_context(weight):
            hidden = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1][:, :-1]  # bf16
        targets = labels[:, 1:]

        def summed(logits: torch.Tensor) -> torch.Tensor:
            token_logps = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
            return (token_logps * (targets != -100)).sum(-1)

        fp32_head = summed(torch.nn.functional.linear(hidden.float(), weight.float()))
        bf16_head = summed(torch.nn.functional.linear(hidden, weight).float())
    assert hidden.dtype == torch.bfloat16
    assert (got - fp32_head).abs().max() <= 1e-4
    assert (bf16_head - fp32_head).abs().max() > 1e-3


def test_benchmark_trunk_on_tiny(small_data, tmp_path):
    from sdpo.benchmarks.trunk import benchmark_trunk
    from sdpo.benchmarks.trunk import format_table as trunk_table

    result = benchmark_trunk("tiny", small_data, lora_layers=1, n_records=4, repeats=2, batch_size=2, json_out=tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == result
    assert result["trunk_depth"] == 1 and result["records"] == 4
    assert result["max_abs_logp_diff"] == 0.0 and result["cache_used"]  # the cache is exact
    assert len(result["full_seconds"]) == len(result["cached_seconds"]) == 2 and result["speedup"] > 0
    assert result["cache_mb_per_record"] > 0
    assert "cached trunk" in trunk_table(result)
    result = benchmark_trunk("tiny", small_data, lora_layers=1, n_records=4, repeats=1, batch_size=2, json_out=tmp_path / "g.json",
                             protocol="generate")
    assert result["protocol"] == "generate" and result["answers_differing"] == 0 and result["cache_used"]
    assert result["cache_mb_per_record"] > 0 and "0 answers differ" in trunk_table(result)


def test_benchmark_collaborative_on_tiny(small_data, sasrec_dir, tmp_path):
    from tests.helpers import sdpo

    result = sdpo("benchmark", "collaborative", "--model", "tiny", "--collaborative", sasrec_dir, "--data", small_data,
                  "--records", 2, "--negatives", "3", "--repeats", 1, "--json", tmp_path / "c.json", "--no_bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["step"] for r in rows] == ["sft", "s-dpo K=3"]
    for row in rows:
        assert row["text_seconds"] > 0 and row["collaborative_seconds"] > 0
        assert row["collaborative_tokens"] > row["text_tokens"]  # the placeholders and the user line
        assert abs(row["ratio"] - row["collaborative_seconds"] / row["text_seconds"]) < 0.01 * row["ratio"]


def test_benchmark_train_trunk_on_tiny(small_data, tmp_path):
    from sdpo.benchmarks.train_trunk import benchmark_train_trunk, format_table

    result = benchmark_train_trunk("tiny", small_data, lora_layers=1, n_records=3, k=3, repeats=2, json_out=tmp_path / "t.json", bf16=False)
    assert json.loads((tmp_path / "t.json").read_text()) == result
    assert result["trunk_depth"] == 1 and result["records"] == 3 and result["negatives"] == 3
    assert result["max_abs_logp_diff"] < 1e-5 and result["max_abs_grad_diff"] < 1e-5  # the same step, from the shared states
    assert len(result["full_seconds"]) == len(result["shared_seconds"]) == 2 and result["speedup"] > 0
    assert "shared trunk" in format_table(result)


def test_benchmark_generate_on_tiny(small_data, tmp_path):
    from sdpo.benchmarks.generation import WAYS, benchmark_generation
    from sdpo.benchmarks.generation import format_table as generation_table
    from tests.test_preference import sft_run

    run = sft_run(small_data, tmp_path / "sft", lora_dropout=0.0, bf16=False, lora_layers=1)
    result = benchmark_generation("tiny", run, small_data, n_records=5, repeats=1, batch_size=2, json_out=tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text()) == result
    rows = {row["way"]: row for row in result["ways"]}
    assert list(rows) == list(WAYS) and result["records"] == 5
    assert rows["today"]["answers_differing"] == 0 and rows["today"]["speedup"] == 1.0
    assert rows["by_length"]["answers_differing"] == 0  # the same answers, in the records' order
    assert rows["today"]["hr@1_minus_today"]["difference"] == 0.0
    assert "| combined |" in generation_table(result)


def test_benchmark_inject_on_tiny(small_data, sasrec_dir, tmp_path):
    from tests.helpers import sdpo

    result = sdpo("benchmark", "inject", "--model", "tiny", "--collaborative", sasrec_dir, "--data", small_data, "--lora_layers", 1,
                  "--records", 2, "--negatives", 3, "--repeats", 2, "--rank_records", 4, "--batch_size", 2, "--json", tmp_path / "i.json",
                  "--no_bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "i.json").read_text())
    step, rank = saved["step"], saved["rank"]
    assert saved["injection_layer"] == 1 and rank["records"] == 4
    assert all(len(step[f"{way}_seconds"]) == 2 for way in ("input", "late", "late_shared"))
    # late injection from the shared trunk computes the step that runs every layer, and the cache reads what it saved
    assert step["shared_max_abs_logp_diff"] < 1e-5 and step["shared_max_abs_grad_diff"] < 1e-5
    assert rank["read_max_abs_logp_diff"] < 1e-5
    assert rank["batches_read_from_cache"] == rank["batches"] == 2 and rank["batches_read_while_filling"] == 0
    assert step["input_against_late_max_abs_logp_diff"] > 1e-4  # the soft tokens did move: another model
    assert step["projector_gradients"] == {"input": True, "late": True, "late_shared": True}
    assert rank["input_s_per_record"] > 0 and rank["late_read_s_per_record"] > 0
    assert "shared trunk" in result.stdout
