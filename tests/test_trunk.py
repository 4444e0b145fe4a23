"""The shared-trunk cache: bitwise the scores and generations of the full computation, and never used where it would be wrong."""

import json

import pytest
import torch

from sdpo.data.datasets import load_split
from sdpo.errors import UserError
from sdpo.evaluation.generation import generate_answers
from sdpo.evaluation.protocols import candidate_logps, reference_logps
from sdpo.lm.adapters import first_adapted_layer, shared_trunk_depth
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.trunk import TrunkCache


def adapted_model(last_layers: int | None, seed: int = 1):
    """The tiny Llama (2 layers) with a LoRA adapter on its last `last_layers` layers that changes the outputs."""
    model, tokenizer = load_model("tiny")
    model = add_lora(model, LoraSettings(dropout=0.0, last_layers=last_layers))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer


def count_calls(module) -> list[int]:
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


def test_cached_trunk_gives_the_full_forward_bitwise(small_data, tmp_path):
    records = load_split(small_data, "test")  # 8 records: batches of 3, 3, 2
    base, tokenizer = load_model("tiny")
    adapted, _ = adapted_model(last_layers=1)
    expected = candidate_logps(adapted, tokenizer, records, "music", batch_size=3, progress=False)
    expected_base = reference_logps(adapted, tokenizer, records, "music", batch_size=3, progress=False)

    # the zero-shot model fills the cache; the adapted model then skips layer 0 for its policy and reference passes
    filled = candidate_logps(base.eval(), tokenizer, records, "music", batch_size=3, progress=False,
                             trunk=TrunkCache(tmp_path, base, depth=1))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    layer0 = count_calls(adapted.get_base_model().model.layers[0])
    trunk = TrunkCache(tmp_path, adapted, depth=1)
    cached = candidate_logps(adapted, tokenizer, records, "music", batch_size=3, progress=False, trunk=trunk)
    cached_base = reference_logps(adapted, tokenizer, records, "music", batch_size=3, progress=False, trunk=trunk)
    assert layer0 == [1]  # once: the first loaded batch is also computed in full and compared
    assert sorted(tmp_path.rglob("*.safetensors")) == files
    for want, got in zip(expected + expected_base, cached + cached_base, strict=True):
        assert torch.equal(want, got)
    for want, got in zip(expected_base, filled, strict=True):  # adapter off = the base model
        assert torch.equal(want, got)
    assert not all(torch.equal(a, b) for a, b in zip(expected, expected_base, strict=True))  # the adapter matters
    assert len(adapted.get_base_model().model.layers) == 2  # the layers are back after each cached call


def prompt_passes(module) -> list[int]:
    """Widths of the calls of `module` over more than one token (a prompt's pass, not a generated token's)."""
    widths: list[int] = []
    module.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]) if args[0].shape[1] > 1 else None)
    return widths


def test_generation_from_the_cached_prompt_trunk_is_the_full_generation_bitwise(small_data, tmp_path):
    records = load_split(small_data, "test")  # batches of 3, 3, 2
    base, tokenizer = load_model("tiny")
    adapted, _ = adapted_model(last_layers=1)
    expected = generate_answers(adapted, tokenizer, records, "music", batch_size=3, progress=False)
    expected_base = generate_answers(base.eval(), tokenizer, records, "music", batch_size=3, progress=False)
    assert expected != expected_base  # the adapter matters

    # the zero-shot model fills the cache; the adapted model then skips layer 0 over its prompts
    filled = generate_answers(base, tokenizer, records, "music", batch_size=3, progress=False, trunk=TrunkCache(tmp_path, base, 1))
    assert filled == expected_base and len(list(tmp_path.rglob("*.safetensors"))) == 3
    layer0 = prompt_passes(adapted.get_base_model().model.layers[0].mlp)
    trunk = TrunkCache(tmp_path, adapted, depth=1)
    assert generate_answers(adapted, tokenizer, records, "music", batch_size=3, progress=False, trunk=trunk) == expected
    assert trunk.checked and trunk.usable  # the first loaded batch agreed in every token and logit
    assert len(layer0) == 1  # that batch's full generation: the other prompts never ran layer 0
    assert "forward" not in vars(adapted.get_base_model().model.layers[0])  # the layer is itself again

    # keys and values that are not this model's: the check notices, and the answers stay the full generation's
    from safetensors.torch import load_file, save_file

    for path in tmp_path.rglob("*.safetensors"):
        saved = load_file(path)
        save_file({**saved, "keys": saved["keys"] * 1.5}, str(path))
    trunk = TrunkCache(tmp_path, adapted, depth=1)
    assert generate_answers(adapted, tokenizer, records, "music", batch_size=3, progress=False, trunk=trunk) == expected
    assert trunk.checked and not trunk.usable


