"""Configs are dataclasses (training configs extend transformers.TrainingArguments).

Values come from a YAML file, then from command-line flags (``--learning_rate 3e-4`` or
``--learning-rate 3e-4``), which win. Unknown keys and values of the wrong type are refused
with a clear message; a number YAML reads as text (``1e-4``, which YAML 1.1 takes for a
string) is read as the number the option expects. Flags are read as HfArgumentParser reads
them; the ``sdpo`` commands first spell every yes/no option its way (`sdpo.cli.flags`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from sdpo.errors import UserError

C = TypeVar("C")
SIMPLE_TYPES = (bool, int, float, str)


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose parse errors are user errors (one line, no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}. See --help for the options.")


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file.") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable YAML ({exc}).") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of option: value.")
    return values


def _simple_type(hint: Any) -> tuple[type | None, bool]:
    """(the simple type of a field, whether None is allowed); (None, _) for anything else."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and options[0] in SIMPLE_TYPES:
            return options[0], type(None) in args
        return None, True
    return (hint, False) if hint in SIMPLE_TYPES else (None, True)


def check_value(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` as the type option `name` of `cls` expects, or a user error naming the option."""
    kind, optional = _simple_type(typing.get_type_hints(cls).get(name))
    if kind is None or (value is None and optional):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    raise UserError(f"{where}: option {name} must be {expected}{' (or null)' if optional else ''}, got {value!r}.")


def build_config(cls: type[C], values: dict[str, Any] | None = None, args: Sequence[str] = (), where: str = "config", prog: str | None = None) -> C:
    """An instance of the dataclass `cls` from `values` (e.g. YAML) overridden by CLI `args`."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}. See --help for the options.")
    values = {name: check_value(cls, name, value, where) for name, value in values.items()}
    parser = ArgumentParser(cls, prog=prog or where)
    parser.set_defaults(**values)
    try:
        config, rest = parser.parse_args_into_dataclasses(args=list(args), return_remaining_strings=True)
    except (ValueError, TypeError) as exc:  # raised by __post_init__ checks (e.g. TrainingArguments)
        raise UserError(f"{where}: {exc}") from None
    if rest:
        raise UserError(f"unknown command-line option(s): {' '.join(rest)}. See --help for the options.")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain values of a config dataclass (TrainingArguments' own serialisation where it has one)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


