"""A shared trunk in training: align steps that run only the adapted layers train the adapter they would have trained anyway."""

import json

import pytest
from safetensors.torch import load_file

from sdpo.config import build_config
from sdpo.errors import UserError
from sdpo.training.preference import AlignConfig, run_align
from sdpo.training.sft import SFTConfig, run_sft


def sft_run(small_data, out, **overrides):
    return run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(out), "max_steps": 2, "learning_rate": 5e-2, "lora_dropout": 0.0,
        "disable_tqdm": True, "train_limit": 8, "bf16": False, "lora_layers": 1, **overrides,
    }))


def align_run(sft_dir, out, **overrides):
    # Adam turns the fp32 rounding differences of the two row layouts into weight gaps that grow with the learning
    # rate: at 5e-2 they reached 1.2e-5 on an AVX-512 CPU (AMD Zen 4), at 1e-2 they stay well inside 1e-5
    return run_align(build_config(AlignConfig, {
        "sft": str(sft_dir), "output_dir": str(out), "max_steps": 3, "learning_rate": 1e-2, "negatives": 3, "train_limit": 8,
        "per_device_train_batch_size": 4, "logging_steps": 1, "disable_tqdm": True, "bf16": False, **overrides,
    }))


def assert_same_training(one, two):
    first, second = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        gap = (first[name] - second[name]).abs().max().item()
        assert gap <= 1e-5, f"{name}: the two adapters differ by {gap:.2e}"
    sft_b = [n for n in first if "lora_B" in n]
    assert sft_b and max(first[n].abs().max().item() for n in sft_b) > 1e-3  # it trained
    losses = [[e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in e] for run in (one, two)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.fixture(scope="module")
def text_sft(small_data, tmp_path_factory):
    return sft_run(small_data, tmp_path_factory.mktemp("trunk-states") / "sft")


@pytest.mark.parametrize("reference", ["precomputed", "adapter"])
def test_the_shared_trunk_trains_the_same_adapter(text_sft, tmp_path, monkeypatch, reference):
    from sdpo.training.trunk_states import RecordTrunk

    sft = text_sft
    plain = align_run(sft, tmp_path / "plain", reference=reference)
    used, real = [], RecordTrunk.decoder_output
    monkeypatch.setattr(RecordTrunk, "decoder_output", lambda self, *args: used.append(self.depth) or real(self, *args))
    shared = align_run(sft, tmp_path / "shared", reference=reference, share_trunk=True)
    assert_same_training(plain, shared)
    assert used == [1] * (3 if reference == "precomputed" else 6)  # every step (and its reference pass) from layer 1 on


def test_the_shared_trunk_with_frozen_collaborative_projectors(small_data, sasrec_dir, tmp_path):
    sft = sft_run(small_data, tmp_path / "sft", collaborative=str(sasrec_dir), collaborative_score=True)
    plain = align_run(sft, tmp_path / "plain", train_projector=False)
    shared = align_run(sft, tmp_path / "shared", train_projector=False, share_trunk=True)
    assert_same_training(plain, shared)
    with pytest.raises(UserError, match="freeze them"):
        align_run(sft, tmp_path / "trained-projectors", share_trunk=True)


def test_the_shared_trunk_needs_lora_above_the_first_layer(small_data, tmp_path):
    sft = sft_run(small_data, tmp_path / "sft", lora_layers=None)
    with pytest.raises(UserError, match="--lora_layers N"):
        align_run(sft, tmp_path / "align", share_trunk=True)


def test_the_trunk_states_are_kept_for_the_next_align_run_from_the_same_sft(text_sft, tmp_path, monkeypatch):
    from sdpo.training.trunk_states import RecordTrunk

    first = align_run(text_sft, tmp_path / "first", share_trunk=True)
    kept = sorted((text_sft / "reference-cache").glob("trunk-*.safetensors"))
    assert kept, "no trunk file beside the reference tables"
    stored = RecordTrunk.from_tensors(load_file(str(kept[0])))
    assert stored.depth == 1 and len(stored.states) == 8 and len(stored.spans[0]) == len(stored.spans[-1])

    def computed_again(*args, **kwargs):
        raise AssertionError("the trunk was computed again")

    monkeypatch.setattr(RecordTrunk, "compute", computed_again)
    second = align_run(text_sft, tmp_path / "second", share_trunk=True)  # reads the kept states
    assert_same_training(first, second)


def test_record_trunk_tensors_read_back_whole():
    import torch

    from sdpo.training.trunk_states import RecordTrunk

    trunk = RecordTrunk(3, [torch.randn(5, 4), torch.randn(7, 4)], [2, 3], [[(2, 3), (3, 5)], [(3, 5), (5, 6), (6, 7)]])
    again = RecordTrunk.from_tensors(trunk.to_tensors())
    assert again.depth == 3 and again.prompt_lengths == [2, 3] and again.spans == trunk.spans
    assert all(torch.equal(a, b) for a, b in zip(again.states, trunk.states, strict=True))
