"""The source tables (docs/data.md) as Arrow schemas, plus the codes their small enums use.

Every adapter (the synthetic world, a real data set) writes these; every reader checks a file
against them before it trusts a row. Extra columns are allowed, missing or mistyped ones are not.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa


class Action(enum.IntEnum):
    """Outcome of one organic impression: the strongest thing the user did with the Pin.

    Ordered by how much they say about interest; `HIDE` is an explicit negative.
    """

    IMPRESSION = 0
    CLOSEUP = 1
    CLICK = 2
    SAVE = 3
    LONG_CLICK = 4
    HIDE = 5


class Surface(enum.IntEnum):
    HOME_FEED = 0
    SEARCH = 1
    RELATED_PINS = 2


NUM_ACTIONS = len(Action)
NUM_SURFACES = len(Surface)
NUM_HOURS = 24
SECONDS_PER_DAY = 86_400

# Content embeddings are the stand-in for visual/text encoders; all sources share one width.
CONTENT_DIM = 32


@dataclass(frozen=True)
class TableSpec:
    """One source table: its folder name, required columns, and whether it is split by day.

    Readers check every row against the rest (sources.read_checked): `codes` are the integer
    columns (ids and enum codes, list columns included) whose values must lie in [0, n), n None
    where the table's own data sizes the vocabulary; only `nullable` columns may hold nulls; a
    day (or an unpartitioned table) without rows is an error unless `may_be_empty`, or unless
    every file of the day carries `DAY_WITHOUT_EVENTS`: a day of the data's range on which
    nothing happened, written empty on purpose, not a lost or half-written day.
    `id_columns` are the ids `derl inspect` shows.
    """

    name: str
    schema: pa.Schema
    partitioned_by_day: bool
    id_columns: Tuple[str, ...]
    codes: Dict[str, Optional[int]]
    nullable: Tuple[str, ...] = ()
    may_be_empty: bool = False


def _schema(**fields: pa.DataType) -> pa.Schema:
    return pa.schema([pa.field(k, v) for k, v in fields.items()])


USERS = TableSpec(
    name="users",
    schema=_schema(
        user_id=pa.int64(),
        country=pa.int32(),
        age_bucket=pa.int8(),
        gender=pa.int8(),
        signup_ds=pa.date32(),
    ),
    partitioned_by_day=False,
    id_columns=("user_id",),
    codes={"user_id": None, "country": None, "age_bucket": None, "gender": None},
)

PINS = TableSpec(
    name="pins",
    schema=_schema(
        pin_id=pa.int64(),
        category=pa.int32(),
        content_emb=pa.list_(pa.float32(), CONTENT_DIM),
        is_ad=pa.bool_(),
        advertiser_id=pa.int64(),
        campaign_id=pa.int64(),
        created_ds=pa.date32(),
    ),
    partitioned_by_day=False,
    id_columns=("pin_id",),
    codes={"pin_id": None, "category": None, "advertiser_id": None, "campaign_id": None},
    nullable=("advertiser_id", "campaign_id"),  # null for organic Pins
)

ENGAGEMENTS = TableSpec(
    name="engagements",
    schema=_schema(
        user_id=pa.int64(),
        pin_id=pa.int64(),
        action=pa.int8(),
        ts=pa.int64(),
        surface=pa.int8(),
    ),
    partitioned_by_day=True,
    id_columns=("user_id", "pin_id"),
    codes={"user_id": None, "pin_id": None, "action": NUM_ACTIONS, "surface": NUM_SURFACES},
)

AD_EVENTS = TableSpec(
    name="ad_events",
    schema=_schema(
        request_id=pa.int64(),
        user_id=pa.int64(),
        pin_id=pa.int64(),
        advertiser_id=pa.int64(),
        campaign_id=pa.int64(),
        ts=pa.int64(),
        surface=pa.int8(),
        position=pa.int16(),
        clicked=pa.int8(),
        converted=pa.int8(),
    ),
    partitioned_by_day=True,
    id_columns=("request_id", "user_id", "pin_id", "advertiser_id", "campaign_id"),
    codes={"request_id": None, "user_id": None, "pin_id": None, "advertiser_id": None,
           "campaign_id": None, "surface": NUM_SURFACES, "position": None},
)

# Last L engagements (oldest first) of each user active that day, as of the day's start.
USER_SEQUENCES = TableSpec(
    name="user_sequences",
    schema=_schema(
        user_id=pa.int64(),
        seq_pin_id=pa.list_(pa.int64()),
        seq_action=pa.list_(pa.int8()),
        seq_ts=pa.list_(pa.int64()),
    ),
    partitioned_by_day=True,
    id_columns=("user_id",),
    codes={"user_id": None, "seq_pin_id": None, "seq_action": NUM_ACTIONS},
    may_be_empty=True,  # a day whose active users have no history yet (the first day)
)

TABLES: Dict[str, TableSpec] = {
    t.name: t for t in (USERS, PINS, ENGAGEMENTS, AD_EVENTS, USER_SEQUENCES)
}

DAY_FORMAT = "%Y-%m-%d"

# Parquet key-value metadata of a day partition's file written with zero rows on purpose: the
# data has no events that day (an import writes it so). Read by `sources`, written by importers.
DAY_WITHOUT_EVENTS = {b"derl.day_without_events": b"true"}


def parse_day(day: str) -> dt.date:
    """The date of a canonical `YYYY-MM-DD`; other spellings of a date (`2026-1-5`, `20260105`)
    are refused, so that days compare as strings in date order."""
    try:
        date = dt.datetime.strptime(day, DAY_FORMAT).date()
    except ValueError:
        date = None
    if date is None or date.isoformat() != day:
        raise ValueError(f"day {day!r} is not of the form YYYY-MM-DD")
    return date


def day_range(first: str, last: str) -> List[str]:
    """Every day from `first` to `last`, both included; none if `last` comes first."""
    a, b = parse_day(first), parse_day(last)
    return [(a + dt.timedelta(days=k)).isoformat() for k in range((b - a).days + 1)]


def gaps(days: Sequence[str]) -> List[str]:
    """The days missing between the first and the last of sorted `days`."""
    have = set(days)
    return [d for d in day_range(days[0], days[-1]) if d not in have] if days else []


def day_runs(days: Sequence[str]) -> str:
    """Sorted days as runs of consecutive days, for messages: `2026-01-03, 2026-01-05..2026-01-07`."""
    runs: List[List[str]] = []  # [first, last] of each run
    for d in days:
        if runs and parse_day(d) - parse_day(runs[-1][1]) == dt.timedelta(days=1):
            runs[-1][1] = d
        else:
            runs.append([d, d])
    return ", ".join(a if a == b else f"{a}..{b}" for a, b in runs)


def day_start_ts(day: dt.date) -> int:
    """Unix seconds at 00:00 UTC of `day`."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
