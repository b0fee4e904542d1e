"""What every benchmark shares: its flags made from its config dataclass, its results written as
one JSON file for machines and one Markdown table for people, and its plots."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Type, TypeVar

import torch

from derl.launchers.runtime.config import add_flags, from_args, to_flags

T = TypeVar("T")


def parser(doc: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A benchmark's parser, described by its module docstring `doc` as it is written: the first
    paragraph before the flags, the rest (the usage lines) after them."""
    intro, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=intro, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_config(cls: Type[T], argv: Optional[Sequence[str]], doc: str, prog: Optional[str] = None) -> T:
    """The benchmark's config `cls` from its flags (one per field, `add_flags`); a setting the
    config refuses ends the command with the parser's usage error, which names the flag."""
    p = parser(doc, prog)
    add_flags(p, cls)
    args = p.parse_args(argv)
    try:
        return from_args(cls, args)
    except ValueError as e:
        p.error(str(e))


def command(module: str, config: Any) -> str:
    """The command that reproduces `config`: `python -m MODULE` and the flags of the settings
    that differ from their defaults, for a result's metadata."""
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != f.default}
    return " ".join(["python -m", module, *to_flags(type(config), changed)])


def exit_on_errors(result: Dict[str, object]) -> None:
    """A suite's exit status: 1 when any of its stages or runs failed (`result["errors"]`)."""
    if result["errors"]:
        raise SystemExit(1)


def machine(threads: bool = True, cores: bool = False) -> Dict[str, object]:
    """What the numbers were measured on, for a result's metadata. `threads`: this process's
    intra-op threads (left out where each row records its own, or its runs are other
    processes); `cores`: the host's CPU count."""
    out = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if not threads:
        del out["threads"]
    if cores:
        out["cores"] = os.cpu_count()
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(out: Path, name: str, rows: List[Dict[str, object]], meta: Dict[str, object]) -> Path:
    """Write `out/name.json` ({meta, rows}) and `out/name.md` (a table of rows); return the .md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = list(rows[0])
    fmt = lambda v: (f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}") if isinstance(v, float) else str(v)
    lines = [
        f"# {name}",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
        *("| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows),
    ]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def publish(out: Path, name: str, rows: List[Dict[str, object]], meta: Dict[str, object],
            plot: Optional[Callable[[List[Dict[str, object]], Path], None]] = None,
            columns: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """A benchmark's ending: `write` its results (the table with each row's `columns`, default
    all), draw `plot(rows, OUT/NAME.png)`, print the table; {meta, rows}, what its `run` returns."""
    md = write(out, name, [{k: r[k] for k in columns} for r in rows] if columns else rows, meta)
    if plot is not None:
        plot(rows, out / f"{name}.png")
    print(md.read_text())
    return {"meta": meta, "rows": rows}


@contextlib.contextmanager
def figure(path: Path, panels: int = 1, figsize: Sequence[float] = (6.4, 4.8), title: Optional[str] = None,
           dpi: int = 110) -> Iterator[List[Any]]:
    """A row of `panels` axes to draw on, saved to `path` (with `title` above them) when the
    block ends; matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=tuple(figsize), squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
