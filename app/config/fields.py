"""What every config group is built from: the error a bad value raises, the checks that raise it,
and fields that carry their own help text (`doc`), listed with their defaults by `field_docs`."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import field
from typing import Any, Callable, Iterator, NamedTuple

from app.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value that is well-typed but cannot work; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(key: str, value: str, allowed: tuple) -> None:
    _require(value in allowed, f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}.")


def doc(default: Any, text: str) -> Any:
    """A dataclass field with its default and its help text (shown by `python -m app.train --help`);
    a list or dict default is copied for every instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def doc_factory(factory: Callable[[], Any], text: str) -> Any:
    """A field whose default `factory` makes (a nested group's dataclass), with its help text."""
    return field(default_factory=factory, metadata={"help": text})


class FieldDoc(NamedTuple):
    """One documented key: `key` as the command line spells it (features.sparse.<i>.name,
    sharding.tables.<feature>.min_partition below a list or a map), its type, its default, its help.
    A group (a dataclass-typed field) has no default of its own: its keys follow it."""

    key: str
    type: str
    default: Any
    help: str
    is_group: bool


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else re.sub(r"\b(typing|app\.config\.\w+)\.", "", str(hint))


def field_docs(schema: type, prefix: str = "") -> Iterator[FieldDoc]:
    """Every key of `schema` with its type, default and help text, groups before their keys; the
    entries of a list or map of dataclasses (features.sparse, sharding.tables) follow it."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], prefix + f.name
        help_text = f.metadata.get("help", "")
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield FieldDoc(key, _type_name(hint), None, help_text, True)
            yield from field_docs(hint, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield FieldDoc(key, _type_name(hint), default, help_text, False)
        entry = typing.get_args(hint)[-1] if typing.get_origin(hint) in (list, dict) else None
        if isinstance(entry, type) and dataclasses.is_dataclass(entry):
            placeholder = "<i>" if typing.get_origin(hint) is list else "<feature>"
            yield from field_docs(entry, f"{key}.{placeholder}.")


def non_finite_values(value: Any, key: str = "") -> Iterator[tuple]:
    """(key, value) of every float in `value` (a config dataclass, walked through its groups, lists
    and maps) that is nan or infinite, each key spelled as errors name it (optim.betas[1])."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from non_finite_values(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from non_finite_values(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from non_finite_values(item, f"{key}.{name}")
    elif isinstance(value, float) and not math.isfinite(value):
        yield key, value


def require_finite(config: Any) -> None:
    """Every float of `config` is a finite number: one check for every key, so that no inf (which
    passes a range check such as lr > 0) or nan reaches the run."""
    for key, value in non_finite_values(config):
        raise ConfigError(f"{key}={value} is not a finite number; every number of the config must be finite.")
