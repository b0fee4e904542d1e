"""Sequential-recommendation lines (`user item1 item2 ...`, items in time order, no times), as
the S3-Rec / SASRec benchmarks ship them (Amazon Beauty, Sports).

The times are synthesised so that derl's day split reproduces the benchmarks' leave-one-out:
over D days (`--days`, from 2000-01-01), each user's last item falls on the last day (the
evaluation day), the second-to-last on the day before, the earlier ones spread evenly over the
D-2 days before those; within a day a user's items keep their order, spread over its seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from derl.datapipes import schema as S
from derl.datapipes.importers.ids import IdSpace
from derl.datapipes.importers.writer import PinFields, WorldWriter

CLOCK = "synthesized"
START = "2000-01-01"
PINS = PinFields()  # no item attributes read: category 0, content zeros
_FIELD = "\x1f"  # a delimiter no line holds: each line is one column, split on whitespace here


def item_days(position: np.ndarray, count: np.ndarray, days: int) -> np.ndarray:
    """The day index (0..days-1) of the item at `position` (0-based) of a user's `count` items:
    the last on the last day, the second-to-last on the day before, item k of the m = count - 2
    earlier ones on day floor(k (days - 2) / m), so they cover days 0..days-3 evenly, in order.
    A user with one item has only the last; with two, no earlier ones."""
    earlier = count - 2
    spread = (position * (days - 2)) // np.maximum(earlier, 1)
    return np.where(position == count - 1, days - 1, np.where(position == count - 2, days - 2, spread))


def within_day_seconds(line: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Seconds into its day for each item, the j-th of a user's c items that day at j * 86400 // c:
    distinct and in order (items arrive grouped by line, days non-decreasing within a line)."""
    start = np.ones(len(line), dtype=bool)
    start[1:] = (line[1:] != line[:-1]) | (day[1:] != day[:-1])
    first = np.flatnonzero(start)
    group = np.cumsum(start) - 1
    size = np.diff(np.append(first, len(line)))
    j = np.arange(len(line)) - first[group]
    return j * S.SECONDS_PER_DAY // size[group]


def read(files: List[Path], w: WorldWriter) -> None:
    days = w.options.days
    day0 = S.day_start_ts(S.parse_day(START)) // S.SECONDS_PER_DAY
    lines_of = IdSpace()  # users with a line so far: a second line of one user is refused
    for path in files:
        for b in w.csv(path, "seq-lines", ["line"], {"line": pa.string()}, header=False, delimiter=_FIELD):
            b.require("line")
            tokens = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(b.column("line")))
            flat = pc.list_flatten(tokens)
            bad = np.flatnonzero(~pc.match_substring_regex(flat, r"^\d{1,18}$").to_numpy(zero_copy_only=False))
            if len(bad):
                row = pc.list_parent_indices(tokens).to_numpy()[bad[0]]
                raise b.error(row, f"{flat[bad[0]].as_py()!r} is not an id (a non-negative integer)")
            values = pc.cast(flat, pa.int64()).to_numpy()
            counts = pc.list_value_length(tokens).to_numpy().astype(np.int64)
            starts = np.cumsum(counts) - counts
            user = values[starts]
            lines_of.add_unique(user, b, np.arange(len(b)), "user")
            n = counts - 1
            w.report.drop("line_without_items", "seq-lines", (n == 0).sum())
            is_item = np.ones(len(values), dtype=bool)
            is_item[starts] = False
            line = np.repeat(np.arange(len(b)), n)
            position = np.arange(len(line)) - np.repeat(np.cumsum(n) - n, n)
            day = item_days(position, n[line], days)
            ts = (day0 + day) * S.SECONDS_PER_DAY + within_day_seconds(line, day)
            items = values[is_item]
            w.organic("seq-lines", user[line], ts, np.full(len(line), S.Action.CLICK, dtype=np.int8),
                      items, source_item_id=items)