def test_a_deeper_trunk_generates_and_ranks_as_the_full_model(small_data, tmp_path):
    """Four layers, LoRA on the last: three trunk layers hand on states and push their own keys and values."""
    from sdpo.lm.models import load_tokenizer, tiny_model

    records = load_split(small_data, "test", limit=4)
    tokenizer = load_tokenizer("tiny")
    base = tiny_model(tokenizer, seed=3, layers=4).eval()
    adapted = add_lora(tiny_model(tokenizer, seed=3, layers=4), LoraSettings(dropout=0.0, last_layers=1))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted.eval()
    expected = generate_answers(adapted, tokenizer, records, "music", batch_size=2, progress=False)
    scores = candidate_logps(adapted, tokenizer, records, "music", batch_size=2, progress=False)
    generate_answers(base, tokenizer, records, "music", batch_size=2, progress=False, trunk=TrunkCache(tmp_path, base, 3))
    candidate_logps(base, tokenizer, records, "music", batch_size=2, progress=False, trunk=TrunkCache(tmp_path, base, 3))
    trunk = TrunkCache(tmp_path, adapted, 3)
    passes = [prompt_passes(layer.mlp) for layer in adapted.get_base_model().model.layers]
    assert generate_answers(adapted, tokenizer, records, "music", batch_size=2, progress=False, trunk=trunk) == expected
    assert trunk.checked and trunk.usable
    assert [len(p) for p in passes] == [1, 1, 1, 3]  # the trunk ran over the checked batch's prompts only
    trunk = TrunkCache(tmp_path, adapted, 3)
    cached = candidate_logps(adapted, tokenizer, records, "music", batch_size=2, progress=False, trunk=trunk)
    assert trunk.usable and all(torch.equal(a, b) for a, b in zip(scores, cached, strict=True))


def test_a_layer_gets_its_own_forward_back_even_when_generation_fails():
    from sdpo.lm.trunk import _prompt_trunk_from

    model, _ = load_model("tiny")
    layers = model.model.layers
    own = layers[1].forward  # stands for a forward a layer carries of its own (an accelerate hook, say)
    layers[0].forward = own
    saved = {"keys": torch.zeros(1, 1, 2, 3, 16), "values": torch.zeros(1, 1, 2, 3, 16), "hidden": torch.zeros(1, 3, 64)}
    with pytest.raises(ValueError, match="failed"):
        with _prompt_trunk_from(model.model, saved):
            assert layers[0].forward is not own
            raise ValueError("generation failed")
    assert layers[0].forward is own and "forward" not in vars(layers[1])


def test_another_batching_or_other_trunk_weights_get_their_own_files(small_data, tmp_path):
    records = load_split(small_data, "test")
    model, tokenizer = load_model("tiny")
    candidate_logps(model, tokenizer, records, "music", batch_size=4, progress=False, trunk=TrunkCache(tmp_path, model, 1))
    candidate_logps(model, tokenizer, records, "music", batch_size=8, progress=False, trunk=TrunkCache(tmp_path, model, 1))
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    other = TrunkCache(tmp_path, model, 1)
    calls = count_calls(model.model.layers[0])
    candidate_logps(model, tokenizer, records, "music", batch_size=8, progress=False, trunk=other)
    assert calls == [1] and len(list(other.folder.iterdir())) == 1
    with torch.no_grad():  # a change above the trunk keeps its folder
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    assert TrunkCache(tmp_path, model, 1).folder == other.folder


