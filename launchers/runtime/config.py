"""Stage settings as frozen dataclasses, and the command-line flags made from them.

Every stage takes one frozen dataclass (`TrainUpstreamConfig`, `ExportConfig`, ...). Its fields
are declared with `setting(default, help)` (models/fields.py), so the help text sits beside the
default, and `add_flags` turns the class into argparse flags: `embedding_dim` becomes
`--embedding-dim`, a bool that defaults to True becomes `--no-<name>`, a `Tuple[int, ...]` is
written `256,128`. `from_args` builds the dataclass back from the parsed flags and `to_flags`
writes a config (or a preset's overrides) as the flags that make it, for the pipeline's stage
command lines. A training stage's config inherits its model's settings (`UpstreamSettings`,
`RankerSettings`), so a model setting is declared, defaulted and checked once, in the model's
dataclass, and its flag is the field's name. This is all the machinery there is: no config framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

# The declaring half (a field with its help, its flag's name, the rule checks) sits on the models'
# floor, where the model configs declare their settings; the stage configs import it from here.
from derl.models.fields import check, default_of, field_flag, flag_name, setting  # noqa: F401

T = TypeVar("T")


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


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _comma_list(item: Any):
    def parse(text: str) -> Tuple[Any, ...]:
        try:
            return tuple(item(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {text!r}")
    parse.__name__ = f"comma-separated {item.__name__}s"
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, unset: Optional[str] = None) -> None:
    """One flag per field of the stage config `cls`. With `unset`, every flag defaults to None,
    so that the caller tells a flag given from one left out (the seqrec suite lays each model's
    own defaults between the dataclass's and the flags), a bool is `--x/--no-x`, and `unset`
    ends the help's default ("or the model's own")."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        meta = f.metadata
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: Dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if unset is not None:
            kw["help"] = f"{kw['help']} (default: {_shown(f.default)}, {unset})".strip()
        if tp is bool and unset is not None:
            parser.add_argument(field_flag(f), action=argparse.BooleanOptionalAction, default=None, **kw)
            continue
        if tp is bool:
            if f.default is True:
                parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_false", **kw)
            else:
                parser.add_argument(field_flag(f), action="store_true", **kw)
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
        elif unset is not None:
            kw["default"] = None
        else:
            kw["default"] = f.default
            if f.default is not None and kw["help"] and "choices" not in kw and "default" not in kw["help"]:
                kw["help"] += f" (default: {_shown(f.default)})"
        parser.add_argument(field_flag(f), **kw)


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


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
                out.append(("--no-" + name.replace("_", "-")) if f.default is True else field_flag(f))
            continue
        if isinstance(v, (tuple, list)) and (f.metadata.get("repeat")):
            for x in v:
                out += [field_flag(f), str(x)]
        elif isinstance(v, (tuple, list)) and f.metadata.get("many"):
            out += [field_flag(f), *map(str, v)]
        elif isinstance(v, (tuple, list)):
            out += [field_flag(f), ",".join(map(str, v))]
        else:
            out += [field_flag(f), str(v)]
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
