"""Configs are dataclasses (training configs extend transformers.TrainingArguments).

Values come from a YAML file, then from command-line flags (``--learning_rate 3e-4`` or
``--learning-rate 3e-4``), which win. Unknown keys are refused with a clear message.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from transformers import HfArgumentParser

from sdpo.errors import UserError

C = TypeVar("C")


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file.") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable YAML ({exc}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of option: value.")
    return values


def build_config(cls: type[C], values: dict[str, Any] | None = None, args: Sequence[str] = (), where: str = "config") -> C:
    """An instance of the dataclass `cls` from `values` (e.g. YAML) overridden by CLI `args`."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}. See --help for the options.")
    parser = HfArgumentParser(cls)
    parser.set_defaults(**values)
    try:
        config, rest = parser.parse_args_into_dataclasses(args=list(args), return_remaining_strings=True)
    except ValueError as exc:  # raised by __post_init__ checks (e.g. TrainingArguments)
        raise UserError(f"{where}: {exc}") from None
    if rest:
        raise UserError(f"unknown command-line option(s): {' '.join(rest)}. See --help for the options.")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain values of a config dataclass (TrainingArguments' own serialisation where it has one)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    from sdpo.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=True, allow_unicode=True))
