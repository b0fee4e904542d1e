"""The time split every stage agrees on, always by day (docs/architecture.md, "The time split").

    days:  | upstream training ............ | cut | downstream ... | eval |
The snapshot is cut at the start of `cut_day` from upstream data before it; upstream models are
evaluated on `cut_day` (the day after their window); downstream rankers train on
`downstream_days` with that snapshot and are evaluated on `eval_day`, which nothing trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from derl.datapipes import schema as S


@dataclass(frozen=True)
class TimeSplit:
    upstream_days: Tuple[str, str]
    cut_day: str
    downstream_days: Tuple[str, str]
    eval_day: str


def default_split(days: List[str], downstream_days: int = 2) -> TimeSplit:
    """Upstream on all but the last `downstream_days + 1` days, downstream on the next ones,
    evaluation on the last day. The days must be consecutive dates (`SourceTables.days` gives
    them so): a gap would move the cut and the evaluation day by position, unannounced. A day
    without events (a partition written empty on purpose, docs/importing.md) is a day here
    like any other: the split follows the calendar, not the days that hold rows."""
    days = sorted(set(days), key=S.parse_day)
    gaps = S.gaps(days)
    if gaps:
        raise ValueError(f"a time split needs consecutive days: {S.day_runs(gaps)} missing "
                         f"between {days[0]} and {days[-1]}")
    if len(days) < downstream_days + 2:
        raise ValueError(
            f"a time split needs at least {downstream_days + 2} days, the source has {len(days)}"
        )
    cut = len(days) - downstream_days - 1
    return TimeSplit(
        upstream_days=(days[0], days[cut - 1]),
        cut_day=days[cut],
        downstream_days=(days[cut], days[-2]),
        eval_day=days[-1],
    )
