"""Writing benchmark results: one JSON file for machines and one Markdown table for people."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path
from typing import Dict, List

import torch


def machine() -> Dict[str, object]:
    """What the numbers were measured on."""
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


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
