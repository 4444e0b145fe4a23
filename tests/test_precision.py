"""The default precision: bf16 only where the device has it natively and, on a CPU, multiplies faster in it."""

import json
import math
import warnings

import pytest

from sdpo.benchmarks.precision import benchmark_precision, format_table
from sdpo.lm import precision


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU reports (flags) and measures (bf16 matmul speedup); the probe counts its calls."""
    calls = []

    def fake(flags: set[str], speedup: float):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(precision, "cpu_bf16_matmul_speedup", lambda: calls.append(1) or speedup)
        return calls

    return fake


def test_no_native_bf16_means_fp32_without_measuring(cpu):
    calls = cpu({"avx2", "fma"}, speedup=9.0)
    assert precision.bf16_supported("cpu") is False and precision.resolve_bf16(None, "cpu") is False
    assert calls == []  # emulated bf16 is never timed


def test_native_bf16_that_measures_slower_stays_fp32(cpu):
    """An Intel Xeon with AVX512-BF16 multiplied bf16 matrices at 0.4-0.65x fp32: the flags alone chose bf16 there."""
    cpu({"avx2", "avx512_bf16"}, speedup=0.61)
    assert precision.resolve_bf16(None, "cpu") is False
    with pytest.warns(UserWarning, match=r"0\.61x its fp32 speed.*--no_bf16"):
        assert precision.resolve_bf16(True, "cpu") is True  # asking still gets it


def test_native_bf16_that_measures_faster_is_the_default(cpu):
    cpu({"avx2", "avx512_bf16"}, speedup=precision.CPU_BF16_MIN_SPEEDUP + 0.01)
    assert precision.resolve_bf16(None, "cpu") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_bf16(True, "cpu") is True and precision.resolve_bf16(False, "cpu") is False


def test_emulated_bf16_warns_when_asked_for(cpu):
    cpu(set(), speedup=1.0)
    with pytest.warns(UserWarning, match="emulated"):
        precision.resolve_bf16(True, "cpu")


def test_matmul_probe_measures_a_ratio():
    precision.cpu_bf16_matmul_speedup.cache_clear()
    speedup = precision.cpu_bf16_matmul_speedup(rows=32, inner=32, cols=32, repeats=3)
    assert math.isfinite(speedup) and speedup > 0
    precision.cpu_bf16_matmul_speedup.cache_clear()


def test_benchmark_precision_on_tiny(small_data, tmp_path):
    """fp32, bf16 (fp32 LM head) and bf16_all (the head in bf16 too, as before) side by side.

    Old code: two precisions only (no bf16_all, no packed-against-naive gaps, no --exact_records).
    """
    result = benchmark_precision("tiny", small_data, ks=[3], n_records=2, repeats=1, rank_records=4, batch_size=2,
                                 json_out=tmp_path / "p.json", exact_records=1)
    assert json.loads((tmp_path / "p.json").read_text()) == result
    assert list(result["variants"]) == ["fp32", "bf16", "bf16_all"]
    assert [row["what"] for row in result["steps"]] == ["sft", "s-dpo K=3"]
    for row in [*result["steps"], result["rank"]]:
        assert all(row[f"{name}_seconds"] > 0 for name in result["variants"])
        # the ratio of the unrounded seconds; the row keeps the seconds to 1 ms, so the ratio recomputed here may differ by ~0.01
        assert row["fp32_head_speedup"] == pytest.approx(row["bf16_all_seconds"] / row["bf16_seconds"], abs=0.02)
    assert result["rank"]["records"] == 4 and result["agreement"]["records"] == 4
    for name in ("bf16", "bf16_all"):
        assert 0 < result["agreement"][name]["max_abs_logp_diff"] < 0.5 and 0 <= result["agreement"][name]["top1_agreement"] <= 1
    exactness = result["packed_against_naive"]
    assert exactness["records"] == 1 and exactness["negatives"] == [3]
    assert exactness["fp32"]["K=3"] <= 1e-4 and all(0 <= exactness[name]["K=3"] < 0.1 for name in ("bf16", "bf16_all"))
    assert result["bf16_default"] == precision.bf16_supported("cpu")
    assert (result["cpu_bf16_matmul_speedup"] is None) == (not result["cpu_native_bf16"])
    table = format_table(result)
    assert "sdpo's default here" in table and "bf16_all records/s" in table and "packed against one sequence per answer" in table


def test_cpu_name_gives_the_family_and_model_that_tell_a_generation():
    block = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\nmodel\t\t: 9\n"
    assert precision.cpu_name(block) == "AMD EPYC (family 23 model 1)"
    assert precision.cpu_name("model name\t: Some CPU\n") == "Some CPU"
