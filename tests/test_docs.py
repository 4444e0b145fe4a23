"""Every `sdpo ...` command quoted in README.md and docs/*.md names a real subcommand and only flags it accepts; every number
in the README's result tables is in a committed report."""

import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}
COMMAND = re.compile(r"(?:^|(?<=[\s/`(]))sdpo ([a-z].*)$")


def fenced_lines(text: str) -> list[str]:
    """The lines of ```bash blocks, a trailing backslash joining a line to the next."""
    lines, block, inside = [], "", False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside and line.strip() in ("```bash", "```sh", "```console")
            continue
        if inside:
            block += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                lines.append(block)
                block = ""
    return lines


def quoted_commands(text: str) -> list[str]:
    """`sdpo ...` commands in bash blocks (comments cut) and in inline code spans."""
    found = []
    for line in fenced_lines(text):
        line = re.sub(r"\s#\s.*$", "", line)
        match = COMMAND.search(line)
        if match:
            found.append(" ".join(match.group(1).split()))
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        match = COMMAND.match(span.strip())
        if match:
            found.append(match.group(1))
    return found


def words(command: str) -> list[str]:
    """Shell words up to the first pipe, redirection or `&&`; [optional] brackets and `...` dropped."""
    lexer = shlex.shlex(command.replace("[", " ").replace("]", " "), posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    kept = []
    for word in lexer:
        if word in SHELL_BREAKS or set(word) <= set("|&;<>"):
            break
        if word not in ("...", "…"):
            kept.append(word)
    return kept


def passed_on(path: list[str]):
    """The config dataclass whose fields are the options of `sdpo PATH` (sft, align, baseline), or None for a typer command."""
    from sdpo.baselines.train import BaselineConfig
    from sdpo.training.preference import AlignConfig
    from sdpo.training.sft import SFTConfig

    return {("sft",): SFTConfig, ("align",): AlignConfig, ("baseline",): BaselineConfig}.get(tuple(path))


@functools.cache
def root_command():
    """The click group typer builds from the `sdpo` app (built once: every helper walks the same tree)."""
    import typer

    from sdpo.cli import app

    return typer.main.get_command(app)


def click_command(path: list[str]):
    """The click command (or group) `sdpo PATH` names."""
    command = root_command()
    for name in path:
        command = command.commands[name]
    return command


def subcommand_paths(command=None, path=()) -> list[list[str]]:
    """Every runnable `sdpo ...` subcommand, as its list of words (typer vendors its own click: no isinstance)."""
    command = root_command() if command is None else command
    if not hasattr(command, "commands"):
        return [list(path)]
    return [found for name, sub in command.commands.items() for found in subcommand_paths(sub, (*path, name))]


def yes_no_options(path: list[str]) -> dict[str, str]:
    """Every yes/no option of `sdpo PATH`: its name -> the flag that turns it on.

    Click's boolean flags for a typer command; for sft, align and baseline, the options
    HfArgumentParser reads as booleans (bool and bool | None fields of the config dataclass).
    """
    config = passed_on(path)
    if config is not None:
        return dataclass_yes_no_options(config)
    return {param.name: param.opts[0] for param in click_command(path).params if getattr(param, "is_bool_flag", False)}


@functools.cache
def dataclass_yes_no_options(cls) -> dict[str, str]:
    """The options of a config dataclass that HfArgumentParser reads with string_to_bool: name -> flag."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    return {action.dest: action.option_strings[0] for action in HfArgumentParser(cls)._actions if action.type is string_to_bool}


def negative_flags(name: str) -> list[str]:
    """The two ways to turn the yes/no option `name` off without a value: --no_NAME and --no-NAME."""
    return [f"--no_{name}", f"--no-{name.replace('_', '-')}"]


def accepted_flags(command) -> set[str]:
    """The flags a click command declares (both spellings of a --flag/--no_flag pair)."""
    flags = {name for param in command.params for name in (*param.opts, *param.secondary_opts) if name.startswith("-")}
    return flags


def dataclass_flags(cls) -> set[str]:
    """The flags HfArgumentParser makes of a config dataclass's fields."""
    from transformers import HfArgumentParser

    return {name for name in HfArgumentParser(cls)._option_string_actions if name.startswith("--")}


def resolve(words_: list[str]):
    """(the click command's path, its words after the subcommand path, the flags it accepts)."""
    command, path = root_command(), []
    rest = list(words_)
    while hasattr(command, "commands"):  # a group (typer vendors its own click)
        assert rest, f"sdpo {' '.join(path)}: no subcommand"
        name = rest.pop(0)
        assert name in command.commands, f"sdpo {' '.join([*path, name])}: no such command (known: {', '.join(command.commands)})"
        command, path = command.commands[name], [*path, name]
    flags = accepted_flags(command)
    if passed_on(path) is not None:
        flags |= dataclass_flags(passed_on(path)) | {"--output", "--help"}
    if path == ["recommend"]:
        flags |= {"--history", "--candidates"}
    flags |= {flag for name in yes_no_options(path) for flag in negative_flags(name)}  # every command's convention
    return path, rest, flags


class Parsed(Exception):
    """Raised in place of running a command: the values its parser read, by option name, and the words it left over."""

    def __init__(self, values: dict, rest: list[str]):
        super().__init__(values, rest)
        self.values, self.rest = dict(values), list(rest)


@pytest.fixture
def parse(monkeypatch):
    """parse(path, words): what `sdpo PATH WORDS...` reads, the command not run; or, as text, the error it ends with.

    The whole command line goes through `sdpo.cli.main`. A typer command stops once click has
    read its options; sft, align and baseline once HfArgumentParser has read theirs (their
    dataclass is not built, so no option's checks or side effects run).
    """
    from transformers import HfArgumentParser
    from typer.core import TyperCommand

    from sdpo.cli import main

    run_callback = TyperCommand.invoke
    passes_options_on = {"now": False}  # sft, align, baseline: their callback runs, to hand its options to HfArgumentParser

    def stop_after_click(self, ctx):
        if passes_options_on["now"]:
            return run_callback(self, ctx)
        raise Parsed(ctx.params, ctx.args)

    def stop_after_argparse(self, args=None, **_):
        values, rest = self.parse_known_args(args)
        raise Parsed(vars(values), rest)

    monkeypatch.setattr(TyperCommand, "invoke", stop_after_click)
    monkeypatch.setattr(HfArgumentParser, "parse_args_into_dataclasses", stop_after_argparse)

    def parse_(path: list[str], words_: list[str]) -> Parsed | str:
        passes_options_on["now"] = passed_on(path) is not None
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                main([*path, *words_])
        except Parsed as parsed:
            return parsed
        except SystemExit as exit_:
            return f"exit status {exit_.code}: {' '.join(out.getvalue().split())}"
        return "the command ran instead of stopping after its parser"

    return parse_


def required_words(path: list[str]) -> dict[str, list[str]]:
    """A placeholder for each option and argument `sdpo PATH` cannot run without: name -> its words (arguments first)."""
    if passed_on(path) is not None:
        return {}
    params = [p for p in click_command(path).params if p.required]
    return {p.name: [p.opts[0], "x"] if p.param_type_name == "option" else ["x"] for p in sorted(params, key=lambda p: p.param_type_name)}


YES_WORDS = ["true", "YES", "1", "y", "True", "t"]
NO_WORDS = ["false", "No", "0", "n", "FALSE", "f"]


def spelled_every_way(options: dict[str, str]) -> list[tuple[str, list[str], dict[str, bool]]]:
    """(which way, a command line setting every option that way, the values it must read).

    --X alone, --X YES and --X NO (the words cycling through HfArgumentParser's, every other
    option written --X=WORD), --no_X and --no-X.
    """
    names, flags = list(options), list(options.values())

    def valued(values: list[str]) -> list[str]:
        return [w for i, flag in enumerate(flags) for w in ([f"{flag}={values[i % 6]}"] if i % 2 else [flag, values[i % 6]])]

    yes, no = dict.fromkeys(names, True), dict.fromkeys(names, False)
    return [("--X", flags, yes), ("--X yes", valued(YES_WORDS), yes), ("--X no", valued(NO_WORDS), no),
            ("--no_X", [negative_flags(name)[0] for name in names], no), ("--no-X", [negative_flags(name)[1] for name in names], no)]


def parse_problem(parsed, expected: dict[str, bool], needed: dict[str, list[str]]) -> str | None:
    """What is wrong with a parse: an error, a yes/no option read otherwise, words left over, a required value lost."""
    if isinstance(parsed, str):
        return parsed
    wrong = {name: parsed.values.get(name) for name, value in expected.items() if parsed.values.get(name) is not value}
    if wrong:
        return f"read {wrong}"
    if parsed.rest:
        return f"left {parsed.rest} over"
    def read(value):  # a variadic argument (report's runs) reads its one placeholder as a list of one
        return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value

    lost = [name for name in needed if str(read(parsed.values.get(name))) != "x"]
    return f"lost the value of {lost}" if lost else None


def test_the_extractor_finds_what_a_page_quotes():
    page = ("Run `sdpo evaluate --data DIR` or:\n```bash\n. .venv/bin/activate\nsdpo align --sft runs/sft \\\n"
            "    --negatives 3 > log.txt   # comment --bogus\nnohup .venv/bin/sdpo pipeline c.yaml --output_dir studies/x &\n```\n")
    assert quoted_commands(page) == ["align --sft runs/sft --negatives 3 > log.txt",
                                     "pipeline c.yaml --output_dir studies/x &", "evaluate --data DIR"]
    assert words("align --sft DIR [--seed 0] --negatives 3 > log.txt") == ["align", "--sft", "DIR", "--seed", "0", "--negatives", "3"]
    path, _, flags = resolve(["benchmark", "trunk", "--data", "d"])
    assert path == ["benchmark", "trunk"] and "--protocol" in flags and "--beta" not in flags
    with pytest.raises(AssertionError, match="no such command"):
        resolve(["trian", "--data", "d"])


def test_every_quoted_command_parses():
    commands = [(page.relative_to(REPO), command) for page in PAGES for command in quoted_commands(page.read_text(encoding="utf-8"))]
    assert len(commands) >= 20, "the README and docs quote the commands a user runs"
    problems = []
    for page, command in commands:
        try:
            path, rest, flags = resolve(words(command))
        except AssertionError as exc:
            problems.append(f"{page}: sdpo {command}: {exc}")
            continue
        unknown = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in flags]
        if unknown:
            problems.append(f"{page}: sdpo {command}: `sdpo {' '.join(path)}` takes no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


def test_every_yes_no_option_takes_every_spelling(parse):
    """A flag copied from one command to another means the same: for every yes/no option of every subcommand,
    --X, --X true|false (yes/no, 1/0, any case, or --X=VALUE), --no_X and --no-X all parse, to the same values."""
    paths = subcommand_paths()
    assert ["evaluate"] in paths and ["benchmark", "step"] in paths and ["sft"] in paths
    problems = []
    for path in paths:
        options = yes_no_options(path)
        if not options:
            continue
        needed = required_words(path)
        for way, words_, expected in spelled_every_way(options):
            # the required words follow the last yes/no option: the word after it is a flag or an argument, not its value
            problem = parse_problem(parse(path, [*words_, *(w for ws in needed.values() for w in ws)]), expected, needed)
            if problem:
                problems.append(f"sdpo {' '.join(path)} {way}: {problem}"[:400])
    assert not problems, "\n".join(problems)


def report_numbers() -> set[str]:
    """Every number of the committed reports (sdpo report's results.md, result JSON files), as it reads rounded to 2, 3 and 4 places."""
    from decimal import ROUND_HALF_UP, Decimal

    found: set[str] = set()
    paths = [*REPO.glob("docs/results/**/results.md"), *REPO.glob("docs/results/**/*.json")]
    for path in paths:
        for token in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", path.read_text(encoding="utf-8")):
            value = Decimal(token)
            for places in (2, 3, 4):
                step = Decimal(1).scaleb(-places)
                for rounded in (value.quantize(step, rounding=ROUND_HALF_UP), Decimal(f"{float(value):.{places}f}")):
                    found.add(str(rounded + 0))  # + 0 turns -0.000 into 0.000
    return found


def readme_table_numbers() -> list[str]:
    """The decimal numbers in the README's tables (signs kept, the typographic minus read as '-')."""
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [token.replace("−", "-").lstrip("+") for line in lines for token in re.findall(r"[+−-]?\d+\.\d+", line)]


def test_every_number_in_the_readme_tables_is_in_a_committed_report():
    numbers = readme_table_numbers()
    assert len(numbers) > 100
    known = report_numbers()
    missing = sorted({n for n in numbers if n not in known})
    assert not missing, f"README table numbers that no committed report holds: {missing}"


def test_the_readme_stays_a_page_with_the_reference_in_docs():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150
