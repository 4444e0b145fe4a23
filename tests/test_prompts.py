import copy

import pytest

from sdpo.data.prompts import ANSWER_CUE, DOMAINS, TEMPLATES, TextPrompts, build_prompt, encode_answer, encode_prompt, record_prompt_ids, render_list
from sdpo.data.records import Record
from sdpo.training.sft import PromptAnswerDataset

RECORD = Record("r1", None, ["Earth, Wind & Fire", "Beck"], ["Jeff Beck", "Crosby, Stills, Nash & Young", "Mø"], "Mø")


def test_comma_names_stay_whole():
    prompt = build_prompt(RECORD, "music")
    lines = prompt.splitlines()
    for title in [*RECORD.history, *RECORD.candidates]:
        assert f"- {title}" in lines
    assert render_list(["a, b", "c"]).splitlines() == ["- a, b", "- c"]


def test_phrasing_is_seeded_per_record_and_varies():
    assert build_prompt(RECORD, "music", seed=0) == build_prompt(RECORD, "music", seed=0)
    phrasings = {build_prompt(Record(f"r{i}", None, ["a"], ["b", "c"], "b"), "movies") for i in range(60)}
    assert len(phrasings) == len(TEMPLATES) >= 3
    for domain, (_, items, _) in DOMAINS.items():
        assert items in build_prompt(RECORD, domain)
    with pytest.raises(ValueError, match="unknown domain"):
        build_prompt(RECORD, "podcasts")


TITLES = ["Beck", "Jeff Beck", "Crosby, Stills, Nash & Young", "Mø", "Ke$ha", "The The", "Sigur Rós", "50 Cent", "AC/DC", "!!!"]


@pytest.fixture(scope="module")
def plain_tokenizer(tiny):
    """The SmolLM2 tokenizer with its chat template removed: prompts end in "\nAnswer:"."""
    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = None
    return tokenizer


@pytest.mark.parametrize("title", TITLES)
def test_prompt_and_answer_tokenize_as_one_text(tiny, plain_tokenizer, title):
    """Separately encoded prompt + answer are exactly the tokens of the joined text, with and without a chat template."""
    _, tokenizer = tiny
    prompt = build_prompt(RECORD, "music")
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = encode_answer(tokenizer, title)
    assert answer_ids[-1] == tokenizer.eos_token_id
    joined_text = tokenizer.decode(prompt_ids) + title
    assert tokenizer(joined_text, add_special_tokens=False)["input_ids"] == prompt_ids + answer_ids[:-1]

    plain_prompt_ids = encode_prompt(plain_tokenizer, prompt)
    plain_answer_ids = encode_answer(plain_tokenizer, title)
    whole = plain_tokenizer(f"{prompt}{ANSWER_CUE} {title}", add_special_tokens=True)["input_ids"]
    assert whole == plain_prompt_ids + plain_answer_ids[:-1]


def test_plain_prompt_answer_starts_with_its_natural_token(plain_tokenizer):
    """Behind "Answer:" the title "Glee" is 'ĠG','lee' (as in the whole text), not a lone space and 'G','lee'."""
    tokens = plain_tokenizer.convert_ids_to_tokens(encode_answer(plain_tokenizer, "Glee")[:-1])
    assert tokens == plain_tokenizer.tokenize(" Glee") and tokens[0].startswith("Ġ") and tokens[0] != "Ġ"
    assert plain_tokenizer.convert_ids_to_tokens(encode_prompt(plain_tokenizer, "Hi"))[-1] == ":"


def test_training_and_evaluation_use_the_same_ids(tiny):
    _, tokenizer = tiny
    example = PromptAnswerDataset([RECORD], tokenizer, TextPrompts(tokenizer, "music"))[0]
    assert example["prompt_ids"] == record_prompt_ids(tokenizer, RECORD, "music")
    assert example["answer_ids"] == [encode_answer(tokenizer, RECORD.target)]
