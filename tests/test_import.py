"""`derl import`: fixtures in the public formats, written here, become worlds every reader takes;
every bad input is refused by file and line, or dropped and counted (docs/importing.md)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from derl.datapipes import schema as S
from derl.datapipes.importers import REPORT, ImportOptions, import_world, writer
from derl.datapipes.importers.seq_lines import item_days
from derl.datapipes.sequences import SequenceBuffer, sequences_as_of
from derl.datapipes.sources import DataError, SourceTables
from derl.datapipes.world import WORLD_PRESETS, WORLD_META, generate, latent_state
from helpers import AD_DAYS, china_unix, derl, taobao_ad_files

# Small blocks and row groups, so that a day's rows arrive in many chunks, out of time order.
SMALL = ImportOptions(block_bytes=4096, row_group_size=64)
TINY = dataclasses.replace(WORLD_PRESETS["tiny"], num_users=50, num_pins=100, num_days=2)


def _table(root: Path, name: str) -> pd.DataFrame:
    spec = S.TABLES[name]
    ds = pads.dataset(root / name, format="parquet", partitioning="hive" if spec.partitioned_by_day else None)
    df = ds.to_table().to_pandas()
    if "ds" in df:
        df["ds"] = df.ds.astype(str)
    return df


@pytest.fixture(scope="module")
def taobao_world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taobao-ad")
    rows = taobao_ad_files(folder / "files")
    out = folder / "world"
    with pytest.MonkeyPatch.context() as m:  # and the sequences merge a day in many batches
        m.setattr(writer, "_MERGE_ROWS", 50)
        report = import_world("taobao-ad", [folder / "files"], out, options=SMALL)
    return out, rows, report


def test_sequence_buffer_merges_chunks_by_time():
    """A day read in chunks that are not in time order gives the sequences one sorted append
    gives: merged by time, held events before new ones on a tie."""
    rng = np.random.default_rng(0)
    n = 3000
    user, pin = rng.integers(0, 50, n), rng.integers(0, 1000, n)
    action, ts = rng.integers(1, 6, n).astype(np.int8), rng.integers(0, 400, n)
    whole, chunked = SequenceBuffer(50, 32), SequenceBuffer(50, 32)
    order = np.argsort(ts, kind="stable")
    whole.append(user[order], pin[order], action[order], ts[order])
    for part in np.array_split(np.arange(n), 7):
        chunked.append(user[part], pin[part], action[part], ts[part])
    for got, want in ((chunked.ts, whole.ts), (chunked.action, whole.action), (chunked.pin, whole.pin)):
        np.testing.assert_array_equal(got, want)


def test_a_taobao_ad_import_is_a_world_every_reader_takes(taobao_world):
    out, rows, report = taobao_world
    sources = SourceTables(out)
    for name in S.TABLES:  # every value through read_checked: schema, nulls, codes, days
        assert sources.read(name).num_rows == report["rows"][name], name
    assert sources.days("engagements") == AD_DAYS and sources.days("ad_events") == AD_DAYS
    users, pins = _table(out, "users"), _table(out, "pins")
    eng, ads = _table(out, "engagements"), _table(out, "ad_events")
    # Dense ids everywhere: 0..n-1 per space, each one used.
    assert users.user_id.tolist() == list(range(len(users)))
    assert pins.pin_id.tolist() == list(range(len(pins)))
    assert set(pins.category) == set(range(pins.category.max() + 1)) == set(range(5))
    ad_pins = pins[pins.is_ad]
    assert set(ad_pins.advertiser_id) == {0, 1, 2} and set(ad_pins.campaign_id) == {0, 1, 2, 3}
    assert pins[~pins.is_ad].advertiser_id.isna().all()
    assert set(eng.user_id) | set(ads.user_id) == set(users.user_id)
    # Ads first (ad_feature is read first), one organic Pin per (cate, brand) pair.
    assert ad_pins.source_adgroup_id.tolist() == [a[0] for a in rows["ads"]]
    assert len(pins) == len(rows["ads"]) + 5
    # Content is hashed from (category, brand): an ad and the organic entity of its pair share it.
    organic = pins[~pins.is_ad].set_index(["source_cate", "source_brand"])
    np.testing.assert_array_equal(np.stack(ad_pins.content_emb.iloc[[0]]),
                                  np.stack(organic.loc[[(501, 3001)]].content_emb))
    assert np.allclose(np.linalg.norm(np.stack(pins.content_emb), axis=1), 1, atol=1e-5)
    # Each impression is one row whose request_id is its row number in raw_sample.csv.
    assert ads.request_id.is_unique
    first, end = china_unix(AD_DAYS[0], 0), china_unix(AD_DAYS[-1], 86400)
    assert ads.ts.between(first + 28800, end + 28800 - 1).all()
    assert report["dropped"]["ad_without_feature"] == {"raw_sample": 1}
    assert report["dropped"]["duplicate_impression"] == {"ad_events": 2}
    assert report["repaired"]["duplicate_clicks_disagree_kept_clicked"] == {"ad_events": 1}
    assert len(ads) == len(rows["impressions"]) - 4
    u, t, a, _, _, _ = rows["impressions"][3]
    copies = ads[(ads.user_id.map(users.source_user_id) == u) & (ads.ts == t + 28800)]
    assert copies.clicked.tolist() == [1]  # the clicked copy kept
    assert report["dropped"]["ts_outside_window"] == {"behavior_log": 2, "raw_sample": 1}
    assert report["repaired"]["brand_null_to_0"] == {"ad_feature": 1, "behavior_log": sum(
        r[4] == "NULL" for r in rows["behavior"])}
    assert report["repaired"]["empty_pvalue_level_to_0"] == {"user_profile": 10}
    assert len(eng) == len(rows["behavior"]) - 2
    # Actions and the clock (China time): each row once, at unix + 8 h.
    assert dict(zip(eng.source_action, eng.action)) == {"pv": 2, "fav": 3, "cart": 4, "buy": 4}
    got = sorted(zip(eng.user_id.map(users.source_user_id), eng.ts - 28800, eng.source_action))
    assert got == sorted((r[0], r[1], r[2]) for r in rows["behavior"]
                         if china_unix(AD_DAYS[0], 0) <= r[1] < china_unix(AD_DAYS[-1], 86400))
    # Profiles: country, age and gender from user_profile; users without one get 0, counted.
    prof = {p[0]: p for p in rows["profile"]}
    for r in users.itertuples():
        p = prof.get(r.source_user_id)
        assert (r.country, r.age_bucket, r.gender) == ((p[1], p[4], p[3]) if p else (0, 0, 0))
    assert report["repaired"]["no_profile_codes_0"] == {"users": int((users.source_user_id > 40).sum())}
    # signup_ds and created_ds: the day of the first event.
    first_day = pd.concat([eng[["user_id", "ds"]], ads[["user_id", "ds"]]]).groupby("user_id").ds.min()
    assert (users.signup_ds.astype(str) == users.user_id.map(first_day)).all()


def test_imported_sequences_hold_the_history_before_each_day(taobao_world):
    """user_sequences/ds=D: for every user active on D (organic or ad), the last 32 engagements
    strictly before D, as recomputed here from the log, and as export's replay gives them."""
    out, _, _ = taobao_world
    eng, ads, seqs = _table(out, "engagements"), _table(out, "ad_events"), _table(out, "user_sequences")
    eng = eng.sort_values("ts", kind="stable")
    sources = SourceTables(out)
    for day in AD_DAYS:
        start = S.day_start_ts(S.parse_day(day))
        active = set(eng[eng.ds == day].user_id) | set(ads[ads.ds == day].user_id)
        history = eng[eng.ts < start]
        want = {u: g.tail(32) for u, g in history[history.user_id.isin(active)].groupby("user_id")}
        got = seqs[seqs.ds == day].set_index("user_id")
        assert set(got.index) == set(want), day
        for u, g in want.items():
            assert list(got.loc[u].seq_ts) == g.ts.tolist()
            assert list(got.loc[u].seq_pin_id) == g.pin_id.tolist()
        replay = sequences_as_of(sources, day, 32, np.array(sorted(want), dtype=np.int64)).to_pandas()
        assert [list(x) for x in replay.seq_ts] == [list(got.loc[u].seq_ts) for u in sorted(want)]


