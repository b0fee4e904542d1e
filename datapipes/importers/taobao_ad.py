"""Taobao display advertising (Ali_Display_Ad_Click, Alibaba Tianchi): ads, their impressions
and clicks, the organic behaviour log and user profiles, in four CSV files with headers.

Files are recognised by their header, never their name. The behaviour log names no items, only
(category, brand): that pair is the finest entity it names, and the one ads belong to, so each
pair is one organic Pin; ads share with them through `category` and the content hashed from the
same category and brand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa

from derl.datapipes import schema as S
from derl.datapipes.importers.ids import IdSpace, pair_key
from derl.datapipes.importers.stream import Block, first_line, is_integer
from derl.datapipes.importers.taobao_behavior import ACTIONS, CHINA_TIME, CLOCK as CHINA_CLOCK
from derl.datapipes.importers.writer import PinFields, WorldWriter
from derl.datapipes.sources import DataError

CLOCK = CHINA_CLOCK  # as UserBehavior's
HEADERS = {  # in the order they are read: ads before impressions, profiles before users' tables
    "ad_feature": ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"),
    "user_profile": ("userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level",
                     "pvalue_level", "shopping_level", "occupation", "new_user_class_level"),
    "behavior_log": ("user", "time_stamp", "btag", "cate", "brand"),
    "raw_sample": ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"),
}
WINDOWS = {"behavior_log": ("2017-04-22", "2017-05-13"), "raw_sample": ("2017-05-06", "2017-05-13")}
PLACEMENTS = {"430548_1007": S.Surface.HOME_FEED, "430539_1007": S.Surface.SEARCH}
PROFILE = {"country": "cms_segid", "age_bucket": "age_level", "gender": "final_gender_code"}
PINS = PinFields(category="source_cate", advertiser="source_customer", campaign="source_campaign_id",
                 content={"category": "source_cate", "brand": "source_brand"})


def kind_of(path: Path) -> str:
    """Which of the four files `path` is, by its header."""
    line = first_line(path)
    names = tuple(f.strip().lower() for f in line.split(","))
    for kind, header in HEADERS.items():
        if names == header:
            return kind
    if is_integer(names[0]):
        raise DataError(f"{path}: line 1: no header ({line!r} is a data row); every taobao-ad file "
                        f"starts with its header, which says which file it is")
    raise DataError(f"{path}: line 1: header {line!r} is none of taobao-ad's: "
                    + "; ".join(",".join(h) for h in HEADERS.values()))


def _blocks(w: WorldWriter, path: Path, kind: str, types: Dict[str, pa.DataType]):
    cols = HEADERS[kind]
    return w.csv(path, kind, cols, {c: types.get(c, pa.int64()) for c in cols}, header=True)


def _brand(b: Block, kind: str, w: WorldWriter) -> np.ndarray:
    """Brand ids; an empty or NULL brand (the real files have them) is brand 0, counted."""
    w.report.repair("brand_null_to_0", kind, b.nulls("brand"))
    return b.ints("brand", fill=0)


def _ad_feature(path: Path, w: WorldWriter) -> None:
    for b in _blocks(w, path, "ad_feature", {"price": pa.float64()}):
        adgroup, cate, brand = b.ints("adgroup_id"), b.ints("cate_id"), _brand(b, "ad_feature", w)
        w.report.repair("price_empty_to_null", "ad_feature", b.nulls("price"))
        w.pins.add_unique(adgroup, b, np.arange(len(b)), "adgroup_id", is_ad=True,
                          source_adgroup_id=adgroup, source_cate=cate, source_brand=brand,
                          source_customer=b.ints("customer"), source_campaign_id=b.ints("campaign_id"),
                          price=b.column("price").to_numpy(zero_copy_only=False))


def _user_profile(path: Path, w: WorldWriter, profile: IdSpace) -> None:
    for b in _blocks(w, path, "user_profile", {}):
        values = {}
        for c in HEADERS["user_profile"][1:]:  # the real file leaves some codes empty: 0, counted
            w.report.repair(f"empty_{c}_to_0", "user_profile", b.nulls(c))
            values[c] = b.ints(c, fill=0)
        for c, top in (("cms_segid", 2 ** 31 - 1), ("age_level", 127), ("final_gender_code", 127)):
            big = np.flatnonzero(values[c] > top)
            if len(big):
                raise b.error(big[0], f"column {c!r}: {values[c][big[0]]} is beyond the code's range 0..{top}")
        user = b.ints("userid")
        rows = np.flatnonzero(w.keep("user_profile", user))
        profile.add_unique(user[rows], b, rows, "userid", **{c: v[rows] for c, v in values.items()})


def _behavior_log(path: Path, w: WorldWriter) -> None:
    for b in _blocks(w, path, "behavior_log", {"btag": pa.string()}):
        cate, brand = b.ints("cate"), _brand(b, "behavior_log", w)
        # An organic entity's key is negative, so that it never meets an ad's (adgroup_id >= 0).
        entity = ~pair_key(cate, brand, b, ("cate", "brand"))
        w.organic("behavior_log", b.ints("user"), b.seconds("time_stamp") + CHINA_TIME,
                  b.codes("btag", ACTIONS, "behaviour type"), entity, window=WINDOWS["behavior_log"],
                  source_action=b.column("btag"), source_cate=cate, source_brand=brand)


def _raw_sample(path: Path, w: WorldWriter, request_id: int) -> int:
    """Impressions; each one's request_id is its data row's number across the raw_sample files
    (from 0), unique by construction. Returns the next number."""
    for b in _blocks(w, path, "raw_sample", {"pid": pa.string()}):
        clk, nonclk = b.ints("clk"), b.ints("nonclk")
        bad = np.flatnonzero(clk > 1)
        if len(bad):
            raise b.error(bad[0], f"column 'clk': {clk[bad[0]]} is not a click label (0 or 1)")
        bad = np.flatnonzero(nonclk != 1 - clk)
        if len(bad):
            raise b.error(bad[0], f"nonclk {nonclk[bad[0]]} and clk {clk[bad[0]]}: exactly one of "
                                  f"them must be 1")
        surface = b.codes("pid", PLACEMENTS, "placement (pid)")
        w.ad_impressions("raw_sample", request_id + np.arange(len(b)), b.ints("user"),
                         b.seconds("time_stamp") + CHINA_TIME, b.ints("adgroup_id"), surface, clk,
                         window=WINDOWS["raw_sample"])
        request_id += len(b)
    return request_id


def read(files: List[Path], w: WorldWriter) -> None:
    by_kind: Dict[str, List[Path]] = {k: [] for k in HEADERS}
    for path in files:
        by_kind[kind_of(path)].append(path)
    if not by_kind["behavior_log"]:
        raise DataError("taobao-ad: no behavior_log.csv among the inputs (recognised: "
                        + ", ".join(f"{k} {len(v)}" for k, v in by_kind.items())
                        + "); a world needs the organic log")
    if by_kind["raw_sample"] and not by_kind["ad_feature"]:
        raise DataError("taobao-ad: raw_sample.csv without ad_feature.csv: its ads would have no "
                        "category, advertiser or campaign")
    for path in by_kind["ad_feature"]:
        _ad_feature(path, w)
    if by_kind["user_profile"]:
        profile = IdSpace()
        for path in by_kind["user_profile"]:
            _user_profile(path, w, profile)
        w.profile = (profile, PROFILE)
    for path in by_kind["behavior_log"]:
        _behavior_log(path, w)
    request_id = 0
    for path in by_kind["raw_sample"]:
        request_id = _raw_sample(path, w, request_id)
