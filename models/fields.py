"""Settings as dataclass fields: the default and the help text side by side, the flag each makes,
and the rule checks that name that flag.

On floor 2 so that a model config can declare its tunable settings itself (`UpstreamSettings`,
`RankerSettings`): the stage configs take them in and `launchers/runtime/config.py` makes the flags,
so a model setting, its default, its help and its check are written once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import typing
from typing import Any, Optional, Sequence

REQUIRED = dataclasses.MISSING


def setting(default: Any = REQUIRED, help: str = "", *, choices: Optional[Sequence[str]] = None,
            flag: Optional[str] = None, repeat: bool = False, many: bool = False,
            metavar: Optional[str] = None) -> Any:
    """A setting: a dataclass field with its help text. Without a default it is a
    required flag. `repeat`: a tuple given by repeating the flag; `many`: by listing values
    after it; `flag`: the flag's name when it is not the field's (e.g. `--run`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag,
            "repeat": repeat, "many": many, "metavar": metavar}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`: a stage flag that feeds another config
    (the optimizer's) takes its default from there, so that it is written once."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")


def field_flag(f: dataclasses.Field) -> str:
    """The flag that sets field `f` (a bool that defaults to True: see `flag_name`)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_name(cls: type, name: str) -> str:
    """The command-line flag of field `name` (for error messages that name the flag)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if typing.get_type_hints(cls)[name] is bool and f.default is True:
                return "--no-" + name.replace("_", "-")
            return field_flag(f)
    raise KeyError(name)


def _is_day(v: str) -> bool:
    try:
        return dt.date.fromisoformat(v).isoformat() == v
    except ValueError:
        return False


# What `check` can require of a setting: (test, what the message says it must be).
RULES = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must be 0 or more"),
    "fraction": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "below_one": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    "widths": (lambda v: len(v) > 0 and all(x > 0 for x in v), "must be positive widths, e.g. 256,128"),
    "day": (_is_day, "must be a day written YYYY-MM-DD"),
}


def check(config: Any, **rules: Sequence[str]) -> None:
    """Refuse a setting that breaks its rule, naming its flag: `check(cfg, positive=("batch_size",))`.
    Unset (None) settings pass. Every number of the config must be finite, whatever its rules:
    `inf` would pass "positive" and then fail deep in a stage."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag_name(type(config), f.name)} must be a finite number, got {v}")
    for rule, names in rules.items():
        ok, need = RULES[rule]
        for name in names:
            v = getattr(config, name)
            if v is not None and not ok(v):
                shown = ",".join(map(str, v)) if isinstance(v, tuple) else v
                raise ValueError(f"{flag_name(type(config), name)} {need}, got {shown!r}")