def test_an_adapter_inside_the_trunk_is_refused(small_data, tmp_path):
    records = load_split(small_data, "test", limit=2)
    everywhere, tokenizer = adapted_model(last_layers=None)
    assert first_adapted_layer(everywhere) == 0
    assert first_adapted_layer(adapted_model(last_layers=1)[0]) == 1
    assert first_adapted_layer(load_model("tiny")[0]) is None
    with pytest.raises(UserError, match="changes decoder layer 0"):
        candidate_logps(everywhere, tokenizer, records, "music", progress=False, trunk=TrunkCache(tmp_path, everywhere, 1))
    with pytest.raises(UserError, match="depth"):
        TrunkCache(tmp_path, everywhere, 2)


def test_a_cache_that_disagrees_with_the_full_forward_is_not_used_and_a_damaged_file_is_recomputed(small_data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    records = load_split(small_data, "test", limit=4)
    model, tokenizer = load_model("tiny")
    expected = candidate_logps(model, tokenizer, records, "music", batch_size=2, progress=False)
    candidate_logps(model, tokenizer, records, "music", batch_size=2, progress=False, trunk=TrunkCache(tmp_path, model, 1))
    first, second = sorted(tmp_path.rglob("*.safetensors"))
    for path in (first, second):  # states of the right shape that are not this model's
        save_file({"hidden": load_file(path)["hidden"] * 1.5}, str(path))
    trunk = TrunkCache(tmp_path, model, 1)
    got = candidate_logps(model, tokenizer, records, "music", batch_size=2, progress=False, trunk=trunk)
    assert not trunk.usable and "evaluating without the trunk cache" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    first.write_bytes(first.read_bytes()[:100])  # cut short by a crash
    second.unlink()
    got = candidate_logps(model, tokenizer, records, "music", batch_size=2, progress=False, trunk=TrunkCache(tmp_path, model, 1))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert first.stat().st_size > 100 and second.is_file()  # both written again


def test_shared_depth_from_saved_adapters(tmp_path):
    folders = {}
    for name, last_layers in (("last", 1), ("all", None)):
        model, _ = adapted_model(last_layers)
        model.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    assert shared_trunk_depth([folders["last"]]) == 1
    assert shared_trunk_depth([folders["last"], folders["last"]]) == 1
    assert shared_trunk_depth([folders["last"], folders["all"]]) is None
    assert shared_trunk_depth([]) is None
    config = json.loads((folders["last"] / "adapter_config.json").read_text())
    for change in ({"target_modules": "model.layers.1.self_attn.q_proj"}, {"target_modules": ["model.layers.0.mlp.up_proj"]},
                   {"modules_to_save": ["lm_head"]}, {"modules_to_save": ["collaborative_tokens", "lm_head"]}, {"peft_type": "IA3"}):
        (folders["last"] / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert shared_trunk_depth([folders["last"]]) is None, change
    # collaborative tokens' projectors saved beside LoRA: their soft tokens name the trunk cache's files, so the trunk is still shared
    (folders["last"] / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["collaborative_tokens"]}))
    assert shared_trunk_depth([folders["last"]]) == 1


def test_evaluate_with_a_trunk_cache_gives_the_same_predictions(small_data, tmp_path):
    from sdpo.pipeline import evaluate_model

    for name, last_layers in (("last", 1), ("all", None)):
        adapted_model(last_layers)[0].save_pretrained(tmp_path / name)
    common = {"data": small_data, "split": "test", "model_name": "tiny", "limit": 4, "batch_size": 2, "progress": False}
    for protocol in ("rank", "generate"):
        evaluate_model(adapter=tmp_path / "last", protocol=protocol, output=tmp_path / f"plain-{protocol}", **common)
        for run in ("first", "second"):  # fills the cache, then reads it
            output = tmp_path / f"{run}-{protocol}"
            evaluate_model(adapter=tmp_path / "last", protocol=protocol, output=output, trunk_cache=tmp_path / "cache", **common)
            assert (output / "predictions.jsonl").read_text() == (tmp_path / f"plain-{protocol}" / "predictions.jsonl").read_text()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4  # 2 batches x (packed candidates, prompts)
    common["protocol"] = "rank"
    for adapter in (None, tmp_path / "all"):
        with pytest.raises(UserError, match="--lora_layers N"):
            evaluate_model(adapter=adapter, output=tmp_path / "refused", trunk_cache=tmp_path / "cache", **common)


