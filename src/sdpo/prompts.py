"""Prompt text per domain, in our own words, and how prompts and answers become tokens.

A record's prompt is one of several phrasings for its domain, drawn with a generator
seeded by the record id, so the same record always reads the same. History and
candidates are rendered one title per line, so a title containing a comma stays one
title. The answer is the target title followed by the tokenizer's EOS token.

Tokenization is defined once here: ``encode_prompt`` gives the prompt ids (the chat
template's generation prompt when the tokenizer has one), ``encode_answer`` the answer
ids. SFT, S-DPO and both evaluation protocols use exactly these ids.
"""

from __future__ import annotations

import hashlib
import random

from sdpo.records import Record

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


def build_prompt(record: Record, domain: str, seed: int = 0) -> str:
    """The prompt text for `record`: one of the domain's phrasings, fixed by (seed, record id)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    item, items, verb = DOMAINS[domain]
    template = random.Random(record_seed(seed, record.id)).choice(TEMPLATES)
    return template.format(
        item=item, items=items, verb=verb, history=render_list(record.history), candidates=render_list(record.candidates)
    )


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt up to where the answer starts."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\nAnswer: ", add_special_tokens=True)["input_ids"]


def encode_answer(tokenizer, title: str) -> list[int]:
    """Token ids of one answer: the title followed by EOS."""
    return tokenizer(title, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def record_prompt_ids(tokenizer, record: Record, domain: str, seed: int = 0) -> list[int]:
    """The prompt ids of `record` (phrasing fixed by seed and record id)."""
    return encode_prompt(tokenizer, build_prompt(record, domain, seed))
