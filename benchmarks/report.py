"""Writing benchmark results: one JSON file for machines and one Markdown table for people."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch


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
