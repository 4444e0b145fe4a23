"""One convention for yes/no options, the same in every ``sdpo`` command.

A yes/no option NAME takes ``--NAME`` (yes), ``--NAME VALUE`` or ``--NAME=VALUE`` with VALUE
one of true/false, yes/no, 1/0, t/f, y/n in any case (the words HfArgumentParser reads), and
``--no_NAME`` or ``--no-NAME`` (no). Where an option is given more than once, the last wins.

The parsers behind the commands each read only some of these spellings: click's boolean
flags (``--bf16/--no_bf16`` in evaluate, recommend, benchmark ...) take no value, and
HfArgumentParser (sft, align, baseline) has no ``--no_NAME`` for most options and needs a
value for a ``bool | None`` one. So before a parser sees a command line, `normalise` spells
every yes/no option the way that parser reads it; `click_options` and `parser_options` find
a command's yes/no options by introspection. `sdpo.cli.main` applies it to the typer
commands (`normalise_command_line`), `sdpo.cli.app.config_from` to sft, align and baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sdpo.errors import UserError

YES_WORDS = frozenset({"true", "yes", "1", "t", "y"})
NO_WORDS = frozenset({"false", "no", "0", "f", "n"})
VALUES = "true or false (or yes/no, 1/0)"


def yes_or_no(word: str) -> bool | None:
    """True or False for a yes/no word, in any case; None for any other word."""
    word = word.lower()
    return True if word in YES_WORDS else False if word in NO_WORDS else None


@dataclass(frozen=True)
class YesNoOption:
    """One yes/no option of a command: the flags it declares, and the words its parser reads for yes and for no."""

    on: tuple[str, ...]  # flags that turn it on, e.g. ("--trust_pickles", "--trust-pickles")
    off: tuple[str, ...]  # negatives the parser declares, e.g. ("--no_bf16",)
    as_yes: tuple[str, ...]  # e.g. ("--bf16",) for click, ("--bf16", "true") for HfArgumentParser
    as_no: tuple[str, ...]  # () where leaving the option out means no

    def spellings(self) -> dict[str, bool]:
        """Every flag that sets this option -> the value it sets: the declared ones, --no_NAME and --no-NAME."""
        names = [flag.removeprefix("--") for flag in self.on]
        off = {*self.off, *(f"--no_{name.replace('-', '_')}" for name in names), *(f"--no-{name.replace('_', '-')}" for name in names)}
        return {**dict.fromkeys(sorted(off), False), **dict.fromkeys(self.on, True)}


def click_options(command) -> list[YesNoOption]:
    """The yes/no options of a click command (typer vendors its own click, hence no isinstance): its boolean flags."""
    return [YesNoOption(tuple(param.opts), tuple(param.secondary_opts), (param.opts[0],), tuple(param.secondary_opts[:1]))
            for param in command.params if getattr(param, "is_bool_flag", False)]


def parser_options(parser) -> list[YesNoOption]:
    """The yes/no options of an HfArgumentParser (bool and bool | None fields), each passed on as --NAME true|false."""
    from transformers.hf_argparser import string_to_bool

    options = []
    for action in parser._actions:
        if action.type is string_to_bool:
            on = tuple(flag for flag in action.option_strings if flag.startswith("--"))
            options.append(YesNoOption(on, (), (on[0], "true"), (on[0], "false")))
    return options


def _value_word(args: Sequence[str], at: int, takes_positionals: bool) -> str | None:
    """The word after the flag args[at] when it is that flag's value: a yes/no word, or any word that is not a flag
    where the command takes no positional words (so `sdpo data prepare --overwrite lastfm` keeps its dataset)."""
    if at + 1 >= len(args):
        return None
    word = args[at + 1]
    if yes_or_no(word) is not None or not (takes_positionals or word.startswith("-")):
        return word
    return None


def _read(option: YesNoOption, flag: str, sets: bool, word: str | None, command: str) -> bool:
    """The value one mention of `option` sets: `sets` for a flag alone, else its value `word` (a yes/no word, and not after a negative)."""
    if word is None:
        return sets
    if not sets:
        raise UserError(f"{command}: {flag} takes no value, got {word!r}; write {flag} alone, or {option.on[0]} {VALUES}.")
    value = yes_or_no(word)
    if value is None:
        raise UserError(f"{command}: {flag} takes {VALUES}, got {word!r}.")
    return value


def normalise(args: Sequence[str], options: Iterable[YesNoOption], command: str, takes_positionals: bool = False) -> list[str]:
    """`args` with every yes/no option spelled as the command's parser reads it, only its last mention kept.

    Any other word is left as it is, and so is everything after ``--``. A bad value is a
    UserError naming `command` (e.g. "sdpo evaluate").
    """
    spellings = {flag: (option, sets) for option in options for flag, sets in option.spellings().items()}
    chunks: list[list[str]] = []
    latest: dict[YesNoOption, int] = {}
    at = 0
    while at < len(args):
        if args[at] == "--":
            chunks.append(list(args[at:]))
            break
        flag, equals, attached = args[at].partition("=")
        if flag not in spellings:
            chunks.append([args[at]])
            at += 1
            continue
        option, sets = spellings[flag]
        word = attached if equals else _value_word(args, at, takes_positionals)
        value = _read(option, flag, sets, word, command)
        if option in latest:
            chunks[latest[option]] = []
        latest[option] = len(chunks)
        chunks.append(list(option.as_yes if value else option.as_no))
        at += 1 if equals or word is None else 2
    return [word for chunk in chunks for word in chunk]


def normalise_command_line(root, args: Sequence[str]) -> list[str]:
    """An ``sdpo`` command line with the yes/no options of the subcommand it names spelled as click reads them.

    `root` is the click group typer builds from the app; the words naming the subcommand are
    kept. Commands whose options are a dataclass's (sft, align, baseline) declare no click
    flags: `sdpo.cli.app.config_from` normalises theirs.
    """
    command, depth = root, 0
    while hasattr(command, "commands") and depth < len(args) and args[depth] in command.commands:
        command, depth = command.commands[args[depth]], depth + 1
    options = click_options(command)
    if not options:
        return list(args)
    takes_positionals = any(param.param_type_name == "argument" for param in command.params)
    return [*args[:depth], *normalise(args[depth:], options, " ".join(["sdpo", *args[:depth]]), takes_positionals)]
