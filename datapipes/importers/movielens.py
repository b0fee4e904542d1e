"""MovieLens ratings: ML-100K `u.data`, ML-1M `ratings.dat`, RecBole's `.inter`, told apart by
their first line. Unix seconds (UTC), one row per rating, which becomes one action."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from derl.datapipes import schema as S
from derl.datapipes.importers.stream import first_line, is_integer
from derl.datapipes.importers.writer import PinFields, WorldWriter
from derl.datapipes.sources import DataError

CLOCK = "UTC"
PINS = PinFields()  # ratings carry no item attributes: category 0, content zeros
RATINGS = ("user_id", "item_id", "rating", "timestamp")
_SEPARATORS = ("sep1", "sep2", "sep3")  # the empty fields between `::` split at `:`


def action(rating: float) -> int:
    """One rule: 4 and above a save (liked), 3 to below 4 a click (seen, lukewarm), below 3 a hide."""
    return S.Action.SAVE if rating >= 4 else S.Action.CLICK if rating >= 3 else S.Action.HIDE


def layout(path: Path) -> Tuple[str, Tuple[str, ...], str, bool]:
    """(kind, column names, delimiter, header) of a ratings file, from its first line."""
    line = first_line(path)
    if "::" in line:  # ratings.dat: user::item::rating::timestamp, read as `:` with empty fields
        return "ratings.dat", ("user_id", "sep1", "item_id", "sep2", "rating", "sep3", "timestamp"), ":", False
    fields = line.split("\t")
    names = tuple(f.split(":")[0].strip() for f in fields)
    if all(":" in f for f in fields) and set(RATINGS) <= set(names):
        return ".inter", names, "\t", True
    if len(fields) == len(RATINGS) and all(is_integer(f) for f in fields[:2]):
        return "u.data", RATINGS, "\t", False
    raise DataError(f"{path}: line 1: {line!r} is neither a u.data row (user, item, rating, time, "
                    f"tab-separated), a ratings.dat row (`::`-separated) nor a RecBole .inter header "
                    f"({', '.join(c + ':...' for c in RATINGS)})")


def read(files: List[Path], w: WorldWriter) -> None:
    for path in files:
        kind, names, delimiter, header = layout(path)
        types = {"user_id": pa.int64(), "item_id": pa.int64(), "timestamp": pa.float64(),
                 "rating": pa.string(),
                 **{s: pa.string() for s in _SEPARATORS if s in names}}
        for b in w.csv(path, kind, names, types, header, delimiter):
            for s in _SEPARATORS if kind == "ratings.dat" else ():
                bad = np.flatnonzero(b.column(s).is_valid().to_numpy(zero_copy_only=False))
                if len(bad):
                    raise b.error(bad[0], "fields must be separated by `::`")
            words = pc.unique(b.column("rating")).drop_null().to_pylist()
            table = {r: action(float(r)) for r in words if _rating(r)}
            codes = b.codes("rating", table, "rating", known="numbers from 0 to 5")
            item = b.ints("item_id")
            w.organic(kind, b.ints("user_id"), b.seconds("timestamp"), codes,
                      item, source_action=b.column("rating"), source_item_id=item)


def _rating(word: str) -> bool:
    try:
        return 0 <= float(word) <= 5
    except ValueError:
        return False