@pytest.fixture(scope="module")
def frozen_projector_sft(small_data, sasrec_dir, tmp_path_factory):
    """A collaborative SFT run on the tiny model, LoRA on its last layer only, its projectors kept as they start (--no_train_projector)."""
    from sdpo.config import build_config
    from sdpo.training.sft import SFTConfig, run_sft

    return run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path_factory.mktemp("frozen-projectors") / "sft"), "max_steps": 2,
        "learning_rate": 5e-2, "lora_dropout": 0.0, "disable_tqdm": True, "train_limit": 8, "bf16": False, "lora_layers": 1,
        "collaborative": str(sasrec_dir), "collaborative_score": True, "train_projector": False,
    }))


def trunk_traffic(monkeypatch) -> dict[str, int]:
    """Counts, from now on, of the batch files trunk caches write and of those they read back for ranking."""
    traffic = {"saved": 0, "loaded": 0}
    load, save = TrunkCache._load_hidden, TrunkCache._save

    def loaded(*args):
        hidden = load(*args)
        traffic["loaded"] += hidden is not None
        return hidden

    def saved(*args):
        traffic["saved"] += 1
        save(*args)

    monkeypatch.setattr(TrunkCache, "_load_hidden", staticmethod(loaded))
    monkeypatch.setattr(TrunkCache, "_save", staticmethod(saved))
    return traffic


def test_sdpo_evaluate_ranks_a_frozen_projector_adapter_from_the_trunk_cache_bitwise(frozen_projector_sft, small_data, tmp_path,
                                                                                      monkeypatch):
    """`sdpo evaluate --trunk_cache` takes a collaborative adapter whose projectors stayed frozen. Its soft tokens are the base
    model's, so the reward's reference pass reads the states the policy's pass saved, and a second evaluation reads every
    batch; the log-probs, rewards and metrics are the full forward's, byte for byte. Generating with a cache is refused."""
    from tests.helpers import assert_user_error, sdpo

    command = ["evaluate", "--data", small_data, "--adapter", frozen_projector_sft, "--limit", 4, "--batch_size", 2, "--no_bf16"]
    traffic = trunk_traffic(monkeypatch)
    printed, saved = {}, {}
    for run, cache, want in (("plain", [], {"saved": 0, "loaded": 0}), ("first", ["--trunk_cache", tmp_path / "cache"], {"saved": 2, "loaded": 2}),
                             ("second", ["--trunk_cache", tmp_path / "cache"], {"saved": 2, "loaded": 6})):  # 2 batches, 2 passes each
        result = sdpo(*command, "--output_dir", tmp_path / run, *cache)
        assert result.returncode == 0, result.stderr[-3000:]
        assert traffic == want, run
        printed[run] = [line for line in result.stdout.splitlines() if line.startswith("  ")]
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        saved[run] = {key: value for key, value in metrics.items() if key != "seconds"}, (tmp_path / run / "predictions.jsonl").read_text()
    assert saved["first"] == saved["plain"] == saved["second"] and '"reward"' in saved["plain"][1]
    assert printed["first"] == printed["plain"] == printed["second"] and any("reward_hr@1" in line for line in printed["plain"])
    generate = sdpo(*command, "--protocol", "generate", "--output_dir", tmp_path / "generate", "--trunk_cache", tmp_path / "cache")
    assert_user_error(generate, "generating from collaborative prompts runs every layer")
