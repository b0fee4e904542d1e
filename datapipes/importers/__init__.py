"""`derl import`: public data sets as derl's source tables (docs/importing.md).

One module per format reads its files and hands rows with source ids to the shared writer
(`writer.py`), which numbers ids densely, filters, writes the day partitions and, at the end,
the entity tables and the sequences. The world is written into a hidden folder beside `out` and
renamed into place (`world.place_world`, as `derl generate` does): nothing half-written is seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from derl.datapipes import schema as S
from derl.datapipes.importers import movielens, seq_lines, taobao_ad, taobao_behavior
from derl.datapipes.importers.writer import REPORT, ImportOptions, WorldWriter
from derl.datapipes.world import place_world

__all__ = ["FORMATS", "REPORT", "ImportOptions", "import_world", "input_files", "summary"]

FORMATS = {"taobao-ad": taobao_ad, "taobao-behavior": taobao_behavior, "movielens": movielens,
           "seq-lines": seq_lines}


def input_files(inputs: Sequence[Path]) -> List[Path]:
    """The files named, and the visible files of each folder named (by name), in order; a path
    named twice is refused (its rows would be imported twice)."""
    files: List[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
            if not inside:
                raise FileNotFoundError(f"--input {path}: a folder without files")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path}: no such file or folder")
    seen = set()
    for path in files:
        if path.resolve() in seen:
            raise ValueError(f"--input {path}: named twice; its rows would be imported twice")
        seen.add(path.resolve())
    return files


def import_world(fmt: str, inputs: Sequence[Path], out: Path, overwrite: bool = False,
                 options: ImportOptions = ImportOptions()) -> dict:
    """Import `inputs` in format `fmt` as a world at `out`; returns the import report (also in
    `out/import_report.json`). Options and inputs are checked before anything is read."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}; one of {', '.join(FORMATS)}")
    options.check()
    files = input_files(inputs)
    module = FORMATS[fmt]

    def write(tmp: Path) -> dict:
        writer = WorldWriter(tmp, fmt, module.CLOCK, module.PINS, options)
        module.read(files, writer)
        return writer.finish()

    return place_world(out, overwrite, write)


def summary(report: dict) -> str:
    """A few lines for the terminal: rows per table, days (and those without events), and every
    drop and repair."""
    lines = [", ".join(f"{t} {n:,}" for t, n in report["rows"].items())]
    lines += [f"{t}: {a}..{b}" for t, (a, b) in report["days"].items()]
    lines += [f"{t}: {len(days)} day{'s' * (len(days) != 1)} without events: {S.day_runs(days)}"
              for t, days in report.get("days_without_events", {}).items()]
    for what in ("dropped", "repaired"):
        for reason, by_kind in report[what].items():
            lines.append(f"{what} {reason}: " + ", ".join(f"{k} {n:,}" for k, n in by_kind.items()))
    return "\n".join(lines)
