"""One convention for yes/no options (sdpo.cli.flags): every spelling read one way, bad values one error line.

That every subcommand's options parse in every spelling is checked in test_docs.py
(test_every_yes_no_option_takes_every_spelling); these are the rules, and the error lines.
"""

import pytest

from sdpo.cli.flags import YesNoOption, normalise, yes_or_no
from sdpo.errors import UserError
from tests.helpers import assert_user_error, sdpo

# as click reads a --bf16/--no_bf16 flag, and as it reads --trust_pickles/--trust-pickles (no negative: left out means no)
BF16 = YesNoOption(("--bf16",), ("--no_bf16",), ("--bf16",), ("--no_bf16",))
PICKLES = YesNoOption(("--trust_pickles", "--trust-pickles"), (), ("--trust_pickles",), ())
# as HfArgumentParser reads a field
PROJECTOR = YesNoOption(("--train_projector", "--train-projector"), (), ("--train_projector", "true"), ("--train_projector", "false"))


def test_the_yes_no_words_are_hf_argparsers_in_any_case():
    assert [yes_or_no(w) for w in ("true", "YES", "1", "T", "y", "False", "no", "0", "f", "N")] == [True] * 5 + [False] * 5
    assert yes_or_no("maybe") is None and yes_or_no("") is None


def test_every_spelling_becomes_the_one_its_parser_reads():
    for words, expected in [(["--bf16"], ["--bf16"]), (["--bf16", "false"], ["--no_bf16"]), (["--bf16=No"], ["--no_bf16"]),
                            (["--no_bf16"], ["--no_bf16"]), (["--no-bf16"], ["--no_bf16"]), (["--bf16", "1"], ["--bf16"])]:
        assert normalise(words, [BF16], "sdpo evaluate") == expected, words
    for words, expected in [(["--trust-pickles"], ["--trust_pickles"]), (["--trust_pickles", "true"], ["--trust_pickles"]),
                            (["--trust_pickles", "false"], []), (["--no-trust-pickles"], []), (["--no_trust_pickles"], [])]:
        assert normalise(words, [PICKLES], "sdpo data prepare") == expected, words
    for words, expected in [(["--train-projector"], ["--train_projector", "true"]), (["--no-train-projector"], ["--train_projector", "false"]),
                            (["--train_projector", "FALSE"], ["--train_projector", "false"])]:
        assert normalise(words, [PROJECTOR], "sdpo sft") == expected, words


def test_other_words_stay_and_the_last_mention_wins():
    words = ["--data", "d", "--bf16", "--no_trust_pickles", "--batch_size", "1", "--bf16", "no", "--trust_pickles", "--", "--bf16", "x"]
    assert normalise(words, [BF16, PICKLES], "sdpo x") == ["--data", "d", "--batch_size", "1", "--no_bf16", "--trust_pickles", "--", "--bf16", "x"]


def test_the_word_after_a_flag_is_its_value_only_where_it_can_be():
    # a flag next: no value; a word that is not yes/no: a positional where the command takes one, else a bad value
    assert normalise(["--bf16", "--data", "d"], [BF16], "sdpo evaluate") == ["--bf16", "--data", "d"]
    assert normalise(["--trust_pickles", "lastfm", "--out", "o"], [PICKLES], "sdpo data prepare", takes_positionals=True) == [
        "--trust_pickles", "lastfm", "--out", "o"]
    with pytest.raises(UserError, match=r"^sdpo evaluate: --bf16 takes true or false \(or yes/no, 1/0\), got 'maybe'\.$"):
        normalise(["--bf16", "maybe"], [BF16], "sdpo evaluate")
    with pytest.raises(UserError, match="--bf16 takes true or false"):
        normalise(["--bf16=maybe"], [BF16], "sdpo data prepare", takes_positionals=True)
    with pytest.raises(UserError, match="--no_bf16 takes no value, got 'true'; write --no_bf16 alone, or --bf16 true or false"):
        normalise(["--no_bf16", "true"], [BF16], "sdpo evaluate")


def test_a_bad_value_is_one_error_line_in_every_kind_of_command(tmp_path):
    """Before anything runs: a typer command (click flags) and sft (HfArgumentParser), each exit status 2, no traceback."""
    assert_user_error(sdpo("evaluate", "--data", tmp_path, "--output_dir", tmp_path / "o", "--bf16", "maybe"),
                      "sdpo evaluate: --bf16 takes true or false (or yes/no, 1/0), got 'maybe'.")
    assert_user_error(sdpo("benchmark", "trunk", "--data", tmp_path, "--json", tmp_path / "t.json", "--no-bf16=1"),
                      "sdpo benchmark trunk: --no-bf16 takes no value, got '1'")
    assert_user_error(sdpo("sft", "--data", tmp_path, "--bf16", "maybe"), "sdpo sft: --bf16 takes true or false", "'maybe'")
    assert_user_error(sdpo("align", "--train_projector=2"), "sdpo align: --train_projector takes true or false", "'2'")