def test_the_world_metadata_and_report_say_what_was_imported(taobao_world):
    out, _, report = taobao_world
    meta = json.loads((out / WORLD_META).read_text())
    assert meta["source"] == "import" and meta["format"] == "taobao-ad" and meta["clock"] == "UTC+8"
    assert meta["days"] == AD_DAYS and meta["conversions"] is False and "config" not in meta
    assert meta["rows"]["ad_events"] == report["rows"]["ad_events"] and 0 < meta["ctr"] < 1
    assert "seed" not in meta and meta["sample_users"] is None
    assert json.loads((out / REPORT).read_text()) == report
    kinds = sorted(i["kind"] for i in report["inputs"])
    assert kinds == ["ad_feature", "behavior_log", "raw_sample", "user_profile"]
    for i in report["inputs"]:
        assert i["bytes"] == Path(i["path"]).stat().st_size and len(i["sha256"]) == 64
    with pytest.raises(ValueError, match="was imported from taobao-ad: it has no generator, so no latent truth"):
        latent_state(out, AD_DAYS[0])
    assert not list(out.parent.glob(".*"))  # nothing left beside


def test_ad_events_and_engagements_pass_the_example_reader_with_nothing_to_repair(taobao_world):
    from derl.datapipes.readers import ExampleReader, ReaderConfig

    out, _, report = taobao_world
    for table in ("engagements", "ad_events"):
        reader = ExampleReader(out, table, config=ReaderConfig(batch_size=64, shuffle_buffer=128, prefetch=0))
        assert sum(b.size for b in reader) == report["rows"][table]
        assert not reader.stats.repaired and not dict(reader.stats.rows_dropped), reader.stats.as_dict()


