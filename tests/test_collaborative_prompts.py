"""Prompts with collaborative placeholders: the text-only prompt plus one placeholder per title and one for the user."""

import pytest

from sdpo.data.collaborative_prompts import USER_LINE, build_collaborative_prompt, collaborative_prompt_ids, placeholder_token
from sdpo.data.datasets import load_split
from sdpo.data.prompts import build_prompt, encode_prompt, record_prompt_ids
from sdpo.data.records import Record
from sdpo.errors import UserError


def test_the_placeholder_is_a_special_token_no_prompt_holds(tiny, small_data):
    _, tokenizer = tiny
    marker, marker_id = placeholder_token(tokenizer)
    assert (marker, marker_id) == ("<repo_name>", 3)  # SmolLM2's first spare special token
    assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [marker_id]
    for record in load_split(small_data, "test"):
        assert marker_id not in record_prompt_ids(tokenizer, record, "music", seed=1)


@pytest.mark.parametrize("place", ["before", "after"])
def test_slots_sit_beside_their_titles_and_the_rest_is_the_text_prompt(tiny, small_data, place):
    _, tokenizer = tiny
    marker, marker_id = placeholder_token(tokenizer)
    for record in load_split(small_data, "test", 4):
        ids, slots = collaborative_prompt_ids(tokenizer, record, "music", seed=1, place=place)
        assert slots.kinds == ["history"] * len(record.history) + ["candidate"] * 20 + ["user"]
        assert slots.indices == [*range(len(record.history)), *range(20), 0]
        assert [ids[p] for p in slots.positions] == [marker_id] * len(slots.positions)
        assert slots.positions == sorted(slots.positions) and slots.positions[-1] > len(ids) - 8  # the user token closes it
        # without the placeholders: the same tokens as the same text without them (titles tokenize as in the text prompt)
        assert [t for t in ids if t != marker_id] == encode_prompt(tokenizer, build_collaborative_prompt(record, "music", "", 1, place))
        # and that text is the text-only prompt, same phrasing, plus the user line
        assert build_collaborative_prompt(record, "music", "", 1, "before") == build_prompt(record, "music", 1) + USER_LINE.format(marker="")
        # each title's own tokens stand right beside its placeholder
        for position, kind, index in zip(slots.positions[:-1], slots.kinds, slots.indices, strict=False):
            title = (record.history if kind == "history" else record.candidates)[index]
            title_ids = tokenizer(f" {title}", add_special_tokens=False)["input_ids"]
            beside = ids[position + 1: position + 1 + len(title_ids)] if place == "before" else ids[position - len(title_ids): position]
            assert beside == title_ids, title


def test_a_title_holding_the_placeholder_or_a_wrong_place_is_refused(tiny):
    _, tokenizer = tiny
    record = Record("r", None, ["Radiohead", "Ugly <repo_name> Band"], ["Muse", "Björk"], "Muse")
    with pytest.raises(UserError, match="record r: a title contains '<repo_name>'"):
        collaborative_prompt_ids(tokenizer, record, "music")
    with pytest.raises(UserError, match="before or after its title, not 'inside'"):
        collaborative_prompt_ids(tokenizer, Record("r", None, ["Radiohead"], ["Muse", "Björk"], "Muse"), "music", place="inside")
