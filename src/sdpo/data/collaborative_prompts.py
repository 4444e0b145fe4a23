"""Prompts that carry collaborative tokens: a placeholder beside every history and candidate title, and a user token.

The text is the record's ordinary prompt (same phrasing, same seed) with a placeholder token
beside each listed title and one more on a closing line for the user. The placeholder is a
special token the tokenizer already has and no prompt otherwise contains (`placeholder_token`),
so the vocabulary and every log-prob over it stay as they are; the LM never reads its embedding,
because `sdpo.lm.soft_tokens` puts a projected vector at its positions. The titles tokenize as in
the text-only prompt.

`collaborative_prompt_ids` returns the prompt ids and `SoftSlots`: each placeholder's position
and what it stands for (``history`` i, ``candidate`` i, or the ``user``). Where the placeholder
goes beside a title, ``before`` or ``after`` it, is a choice to make on val.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdpo.data.prompts import build_prompt, encode_prompt
from sdpo.data.records import Record
from sdpo.errors import UserError

PLACES = ("before", "after")
USER_LINE = "\n\nWhat a recommender model knows of their taste: {marker}"


@dataclass(frozen=True)
class SoftSlots:
    """Where a prompt's soft tokens sit (positions in its ids) and what each stands for."""

    positions: list[int]
    kinds: list[str]  # "history", "candidate" or "user"
    indices: list[int]  # index into the record's history or candidates (0 for the user)


def placeholder_token(tokenizer) -> tuple[str, int]:
    """(text, id) of a special token that no prompt holds: the tokenizer's first added special token that is not
    its BOS, EOS, PAD or UNK token and that its prompt template does not use."""
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    in_template = set(encode_prompt(tokenizer, "x"))
    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        if token.special and token_id not in reserved and token_id not in in_template:
            return token.content, token_id
    raise UserError("the tokenizer has no spare special token to hold a collaborative token's place; "
                    "use a model whose tokenizer has one (SmolLM2's does).")


def _render(titles: list[str], marker: str, place: str) -> str:
    if place == "before":
        return "\n".join(f"-{marker} {title}" for title in titles)
    return "\n".join(f"- {title}{marker}" for title in titles)


def build_collaborative_prompt(record: Record, domain: str, marker: str, seed: int = 0, place: str = "before") -> str:
    """The record's prompt text (its phrasing fixed by seed and record id) with `marker` beside every title and a user line."""
    if place not in PLACES:
        raise UserError(f"the collaborative token goes before or after its title, not {place!r}.")
    return build_prompt(record, domain, seed, render=lambda titles: _render(titles, marker, place)) + USER_LINE.format(marker=marker)


def collaborative_prompt_ids(tokenizer, record: Record, domain: str, seed: int = 0, place: str = "before") -> tuple[list[int], SoftSlots]:
    """The prompt ids of `record` with placeholders, and where its history, candidate and user tokens sit."""
    marker, marker_id = placeholder_token(tokenizer)
    if any(marker in title for title in (*record.history, *record.candidates)):
        raise UserError(f"record {record.id}: a title contains {marker!r}, the token that holds collaborative tokens' places.")
    ids = encode_prompt(tokenizer, build_collaborative_prompt(record, domain, marker, seed, place))
    positions = [i for i, token in enumerate(ids) if token == marker_id]
    kinds = ["history"] * len(record.history) + ["candidate"] * len(record.candidates) + ["user"]
    indices = [*range(len(record.history)), *range(len(record.candidates)), 0]
    if len(positions) != len(kinds):  # the template or the tokenizer produced the placeholder on its own
        raise UserError(f"record {record.id}: the prompt holds {len(positions)} placeholders for {len(kinds)} collaborative tokens.")
    return ids, SoftSlots(positions, kinds, indices)
