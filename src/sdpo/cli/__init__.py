"""The ``sdpo`` command: sft, align, baseline, export, evaluate, pipeline, report, recommend, data, benchmark.

User mistakes (bad files, bad options) end with one ``error:`` line and exit status 2;
no traceback. Every yes/no option takes ``--NAME``, ``--NAME true|false`` and ``--no_NAME``
in every command (`sdpo.cli.flags`).

Layer 9, the top: each command imports what it runs when it runs, so ``sdpo --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

# isort: off
# each module registers its commands; `sdpo --help` lists them in this order
from sdpo.cli import train, evaluate, recommend, data, benchmark  # noqa: F401
# isort: on
from sdpo.cli.app import app
from sdpo.cli.flags import normalise_command_line
from sdpo.errors import UserError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """The `sdpo` command on `argv` (default: the process's arguments); exits with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        args = normalise_command_line(typer.main.get_command(app), args)  # one spelling convention for yes/no options
        app(args=args)  # typer reports a bad flag or value itself: usage line, the problem, exit status 2
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
