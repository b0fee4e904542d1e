"""Taobao UserBehavior (Alibaba Tianchi): organic actions on items, one row each.

`user_id,item_id,category_id,behavior_type,timestamp`, no header, Unix seconds; the data's days
are China calendar days (2017-11-25..12-03), so the world's clock is China time. Also the home
of what both Taobao formats share: the clock and the behaviour types' actions.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import pyarrow as pa

from derl.datapipes import schema as S
from derl.datapipes.importers.stream import first_line, is_integer
from derl.datapipes.importers.writer import PinFields, WorldWriter
from derl.datapipes.sources import DataError

CLOCK = "UTC+8"
CHINA_TIME = 8 * 3600  # ts = unix + this: a day partition is a China day, `hour` China's hour
# Each row is one action: a page view is a click; a favourite is a save; a cart add and a buy
# are the strongest interest signal the action codes have.
ACTIONS = {"pv": S.Action.CLICK, "fav": S.Action.SAVE, "cart": S.Action.LONG_CLICK, "buy": S.Action.LONG_CLICK}
COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
WINDOW = ("2017-11-25", "2017-12-03")
PINS = PinFields(category="source_category_id", content={"category": "source_category_id"})


def read(files: List[Path], w: WorldWriter) -> None:
    types = {c: pa.int64() for c in COLUMNS}
    types["behavior_type"] = pa.string()
    for path in files:
        line = first_line(path)
        if not any(is_integer(f) for f in line.split(",")):
            raise DataError(f"{path}: line 1: {line!r} looks like a header, but UserBehavior has "
                            f"none: every line is a row {','.join(COLUMNS)}")
        for b in w.csv(path, "UserBehavior", COLUMNS, types, header=False):
            item, category = b.ints("item_id"), b.ints("category_id")
            w.organic("UserBehavior", b.ints("user_id"), b.seconds("timestamp") + CHINA_TIME,
                      b.codes("behavior_type", ACTIONS, "behaviour type"), item, window=WINDOW,
                      source_action=b.column("behavior_type"), source_item_id=item,
                      source_category_id=category)
