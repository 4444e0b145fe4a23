"""The `sdpo` Typer app, its two command groups, and how a command reads a YAML config plus flags."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate LM recommenders with S-DPO.")


data_app = typer.Typer(no_args_is_help=True, help="Fetch raw datasets and prepare record folders.")
app.add_typer(data_app, name="data")


bench_app = typer.Typer(no_args_is_help=True, help="Measure speed and memory.")
app.add_typer(bench_app, name="benchmark")


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def config_from(ctx: typer.Context, config: Path | None, cls, name: str, aliases: dict[str, str] | None = None):
    """`cls` from an optional YAML file plus the command's pass-through flags (which win).

    Yes/no options follow the convention of every command (`sdpo.cli.flags`).
    """
    from transformers import HfArgumentParser

    from sdpo.cli.flags import normalise, parser_options
    from sdpo.config import build_config, read_yaml

    args = [(aliases or {}).get(a, a) for a in ctx.args]
    if config is not None and str(config).startswith("-"):  # no YAML given: the first token is a flag
        args.insert(0, (aliases or {}).get(str(config), str(config)))
        config = None
    if {"--help", "-h"} & set(args):
        HfArgumentParser(cls, prog=f"sdpo {name} [CONFIG.yaml]").print_help()
        raise typer.Exit()
    args = normalise(args, parser_options(HfArgumentParser(cls)), f"sdpo {name}")  # --X, --X false, --no_X: as --X true|false
    return build_config(cls, read_yaml(config) if config else {}, args, where=str(config or name), prog=f"sdpo {name}")


CONFIG_ARGUMENT = typer.Argument(None, help="YAML config; flags override it")
