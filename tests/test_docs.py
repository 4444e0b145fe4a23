"""Every `sdpo ...` command quoted in README.md and docs/*.md names a real subcommand and only flags it accepts."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
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


def accepted_flags(command) -> set[str]:
    """The flags a click command declares (both spellings of a --flag/--no_flag pair)."""
    flags = {name for param in command.params for name in (*param.opts, *param.secondary_opts) if name.startswith("-")}
    return flags


def dataclass_flags(cls) -> set[str]:
    """The flags of a config dataclass, and for its yes/no options the --no_NAME form `sdpo.config` reads as --NAME false."""
    import dataclasses

    from transformers import HfArgumentParser

    flags = {name for name in HfArgumentParser(cls)._option_string_actions if name.startswith("--")}
    return flags | {f"--no_{f.name}" for f in dataclasses.fields(cls) if "bool" in str(f.type)}


def resolve(words_: list[str]):
    """(the click command, its words after the subcommand path, the flags it accepts)."""
    import typer

    from sdpo.baselines.train import BaselineConfig
    from sdpo.cli import app
    from sdpo.training.preference import AlignConfig
    from sdpo.training.sft import SFTConfig

    command, path = typer.main.get_command(app), []
    rest = list(words_)
    while hasattr(command, "commands"):  # a group (typer vendors its own click)
        assert rest, f"sdpo {' '.join(path)}: no subcommand"
        name = rest.pop(0)
        assert name in command.commands, f"sdpo {' '.join([*path, name])}: no such command (known: {', '.join(command.commands)})"
        command, path = command.commands[name], [*path, name]
    flags = accepted_flags(command)
    passed_on = {"sft": SFTConfig, "align": AlignConfig, "baseline": BaselineConfig}.get(path[0])
    if passed_on is not None:
        flags |= dataclass_flags(passed_on) | {"--output", "--help"}
    if path == ["recommend"]:
        flags |= {"--history", "--candidates"}
    return path, rest, flags


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
