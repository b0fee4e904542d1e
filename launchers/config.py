"""Stage settings as frozen dataclasses, and the command-line flags made from them.

Every stage takes one frozen dataclass (`TrainUpstreamConfig`, `ExportConfig`, ...). Its fields
are declared with `setting(default, help)`, so the help text sits beside the default, and
`add_flags` turns the class into argparse flags: `embedding_dim` becomes `--embedding-dim`, a
bool that defaults to True becomes `--no-<name>`, a `Tuple[int, ...]` is written `256,128`.
`from_args` builds the dataclass back from the parsed flags and `to_flags` writes a config (or
a preset's overrides) as the flags that make it, for the pipeline's stage command lines.
Defaults exist once: in the stage config, or, for a model knob, in the model config it feeds
(`default_of`). This is all the machinery there is: no config framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

T = TypeVar("T")
REQUIRED = dataclasses.MISSING


def setting(default: Any = REQUIRED, help: str = "", *, choices: Optional[Sequence[str]] = None,
            flag: Optional[str] = None, repeat: bool = False, many: bool = False,
            metavar: Optional[str] = None) -> Any:
    """A stage setting: a dataclass field with its help text. Without a default it is a
    required flag. `repeat`: a tuple given by repeating the flag; `many`: by listing values
    after it; `flag`: the flag's name when it is not the field's (e.g. `--run`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag,
            "repeat": repeat, "many": many, "metavar": metavar}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls`: a stage flag that feeds a model config
    takes its default from there, so that it is written once."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")


def _unwrap(tp: Any) -> Tuple[Any, bool]:
    """(the type inside Optional[...], whether it was Optional)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _item_type(tp: Any) -> Optional[Any]:
    """The element type of a Tuple[X, ...], else None."""
    if typing.get_origin(tp) in (tuple, Tuple):
        args = typing.get_args(tp)
        return args[0] if args else str
    return None


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def flag_name(cls: type, name: str) -> str:
    """The command-line flag of field `name` (for error messages that name the flag)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if _hints(cls)[name] is bool and f.default is True:
                return "--no-" + name.replace("_", "-")
            return _flag(f)
    raise KeyError(name)


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


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


def _comma_list(item: Any):
    def parse(text: str) -> Tuple[Any, ...]:
        try:
            return tuple(item(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}")
    parse.__name__ = f"comma-separated {item.__name__}s"
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the stage config `cls`."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        meta = f.metadata
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: Dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if tp is bool:
            if f.default is True:
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", **kw)
            else:
                parser.add_argument(_flag(f), action="store_true", **kw)
            continue
        item = _item_type(tp)
        if item is not None and (meta.get("repeat") or meta.get("many")):
            kw.update(type=item, action="append") if meta.get("repeat") else kw.update(type=item, nargs="+")
        elif item is not None:
            kw["type"] = _comma_list(item)
        else:
            kw["type"] = tp
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if required:
            kw["required"] = True
        else:
            kw["default"] = f.default
            if f.default is not None and kw["help"] and "choices" not in kw and "default" not in kw["help"]:
                shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                kw["help"] += f" (default: {shown})"
        parser.add_argument(_flag(f), **kw)


def from_args(cls: Type[T], args: argparse.Namespace) -> T:
    """The stage config from flags parsed by a parser `add_flags(cls)` built."""
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def to_flags(cls: type, values: Mapping[str, Any]) -> List[str]:
    """The flags that set `values` (field name -> value) on `cls`'s command line."""
    hints = {f.name: f for f in dataclasses.fields(cls)}
    types = _hints(cls)
    out: List[str] = []
    for name, v in values.items():
        if name not in hints:
            raise KeyError(f"{cls.__name__} has no setting {name!r}")
        f = hints[name]
        tp, _ = _unwrap(types[name])
        if v is None:
            continue
        if tp is bool:
            if v != f.default:
                out.append(("--no-" + name.replace("_", "-")) if f.default is True else _flag(f))
            continue
        if isinstance(v, (tuple, list)) and (f.metadata.get("repeat")):
            for x in v:
                out += [_flag(f), str(x)]
        elif isinstance(v, (tuple, list)) and f.metadata.get("many"):
            out += [_flag(f), *map(str, v)]
        elif isinstance(v, (tuple, list)):
            out += [_flag(f), ",".join(map(str, v))]
        else:
            out += [_flag(f), str(v)]
    return out


def to_json(config: Any) -> Dict[str, Any]:
    """A stage config as JSON-ready values (Paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
