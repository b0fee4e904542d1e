"""`derl import` on the real public files in ../shared/data (CI has them): row counts checked
against counts made here independently, with plain Python."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads

from derl.datapipes.importers import import_world
from derl.datapipes.sources import SourceTables

DATA = Path(__file__).parents[1].parent / "shared" / "data"
USER_BEHAVIOR = DATA / "taobao-userbehavior" / "UserBehavior_head.csv"
ML_100K = DATA / "movielens-100k" / "ml-100k.inter"
BEAUTY = DATA / "amazon-seq" / "Beauty.txt"
CHINA = dt.timezone(dt.timedelta(hours=8))


def _table(root: Path, name: str):
    return pads.dataset(root / name, format="parquet", partitioning="hive").to_table().to_pandas()


def _check_every_table(root: Path, report: dict) -> None:
    sources = SourceTables(root)
    for t in report["rows"]:
        if t in ("users", "pins", "engagements", "ad_events", "user_sequences"):
            assert sources.read(t).num_rows == report["rows"][t], t


def test_the_userbehavior_head_imports_with_exactly_its_rows_outside_the_window(tmp_path):
    first, last = dt.date(2017, 11, 25), dt.date(2017, 12, 3)
    with open(USER_BEHAVIOR, newline="") as f:
        rows = list(csv.reader(f))
    inside = [r for r in rows if first <= dt.datetime.fromtimestamp(int(r[4]), CHINA).date() <= last]
    assert len(rows) - len(inside) == 35  # the data's own figure (README)
    report = import_world("taobao-behavior", [USER_BEHAVIOR], tmp_path / "w")
    assert report["dropped"] == {"ts_outside_window": {"UserBehavior": 35}}
    assert report["rows"]["engagements"] == len(inside)
    assert report["rows"]["users"] == len({r[0] for r in inside})
    assert report["rows"]["pins"] == len({r[1] for r in inside})
    assert report["inputs"][0]["rows"] == len(rows)
    eng = _table(tmp_path / "w", "engagements")
    assert Counter(eng.source_action) == Counter(r[3] for r in inside)
    assert sorted(eng.ds.astype(str).unique()) == [str(first + dt.timedelta(days=d)) for d in range(9)]
    pins = pads.dataset(tmp_path / "w" / "pins").to_table().to_pandas()
    assert pins.category.nunique() == len({r[2] for r in inside}) == pins.category.max() + 1
    _check_every_table(tmp_path / "w", report)


def test_ml_100k_imports_whole_with_its_two_days_without_ratings_written_empty(tmp_path):
    with open(ML_100K, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    days = {dt.datetime.fromtimestamp(int(r[3]), dt.timezone.utc).date() for r in rows}
    assert len(rows) == 100_000
    assert {dt.date(1997, 12, 11), dt.date(1997, 12, 16)}.isdisjoint(days)
    report = import_world("movielens", [ML_100K], tmp_path / "w")
    assert report["days_without_events"] == {"engagements": ["1997-12-11", "1997-12-16"]}
    assert report["days"] == {"engagements": ["1997-09-20", "1998-04-22"]} and not report["dropped"]
    assert report["rows"]["engagements"] == len(rows)
    assert report["rows"]["users"] == len({r[0] for r in rows})
    assert report["rows"]["pins"] == len({r[1] for r in rows})
    eng = _table(tmp_path / "w", "engagements")
    rule = {"5": 3, "4": 3, "3": 2, "2": 5, "1": 5}  # >= 4 save, 3 click, <= 2 hide
    assert Counter(eng.action) == Counter(rule[r[2]] for r in rows)
    assert len(SourceTables(tmp_path / "w").days("engagements")) == len(days) + 2 == 215
    _check_every_table(tmp_path / "w", report)


def test_beauty_imports_every_user_item_and_row_with_the_last_items_on_the_last_day(tmp_path):
    lines = [line.split() for line in BEAUTY.read_text().splitlines()]
    report = import_world("seq-lines", [BEAUTY], tmp_path / "w")
    assert (report["rows"]["users"], report["rows"]["pins"], report["rows"]["engagements"]) == \
        (22_363, 12_101, 198_502) == (len(lines), len({i for x in lines for i in x[1:]}),
                                      sum(len(x) - 1 for x in lines))
    users = pads.dataset(tmp_path / "w" / "users").to_table().to_pandas()
    pins = pads.dataset(tmp_path / "w" / "pins").to_table().to_pandas()
    eng = _table(tmp_path / "w", "engagements")
    eng["user"] = eng.user_id.map(users.source_user_id).astype(str)
    eng["item"] = eng.pin_id.map(pins.source_item_id).astype(str)
    eng["ds"] = eng.ds.astype(str)
    on = {d: set(zip(g.user, g.item)) for d, g in eng.groupby("ds")}
    assert {(x[0], x[-1]) for x in lines} <= on["2000-01-08"]  # the test items: the last day
    assert {(x[0], x[-2]) for x in lines} <= on["2000-01-07"]  # the validation items: the day before
    assert len(on["2000-01-08"]) == len(lines)
    _check_every_table(tmp_path / "w", report)
