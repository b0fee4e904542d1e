"""The source tables (docs/data.md) as Arrow schemas, plus the codes their small enums use.

Every adapter (the synthetic world, a real data set) writes these; every reader checks a file
against them before it trusts a row. Extra columns are allowed, missing or mistyped ones are not.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Dict, Tuple

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
    """One source table: its folder name, required columns, and whether it is split by day."""

    name: str
    schema: pa.Schema
    partitioned_by_day: bool
    id_columns: Tuple[str, ...]


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
    id_columns=("pin_id",),  # advertiser_id / campaign_id are null for organic Pins
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
)

TABLES: Dict[str, TableSpec] = {
    t.name: t for t in (USERS, PINS, ENGAGEMENTS, AD_EVENTS, USER_SEQUENCES)
}

DAY_FORMAT = "%Y-%m-%d"


def parse_day(day: str) -> dt.date:
    try:
        return dt.datetime.strptime(day, DAY_FORMAT).date()
    except ValueError as e:
        raise ValueError(f"day {day!r} is not of the form YYYY-MM-DD") from e


def day_start_ts(day: dt.date) -> int:
    """Unix seconds at 00:00 UTC of `day`."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