def _splitmix64(x: int) -> int:
    """splitmix64 in plain Python integers: the sampling rule, recomputed independently."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_sampling_keeps_the_same_users_in_every_file_and_every_run(tmp_path):
    rows = taobao_ad_files(tmp_path / "files")
    opts = ImportOptions(sample_users=0.5, seed=7, block_bytes=4096, row_group_size=64)
    a = import_world("taobao-ad", [tmp_path / "files"], tmp_path / "a", options=opts)
    b = import_world("taobao-ad", [tmp_path / "files"], tmp_path / "b", options=opts)
    assert a["rows"] == b["rows"] and a["dropped"] == b["dropped"]
    salt = _splitmix64(7)
    kept = {u for u in range(1, 60) if (_splitmix64(u ^ salt) >> 11) < int(0.5 * 2 ** 53)}
    assert 10 < len(kept) < 50
    users = _table(tmp_path / "a", "users")
    assert set(users.source_user_id) <= kept
    for name in ("engagements", "ad_events"):
        got = set(_table(tmp_path / "a", name).user_id.map(users.source_user_id))
        assert got <= kept, name
    out_of = {"behavior_log": sum(r[0] not in kept for r in rows["behavior"]),
              "raw_sample": sum(r[0] not in kept for r in rows["impressions"]),
              "user_profile": sum(r[0] not in kept for r in rows["profile"])}
    assert a["dropped"]["sampled_out"] == out_of
    meta = json.loads((tmp_path / "a" / WORLD_META).read_text())
    assert meta["sample_users"] == 0.5 and meta["seed"] == 7
    other = import_world("taobao-ad", [tmp_path / "files"], tmp_path / "c",
                         options=ImportOptions(sample_users=0.5, seed=8, block_bytes=4096))
    assert other["dropped"]["sampled_out"] != a["dropped"]["sampled_out"]


def test_ids_do_not_depend_on_how_the_input_is_cut_into_blocks(tmp_path, taobao_world):
    out, _, _ = taobao_world
    taobao_ad_files(tmp_path / "files")
    import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=ImportOptions())
    for name in ("users", "pins", "engagements", "ad_events", "user_sequences"):
        a = _table(out, name)
        b = _table(tmp_path / "w", name)
        keys = [c for c in ("ds", "request_id", "user_id", "ts", "pin_id") if c in a]
        a, b = (t.sort_values(keys, kind="stable").reset_index(drop=True) for t in (a, b))
        for c in a:
            assert a[c].map(lambda x: str(np.asarray(x).tolist())).tolist() == \
                b[c].map(lambda x: str(np.asarray(x).tolist())).tolist(), (name, c)


def test_overwrite_replaces_only_a_world_and_refuses_a_foreign_folder(tmp_path):
    taobao_ad_files(tmp_path / "files")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError,
                       match=rf"--overwrite: {re.escape(str(notes))} holds no {WORLD_META}, so it is not a world"):
        import_world("taobao-ad", [tmp_path / "files"], notes, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        import_world("taobao-ad", [tmp_path / "files"], notes)
    assert (notes / "thesis.tex").read_text() == "years of work"
    generated = tmp_path / "w"
    generate(generated, TINY, seed=0)
    import_world("taobao-ad", [tmp_path / "files"], generated, overwrite=True, options=SMALL)
    assert json.loads((generated / WORLD_META).read_text())["source"] == "import"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files", "notes", "w"]


def test_a_failed_import_leaves_nothing_behind(tmp_path):
    taobao_ad_files(tmp_path / "files")
    lines = (tmp_path / "files" / "raw_sample.csv").read_text().splitlines()
    lines[-1] = lines[-1].replace("430548_1007", "430548_1008").replace("430539_1007", "430548_1008")
    (tmp_path / "files" / "raw_sample.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"raw_sample.csv: line {len(lines)}: column 'pid': unknown "
                                        r"placement \(pid\) '430548_1008'"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]


# -- bad input: each refused naming file and line --------------------------------------------

TS = china_unix("2017-05-06", 10)  # inside both windows
BEHAVIOR_HEADER = "user,time_stamp,btag,cate,brand"
GOOD_ROW = f"1,{TS},pv,501,3001"


@pytest.mark.parametrize("lines, line, message", [
    ([BEHAVIOR_HEADER, GOOD_ROW, "1,1494000000,pv,501"], 3, "expected 5 columns, found 4"),
    ([BEHAVIOR_HEADER, GOOD_ROW, GOOD_ROW + ",7"], 3, "expected 5 columns, found 6"),
    ([BEHAVIOR_HEADER, GOOD_ROW, "u7,1494000000,pv,501,3001"], 3, "column 'user': 'u7' is not an integer"),
    ([BEHAVIOR_HEADER, GOOD_ROW, GOOD_ROW, "1,1494000000,like,501,3001"], 4, "unknown behaviour type 'like'"),
    ([BEHAVIOR_HEADER, GOOD_ROW, "-3,1494000000,pv,501,3001"], 3, "column 'user': -3 is negative"),
    ([BEHAVIOR_HEADER, GOOD_ROW, ",1494000000,pv,501,3001"], 3, "column 'user' is empty"),
    ([BEHAVIOR_HEADER, GOOD_ROW, "", GOOD_ROW], 3, "an empty line"),
    ([GOOD_ROW, GOOD_ROW], 1, "no header"),
], ids=["too-few-columns", "too-many-columns", "non-numeric-id", "unknown-behaviour", "negative-id",
        "empty-id", "empty-line", "missing-header"])
def test_a_bad_behaviour_log_is_refused_naming_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "behavior_log.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line {line}: .*{message}"):
        import_world("taobao-ad", [path], tmp_path / "w", options=SMALL)


RAW_HEADER = "user,time_stamp,adgroup_id,pid,nonclk,clk"
RAW_ROW = f"1,{TS},11,430548_1007,1,0"


@pytest.mark.parametrize("bad, message", [
    (f"1,{TS},11,430548_1007,0,2", "column 'clk': 2 is not a click label"),
    (f"1,{TS},11,430548_1007,1,1", "nonclk 1 and clk 1: exactly one"),
    (f"1,{TS},11,999_1007,1,0", r"column 'pid': unknown placement \(pid\) '999_1007'"),
    (f"1,{TS},11.5,430548_1007,1,0", "column 'adgroup_id': '11.5' is not an integer"),
], ids=["click-outside-0-1", "click-and-no-click", "unknown-pid", "fractional-id"])
def test_a_bad_impression_is_refused_naming_file_and_line(tmp_path, bad, message):
    taobao_ad_files(tmp_path / "files")
    path = tmp_path / "files" / "raw_sample.csv"
    path.write_text("\n".join([RAW_HEADER, RAW_ROW, bad, RAW_ROW]) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 3: {message}"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=SMALL)


def test_an_ad_listed_twice_in_ad_feature_is_refused_naming_both_lines(tmp_path):
    taobao_ad_files(tmp_path / "files")
    path = tmp_path / "files" / "ad_feature.csv"
    path.write_text(path.read_text() + "12,501,7001,90,3001,1.0\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 10: adgroup_id 12 repeats line 3"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=SMALL)


def test_files_are_recognised_by_header_and_unknown_or_empty_ones_refused(tmp_path):
    taobao_ad_files(tmp_path / "files")
    (tmp_path / "files" / "behavior_log.csv").rename(tmp_path / "files" / "part-3.csv")  # name is not what counts
    import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=SMALL)
    empty = tmp_path / "files" / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: empty file"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "x", options=SMALL)
    empty.write_text("user,time_stamp,adgroup_id,pid,nonclk,clk\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: no data rows after its header"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "x", options=SMALL)
    empty.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: line 1: header 'a,b,c' is none of taobao-ad's"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "x", options=SMALL)
    empty.unlink()
    with pytest.raises(DataError, match="raw_sample.csv without ad_feature.csv"):
        import_world("taobao-ad", [tmp_path / "files" / n for n in ("part-3.csv", "raw_sample.csv")],
                     tmp_path / "x", options=SMALL)
    (tmp_path / "files" / "part-3.csv").unlink()
    with pytest.raises(DataError, match="no behavior_log.csv among the inputs"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "x", options=SMALL)
    assert not (tmp_path / "x").exists()


def test_a_profile_code_beyond_its_column_type_is_refused(tmp_path):
    taobao_ad_files(tmp_path / "files")
    path = tmp_path / "files" / "user_profile.csv"
    path.write_text(path.read_text() + "77,1,1,1,200,1,1,1,1\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 42: column 'age_level': 200 is beyond"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "w", options=SMALL)


def test_a_header_where_none_belongs_is_refused(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,1511544070\n")
    with pytest.raises(DataError,
                       match=rf"{re.escape(str(path))}: line 1: .* looks like a header, but UserBehavior has none"):
        import_world("taobao-behavior", [path], tmp_path / "w")


def test_options_and_inputs_are_checked_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"--sample-users must be a fraction in \(0, 1\], got 1.5"):
        import_world("movielens", [tmp_path], tmp_path / "w", options=ImportOptions(sample_users=1.5))
    with pytest.raises(ValueError, match="--from-day: day '2017-5-1' is not of the form YYYY-MM-DD"):
        import_world("movielens", [tmp_path], tmp_path / "w", options=ImportOptions(from_day="2017-5-1"))
    with pytest.raises(ValueError, match="unknown import format 'csv'"):
        import_world("csv", [tmp_path], tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        import_world("movielens", [tmp_path / "nothing"], tmp_path / "w")
    (tmp_path / "u.data").write_text("1\t2\t5\t881250949\n")
    with pytest.raises(ValueError, match="named twice"):
        import_world("movielens", [tmp_path / "u.data", tmp_path / "u.data"], tmp_path / "w")


# -- the other formats, on small fixtures ------------------------------------------------------

def test_movielens_layouts_are_told_apart_by_content_and_ratings_become_actions(tmp_path):
    ratings = [(1, 10, 5, 881250949), (1, 11, 3, 881250950), (2, 10, 1, 881250951), (2, 12, 4, 881337349),
               (1, 12, 2, 881337350), (3, 11, 4, 881423749), (3, 10, 3, 881510149)]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    (tmp_path / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    worlds = []
    for name in ("u.data", "ratings.dat", "ml.inter"):
        report = import_world("movielens", [tmp_path / name], tmp_path / f"w-{name}")
        eng = _table(tmp_path / f"w-{name}", "engagements").sort_values("ts")
        assert eng.action.tolist() == [3, 2, 5, 3, 5, 3, 2] and eng.ts.tolist() == [r[3] for r in ratings]
        assert report["rows"]["users"] == 3 and report["rows"]["pins"] == 3
        worlds.append(eng[["user_id", "pin_id", "ts", "action"]].values.tolist())
    assert worlds[0] == worlds[1] == worlds[2]
    (tmp_path / "bad.dat").write_text("1::10::5::881250949\n1::10:5::881250949\n")
    with pytest.raises(DataError, match=r"bad.dat: line 2: expected 7 columns, found 6"):
        import_world("movielens", [tmp_path / "bad.dat"], tmp_path / "x")
    (tmp_path / "bad.csv").write_text("user,item,rating,time\n1,10,5,881250949\n")
    with pytest.raises(DataError, match=r"bad.csv: line 1: 'user,item,rating,time' is neither a u.data row"):
        import_world("movielens", [tmp_path / "bad.csv"], tmp_path / "x")
    (tmp_path / "bad.data").write_text("1\t10\t5\t881250949\n1\t10\tgood\t881250949\n")
    with pytest.raises(DataError, match=r"bad.data: line 2: column 'rating': unknown rating 'good'"):
        import_world("movielens", [tmp_path / "bad.data"], tmp_path / "x")


def test_a_day_without_events_is_written_empty_reported_and_read_across(tmp_path):
    """A day inside the data's range with no rows becomes a zero-row partition marked as a day
    without events, named in the report and the summary; readers take it, and the split counts
    it as a day. A missing partition (a day lost after the import) is still refused."""
    from derl.datapipes.importers import summary
    from derl.datapipes.readers import ExampleReader, ReaderConfig
    from derl.datapipes.splits import default_split

    day = 86400
    rows = [(1, 10, 4, 10 * day + 5), (1, 11, 4, 11 * day), (2, 10, 4, 13 * day), (2, 11, 4, 14 * day)]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    report = import_world("movielens", [tmp_path / "u.data"], tmp_path / "w")
    assert report["days_without_events"] == {"engagements": ["1970-01-13"]}
    assert report["rows"]["engagements"] == 4 and not report["dropped"]
    assert "engagements: 1 day without events: 1970-01-13" in summary(report)
    assert json.loads((tmp_path / "w" / WORLD_META).read_text())["days_without_events"] == \
        report["days_without_events"]
    sources = SourceTables(tmp_path / "w")
    days = [f"1970-01-{d}" for d in range(11, 16)]
    assert sources.days("engagements") == sources.days("user_sequences") == days
    files = dict(sources.files("engagements"))
    empty = files["1970-01-13"]
    assert pq.read_schema(empty).remove_metadata() == pq.read_schema(files["1970-01-14"]).remove_metadata()
    assert sources.read("engagements", ("1970-01-13", "1970-01-13")).num_rows == 0
    assert sources.read("user_sequences", ("1970-01-13", "1970-01-13")).num_rows == 0
    reader = ExampleReader(tmp_path / "w", "engagements", config=ReaderConfig(batch_size=1, prefetch=0))
    assert sum(b.size for b in reader) == 4
    assert default_split(sources.days("engagements")).cut_day == "1970-01-13"
    # A day lost after the import is a broken world, as before.
    shutil.rmtree(empty.parent)
    with pytest.raises(DataError, match=r"engagements: no partition for 1970-01-13, between the table's first"):
        SourceTables(tmp_path / "w").days("engagements")
    # --from-day / --until still choose the days.
    report = import_world("movielens", [tmp_path / "u.data"], tmp_path / "w2",
                          options=ImportOptions(from_day="1970-01-14"))
    assert report["rows"]["engagements"] == 2 and report["dropped"]["outside_day_range"] == {"u.data": 2}
    assert "days_without_events" not in report


def test_seq_lines_times_keep_each_users_order_and_put_the_last_item_on_the_last_day(tmp_path):
    lines = {1: [5], 2: [6, 7], 3: [8, 9, 10], 4: list(range(20, 45)), 5: [5, 6, 7, 8, 9, 10, 11, 12]}
    path = tmp_path / "seq.txt"
    path.write_text("".join(f"{u} {' '.join(map(str, items))}\n" for u, items in lines.items()) + "6\n")
    report = import_world("seq-lines", [path], tmp_path / "w", options=ImportOptions(days=8))
    assert report["dropped"]["line_without_items"] == {"seq-lines": 1}
    users, pins = _table(tmp_path / "w", "users"), _table(tmp_path / "w", "pins")
    eng = _table(tmp_path / "w", "engagements").sort_values("ts", kind="stable")
    days = sorted(eng.ds.unique())
    assert days == [f"2000-01-0{d}" for d in range(1, 9)]
    for u, items in lines.items():
        mine = eng[eng.user_id.map(users.source_user_id) == u]
        assert mine.pin_id.map(pins.source_item_id).tolist() == items  # in order, by time
        assert mine.ts.is_monotonic_increasing and mine.ts.is_unique
        assert mine.ds.iloc[-1] == days[-1]
        if len(items) >= 2:
            assert mine.ds.iloc[-2] == days[-2]
        if len(items) > 2:  # the earlier items cover days 1..6 evenly, from the first
            assert set(mine.ds.iloc[:-2]) <= set(days[:-2]) and mine.ds.iloc[0] == days[0]
    np.testing.assert_array_equal(item_days(np.arange(8), np.full(8, 8), 8), [0, 1, 2, 3, 4, 5, 6, 7])
    assert json.loads((tmp_path / "w" / WORLD_META).read_text())["clock"] == "synthesized"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n2 4 x5\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: line 2: 'x5' is not an id"):
        import_world("seq-lines", [bad], tmp_path / "x")
    bad.write_text("1 2 3\n2 4 5\n1 6\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: line 3: user 1 repeats line 1"):
        import_world("seq-lines", [bad], tmp_path / "x")


@pytest.mark.slow
def test_derl_import_writes_a_world_and_prints_a_summary(tmp_path):
    taobao_ad_files(tmp_path / "files")
    proc = derl("import", "taobao-ad", "--input", str(tmp_path / "files"), "--out", str(tmp_path / "w"),
                "--sample-users", "0.8", "--seed", "3")
    assert "engagements" in proc.stdout and "dropped sampled_out" in proc.stdout
    assert json.loads((tmp_path / "w" / WORLD_META).read_text())["seed"] == 3
    proc = derl("import", "taobao-ad", "--input", str(tmp_path / "files"), "--out", str(tmp_path / "w"), check=False)
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    inspect = derl("inspect", str(tmp_path / "w"))
    assert "ad_events" in inspect.stdout
