"""Prompt text per domain, in our own words, and how prompts and answers become tokens.

A record's prompt is one of several phrasings for its domain, drawn with a generator
seeded by the record id, so the same record always reads the same. History and
candidates are rendered one title per line, so a title containing a comma stays one
title. The answer is the target title followed by the tokenizer's EOS token.

Tokenization is defined once here: ``encode_prompt`` gives the prompt ids (the chat
template's generation prompt when the tokenizer has one, else the prompt followed by
"\nAnswer:"), ``encode_answer`` the answer ids, tokenized the way they read behind the
prompt: prompt ids + answer ids are the ids of the whole text. SFT, S-DPO and both
evaluation protocols use exactly these ids.
"""

from __future__ import annotations

import hashlib
import random

from sdpo.data.records import Record

DEFAULT_DOMAIN = "music"
ANSWER_CUE = "\nAnswer:"  # ends a prompt for a tokenizer without a chat template
DOMAINS = {
    "music": ("artist", "artists", "listened to"),
    "movies": ("movie", "movies", "watched"),
    "books": ("book", "books", "read"),
    "games": ("game", "games", "played"),
}

TEMPLATES = (
    "A user has {verb} these {items}, oldest first:\n{history}\n\n"
    "Which one of the following {items} will they choose next?\n{candidates}\n\n"
    "Answer with the exact name of one {item} from the list.",
    "Here is someone's recent history of {items} (in the order they {verb} them):\n{history}\n\n"
    "Pick the {item} they are most likely to enjoy next from these options:\n{candidates}\n\n"
    "Reply with the {item}'s name only.",
    "Recently {verb}, from earliest to latest:\n{history}\n\n"
    "Candidates:\n{candidates}\n\n"
    "Recommend exactly one {item} from the candidates. Give only its name.",
    "You are a recommender of {items}. The person has {verb}:\n{history}\n\n"
    "Choose the next {item} for them from this list:\n{candidates}\n\n"
    "Write the name of your choice and nothing else.",
    "Past choices say a lot. This person {verb} these {items} in this order:\n{history}\n\n"
    "Of the {items} below, which is the best next one for them?\n{candidates}\n\n"
    "Name one {item} from the list, exactly as written.",
)


def render_list(titles: list[str]) -> str:
    """One title per line, so commas inside titles cannot split them."""
    return "\n".join(f"- {title}" for title in titles)


def record_seed(seed: int, record_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def build_prompt(record: Record, domain: str, seed: int = 0, render=render_list) -> str:
    """The prompt text for `record`: one of the domain's phrasings, fixed by (seed, record id).

    `render` turns a list of titles into lines (`sdpo.data.collaborative_prompts` marks each title).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    item, items, verb = DOMAINS[domain]
    template = random.Random(record_seed(seed, record.id)).choice(TEMPLATES)
    return template.format(item=item, items=items, verb=verb, history=render(record.history), candidates=render(record.candidates))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt up to where the answer starts."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)
    return tokenizer(prompt + ANSWER_CUE, add_special_tokens=True)["input_ids"]


def encode_answer(tokenizer, title: str) -> list[int]:
    """Token ids of one answer, the title followed by EOS, as the title tokenizes behind the prompt.

    After a chat template's assistant header the title starts a new line and is tokenized
    on its own. After the plain "Answer:" cue it follows a space: the ids are those that
    "Answer: <title>" gives beyond "Answer:", so "Glee" is 'ĠG','lee' as in the whole text,
    not a lone space token followed by 'G','lee'.
    """
    if tokenizer.chat_template:
        ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    else:
        cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        joint = tokenizer(f"{ANSWER_CUE} {title}", add_special_tokens=False)["input_ids"]
        if joint[: len(cue)] != cue:  # the title's first token merged into the cue: no clean boundary
            raise ValueError(f"cannot tokenize the answer {title!r} apart from the prompt's end {ANSWER_CUE!r}")
        ids = joint[len(cue) :]
    return ids + [tokenizer.eos_token_id]


def record_prompt_ids(tokenizer, record: Record, domain: str, seed: int = 0) -> list[int]:
    """The prompt ids of `record` (phrasing fixed by seed and record id)."""
    return encode_prompt(tokenizer, build_prompt(record, domain, seed))


class TextPrompts:
    """How every stage turns records into prompts: here the text-only prompt, with no soft tokens.

    `sdpo.baselines.prompts.CollaborativePrompts` is the other kind; SFT, align, evaluation and
    the recommender take either, through these two methods.
    """

    def __init__(self, tokenizer, domain: str, seed: int = 0):
        self.tokenizer, self.domain, self.seed = tokenizer, domain, seed

    def ids(self, record: Record) -> list[int]:
        """The prompt ids of `record`."""
        return record_prompt_ids(self.tokenizer, record, self.domain, self.seed)

    def soft_inputs(self, records: list[Record], prompt_ids: list[list[int]]) -> dict:
        """The batch's soft-token inputs (`sdpo.lm.soft_tokens.SOFT_KEYS`): none for a text prompt."""
        return {}
