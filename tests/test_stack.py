"""A stack of ID models read as one collaborative model: their vectors side by side, one score per member."""

import json

import pytest
import torch

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.baselines.stack import StackedCollaborative, make_stack
from sdpo.baselines.train import BaselineConfig, run_baseline
from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.errors import UserError
from sdpo.lm.models import load_tokenizer
from sdpo.recommend import Recommender
from sdpo.training.export import export_adapter
from sdpo.training.sft import SFTConfig, run_sft


@pytest.fixture(scope="module")
def stack_dir(small_data, sasrec_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    run_baseline(BaselineConfig(model="gru4rec", data=str(small_data), output_dir=str(folder / "gru4rec"), l2="1e-4", max_epochs=1,
                                max_len=6, progress=False, dim=32))
    return make_stack([sasrec_dir, folder / "gru4rec"], folder / "stack")


def test_a_stack_is_its_members_side_by_side(stack_dir, sasrec_dir, small_data):
    stack = StackedCollaborative.load(stack_dir)
    assert [m.name for m in stack.members] == ["sasrec", "gru4rec"]
    sasrec, gru4rec = stack.members
    assert stack.dim == sasrec.dim + 32 and stack.segments == [sasrec.dim, 32]
    records = load_split(small_data, "test", 3)
    batch, one, two = stack.encode(records), sasrec.encode(records), gru4rec.encode(records)
    assert torch.equal(batch.candidates, torch.cat([one.candidates, two.candidates], dim=-1))
    assert torch.equal(batch.user, torch.cat([one.user, two.user], dim=-1))
    assert torch.equal(batch.scores, torch.stack([one.scores, two.scores], dim=-1))  # [B, C, 2]: each member's own
    assert sasrec.sha256 == CollaborativeModel.load(sasrec_dir).sha256  # the copy inside is the model itself
    assert json.loads((stack_dir / "stack.json").read_text())["members"][1]["sha256"] == gru4rec.sha256


def test_each_member_scores_its_own_slot_in_the_prompts(stack_dir, small_data):
    stack = StackedCollaborative.load(stack_dir)
    tokenizer = load_tokenizer("tiny")
    records = load_split(small_data, "test", 2)
    together = CollaborativePrompts(tokenizer, "music", 0, stack, score=True)
    ids = [together.ids(r) for r in records]
    inputs = together.soft_inputs(records, ids)
    assert inputs["soft_scores"].shape == (*inputs["soft_positions"].shape, 2)
    for m, member in enumerate(stack.members):
        alone = CollaborativePrompts(tokenizer, "music", 0, member, score=True).soft_inputs(records, ids)
        assert torch.allclose(inputs["soft_scores"][..., m], alone["soft_scores"], atol=1e-5)


def test_a_run_reads_a_stack_trains_on_it_and_exports_it(stack_dir, small_data, tmp_path):
    run = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 1, "train_limit": 4,
        "disable_tqdm": True, "collaborative": str(stack_dir), "collaborative_score": True, "bf16": False,
    }))
    stack = StackedCollaborative.load(stack_dir)
    recommender = Recommender.load(run, bf16=False)
    projector = recommender.model.get_base_model().collaborative_tokens.items.net[0]
    assert projector.in_features == stack.dim + 2  # the stacked vector and one score per member
    records = load_split(small_data, "test", 2)
    expected = recommender.rank_records(records, "logp")
    exported = export_adapter(run, tmp_path / "export", dtype="fp32")
    assert (exported / "collaborative" / "stack.json").is_file()
    assert sorted(p.name for p in (exported / "collaborative" / "members").iterdir()) == ["gru4rec", "sasrec"]
    got = Recommender.load(exported, bf16=False).rank_records(records, "logp")
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in expected]


def test_a_stack_needs_models_of_one_catalogue(sasrec_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(sasrec_dir, other)
    titles = json.loads((other / "items.json").read_text())
    titles["titles"][0] = "A title of another catalogue"  # the same ids, another title: a table of other data
    (other / "items.json").write_text(json.dumps(titles))
    with pytest.raises(UserError, match="different item tables"):
        make_stack([sasrec_dir, other], tmp_path / "stack")
    with pytest.raises(UserError, match="two or more"):
        make_stack([sasrec_dir], tmp_path / "stack")
