"""What several test files share (fixtures are in conftest.py): running the `derl` command,
planting snapshots, damaging a copy of a world, writing small taobao-ad files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.launchers.runtime.config import to_flags
from derl.launchers.runtime.presets import SMALL_RANKER, SMALL_UPSTREAM
from derl.launchers.runtime.processes import Finished, run_derl
from derl.launchers.runtime.settings import TrainDownstreamConfig, TrainUpstreamConfig

# The presets' small models, as flags (small enough for CPU CI, big enough to learn something).
SMALL = to_flags(TrainUpstreamConfig, SMALL_UPSTREAM)
DOWN = to_flags(TrainDownstreamConfig, SMALL_RANKER)
# A reader that cuts the tiny world's tables into many batches.
SMALL_READER = ReaderConfig(batch_size=512, shuffle_buffer=2048, prefetch=2)


def derl(*args: str, env: dict | None = None, check: bool = True) -> Finished:
    """`derl ARGS` as a child in a session of its own, output captured; past 600 s its whole
    process group is killed (StageFailed)."""
    proc = run_derl(args, capture=True, env=env, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"derl {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def plant_snapshot(root, version: str, cut_day: str, tables: dict, dim: int, ads=(), replace: bool = False,
                   reached=None) -> dict:
    """`write_snapshot` with the tests' defaults: a version by hand, not normalised, dot
    temperature 0.05, and the fault hook as `reached` (DERL_FAULT kills a planting process at a
    commit step)."""
    from derl.datapipes.snapshots import write_snapshot
    from derl.launchers.runtime import faults

    return write_snapshot(root, version, cut_day, tables, dim, temperature=0.05, normalised=False, ads=ads,
                          replace=replace, reached=reached or faults.reached)


def export(world, runs: dict, out, *extra: str, **kw) -> Finished:
    """`derl export` of `runs` (domain -> upstream run folder) on `world` into the root `out`."""
    upstream = [a for domain, run in runs.items() for a in ("--upstream", f"{domain}={run}")]
    return derl("export", "--data", str(world), *upstream, "--out", str(out), *extra, **kw)


# --- damaging a copy of a world's Parquet files (the bad-input tests) -------------------------

def first_file(root: Path, table: str, day: str = "2026-01-02") -> Path:
    return sorted((root / table / f"ds={day}").glob("*.parquet"))[0]


def rewrite(path: Path, edit) -> None:
    """Replace a Parquet file by `edit` of its table."""
    pq.write_table(edit(pq.read_table(path)), path, row_group_size=4096)


def read_all(root: Path, table: str = "ad_events", **kw) -> ExampleReader:
    """Read every batch of `table`; the reader, for its stats."""
    reader = ExampleReader(root, table, config=SMALL_READER, **kw)
    for _ in reader:
        pass
    return reader


def damage(path: Path, column: str, rows, value) -> None:
    """Set `rows` of a file's `column` to `value` (None: null); for a list column, `rows` index
    its flattened values."""
    def edit(t):
        col = t.column(column).combine_chunks()
        listed = pa.types.is_list(col.type)
        flat = col.values if listed else col
        mask = flat.is_null().to_numpy(zero_copy_only=False)  # nulls already there stay
        filled = flat.fill_null(0) if flat.null_count else flat
        values = filled.to_numpy(zero_copy_only=False).copy()
        if value is None:
            mask[rows] = True
        else:
            values[rows] = value
        new = pa.array(values, type=flat.type, mask=mask)
        new = pa.ListArray.from_arrays(col.offsets, new) if listed else new
        return t.set_column(t.schema.get_field_index(column), column, new)

    rewrite(path, edit)


# --- the taobao-ad (Ali_Display_Ad_Click) files, small, for `derl import` ---------------------

CHINA = dt.timezone(dt.timedelta(hours=8))
AD_DAYS = [f"2017-05-{d:02d}" for d in range(6, 14)]
PIDS = ["430548_1007", "430539_1007"]


def china_unix(day: str, seconds: int) -> int:
    """Unix seconds of `seconds` after 00:00 China time of `day`."""
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=CHINA).timestamp()) + seconds


def _write_csv(path: Path, header, rows) -> Path:
    lines = ([header] if header else []) + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def taobao_ad_files(folder: Path, seed: int = 0) -> dict:
    """The four Ali_Display_Ad_Click files, small: every day of 2017-05-06..13 has organic and ad
    rows; rows outside the windows, a NULL brand, empty profile codes, an ad without a feature
    row and two duplicate impressions (one whose copies disagree on the click) are planted.
    Returns the rows as written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ads = [(11 + i, 501 + i % 3, 7001 + i % 4, 90 + i % 3, "NULL" if i == 5 else 3001 + i % 2,
            9.5 + i) for i in range(8)]
    _write_csv(folder / "ad_feature.csv", "adgroup_id,cate_id,campaign_id,customer,brand,price",
               ads)
    profile = [(u, u % 5, u % 3, 1 + u % 2, u % 7, "" if u % 4 == 0 else 1 + u % 3, 1 + u % 3,
                u % 2, "" if u % 6 == 0 else 2) for u in range(1, 41)]  # users 41..50 have none
    _write_csv(folder / "user_profile.csv",
              "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
              "shopping_level,occupation,new_user_class_level ", profile)  # the real trailing space
    pairs = [(501, 3001), (502, 3002), (503, 3001), (504, 3005), (505, "NULL")]
    behavior = []
    for day in AD_DAYS:
        for _ in range(60):
            cate, brand = pairs[rng.integers(len(pairs))]
            user, ts = int(rng.integers(1, 51)), china_unix(day, int(rng.integers(0, 86400)))
            btag = ["pv", "pv", "pv", "cart", "fav", "buy"][rng.integers(6)]
            behavior.append((user, ts, btag, cate, brand))
    behavior += [(3, china_unix("2017-04-21", 100), "pv", 501, 3001),
                 (4, china_unix("2017-05-14", 5), "buy", 502, 3002)]
    # The real log is not in time order.
    behavior = [behavior[i] for i in rng.permutation(len(behavior))]
    _write_csv(folder / "behavior_log.csv", "user,time_stamp,btag,cate,brand", behavior)
    impressions = []
    for day in AD_DAYS:
        for _ in range(30):
            clk = int(rng.random() < 0.2)
            user, ts = int(rng.integers(1, 56)), china_unix(day, int(rng.integers(0, 86400)))
            impressions.append((user, ts, int(rng.integers(11, 19)), PIDS[rng.integers(2)],
                                1 - clk, clk))
    impressions += [(7, china_unix("2017-05-07", 50), 99, PIDS[0], 1, 0),  # adgroup 99: no features
                    (8, china_unix("2017-05-05", 50), 12, PIDS[0], 1, 0)]  # before the window
    u, t, a, p, _, _ = impressions[3]
    impressions.insert(10, (u, t, a, p, 1, 0))  # the same impression twice, unclicked
    impressions.insert(20, (u, t, a, p, 0, 1))  # ... and a third time, clicked: the copies disagree
    _write_csv(folder / "raw_sample.csv", "user,time_stamp,adgroup_id,pid,nonclk,clk", impressions)
    return {"ads": ads, "profile": profile, "behavior": behavior, "impressions": impressions}
