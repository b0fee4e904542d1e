"""The synthetic Ali_Display_Ad_Click files (datapipes/importers/taobao_files.py): the real headers and
layouts, values in the real ranges, the days in their windows, the real proportions, the
coverage the importer's tests rely on, a learnable click signal, and determinism."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from derl.datapipes.importers import taobao_files as tf

CHINA = dt.timezone(dt.timedelta(hours=8))


def _read(path) -> pa.Table:
    """A file as strings, the header as written (trailing space kept)."""
    with open(path) as f:
        names = f.readline().rstrip("\n").split(",")
    return pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                          convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                               strings_can_be_null=False))


def _ints(t: pa.Table, name: str) -> np.ndarray:
    return np.asarray(t[name].to_numpy(zero_copy_only=False).astype(np.int64))


def _china_days(ts: np.ndarray) -> set:
    days = (ts + 8 * 3600) // 86400
    return {dt.date(1970, 1, 1) + dt.timedelta(days=int(d)) for d in np.unique(days)}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taobao") / "small"
    written = tf.write_taobao_ad_files(folder, 200_000, seed=0)
    return written, {name: _read(p) for name, p in written["paths"].items()}


def test_headers_are_the_real_ones_byte_for_byte(small):
    written, _ = small
    expected = {
        "raw_sample.csv": "user,time_stamp,adgroup_id,pid,nonclk,clk\n",
        "behavior_log.csv": "user,time_stamp,btag,cate,brand\n",
        "ad_feature.csv": "adgroup_id,cate_id,campaign_id,customer,brand,price\n",
        "user_profile.csv": ("userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
                             "shopping_level,occupation,new_user_class_level \n"),
    }
    for name, path in written["paths"].items():
        with open(path, "rb") as f:
            assert f.readline().decode() == expected[path.rsplit("/", 1)[-1]]


def test_every_line_has_the_header_s_column_count_and_no_quotes(small):
    written, tables = small
    for name, path in written["paths"].items():
        with open(path) as f:
            lines = f.read().splitlines()
        width = lines[0].count(",")
        assert all(line.count(",") == width for line in lines[1:]), name
        assert '"' not in "".join(lines), name
        assert len(lines) - 1 == written["rows"][name] == tables[name].num_rows


def test_values_are_in_the_real_ranges(small):
    _, t = small
    raw, beh, ads, prof = t["raw_sample"], t["behavior_log"], t["ad_feature"], t["user_profile"]
    assert set(raw["pid"].to_pylist()) == {"430548_1007", "430539_1007"}
    clk, nonclk = _ints(raw, "clk"), _ints(raw, "nonclk")
    assert set(np.unique(clk)) == {0, 1} and (nonclk == 1 - clk).all()
    assert 0.04 < clk.mean() < 0.06
    btag = np.asarray(beh["btag"].to_pylist())
    share = {b: (btag == b).mean() for b in tf.BTAGS}
    assert set(np.unique(btag)) == set(tf.BTAGS)
    assert 0.9 < share["pv"] < 0.95 and all(0.005 < share[b] < 0.05 for b in ("cart", "fav", "buy"))
    for table, cols in ((raw, ("user", "time_stamp", "adgroup_id")), (beh, ("user", "time_stamp", "cate", "brand")),
                        (ads, ("adgroup_id", "cate_id", "campaign_id", "customer"))):
        assert all((_ints(table, c) > 0).all() for c in cols)
    brand = np.asarray(ads["brand"].to_pylist())
    assert 0 < (brand == "NULL").sum() < 0.2 * len(brand)  # a few, as in the real file
    assert all(b.isdigit() for b in brand[brand != "NULL"])
    price = np.asarray(ads["price"].to_pylist(), dtype=float)
    assert (price > 0).all() and all("." in p for p in ads["price"].to_pylist())
    assert len(set(ads["adgroup_id"].to_pylist())) == ads.num_rows
    ranges = {"cms_segid": (0, 96), "cms_group_id": (0, 12), "final_gender_code": (1, 2), "age_level": (0, 6),
              "pvalue_level": (1, 3), "shopping_level": (1, 3), "occupation": (0, 1),
              "new_user_class_level ": (1, 4)}
    for name, (lo, hi) in ranges.items():
        col = np.asarray(prof[name].to_pylist())
        filled = col[col != ""].astype(int)
        assert lo <= filled.min() and filled.max() <= hi, name
        empty = (col == "").mean()
        if name in ("pvalue_level", "new_user_class_level "):
            assert 0.01 < empty < 0.3, name  # sometimes empty, as in the real file
        else:
            assert empty == 0, name
    assert len(set(prof["userid"].to_pylist())) == prof.num_rows


def test_days_fill_their_windows_in_china_time(small):
    _, t = small
    imp_days = _china_days(_ints(t["raw_sample"], "time_stamp"))
    beh_days = _china_days(_ints(t["behavior_log"], "time_stamp"))
    assert imp_days == {dt.date(2017, 5, 6) + dt.timedelta(days=i) for i in range(8)}
    assert beh_days == {dt.date(2017, 4, 22) + dt.timedelta(days=i) for i in range(22)}


def test_every_day_and_user_is_covered_even_in_a_tiny_set(tmp_path):
    w = tf.write_taobao_ad_files(tmp_path, 3000, seed=1, users=50)
    beh, raw = _read(w["paths"]["behavior_log"]), _read(w["paths"]["raw_sample"])
    assert len(_china_days(_ints(beh, "time_stamp"))) == 22
    assert len(_china_days(_ints(raw, "time_stamp"))) == 8
    assert len(np.unique(_ints(beh, "user"))) == 50


def test_sizes_follow_the_real_proportions_with_floors(small):
    written, t = small
    assert written["rows"]["raw_sample"] == round(200_000 * 26_557_961 / 723_268_134)
    assert written["sizes"]["users"] == 2000  # the floor; the real ratio would give 316
    big = tf.sizes(20_000_000)
    assert big["users"] == round(20_000_000 * 1_141_729 / 723_268_134)
    assert big["ads"] == round(big["impression_rows"] * 846_811 / 26_557_961)
    assert big["categories"] > 100 and big["brands"] > big["categories"]


def test_references_resolve_but_a_handful_of_users_lack_a_profile(small):
    written, t = small
    raw_users = set(_ints(t["raw_sample"], "user"))
    profiled = set(_ints(t["user_profile"], "userid"))
    missing = raw_users - profiled
    assert missing == set(written["missing_profiles"]) and 3 <= len(missing) <= 0.01 * len(raw_users)
    assert set(_ints(t["raw_sample"], "adgroup_id")) <= set(_ints(t["ad_feature"], "adgroup_id"))
    assert set(_ints(t["behavior_log"], "user")) <= profiled | missing
    # The ads share the behaviour log's categories and brands.
    assert set(_ints(t["ad_feature"], "cate_id")) <= set(_ints(t["behavior_log"], "cate"))


def test_organic_preferences_predict_clicks(small):
    """Users concentrate on a few categories, and an ad of a user's top organic categories is
    clicked more often than another: the signal a downstream model can learn."""
    _, t = small
    beh, raw, ads = t["behavior_log"], t["raw_sample"], t["ad_feature"]
    user, cate = _ints(beh, "user"), _ints(beh, "cate")
    pairs, counts = np.unique(np.stack([user, cate]), axis=1, return_counts=True)
    order = np.lexsort((-counts, pairs[0]))
    pairs, counts = pairs[:, order], counts[order]
    rank = np.arange(len(counts)) - np.searchsorted(pairs[0], pairs[0])
    top = {(int(u), int(c)) for u, c, r in zip(pairs[0], pairs[1], rank) if r < 4}
    per_user = np.bincount(np.unique(user, return_inverse=True)[1])
    top_share = counts[rank < 4].sum() / counts.sum()
    assert top_share > 0.6 and per_user.mean() > 50  # most events in a user's top 4 categories
    ad_cate = dict(zip(_ints(ads, "adgroup_id").tolist(), _ints(ads, "cate_id").tolist()))
    match = np.array([(int(u), ad_cate[int(a)]) in top for u, a in
                      zip(_ints(raw, "user"), _ints(raw, "adgroup_id"))])
    clk = _ints(raw, "clk")
    assert 0.3 < match.mean() < 0.8
    assert clk[match].mean() > 2 * clk[~match].mean()


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    def digest(folder, seed):
        w = tf.write_taobao_ad_files(folder, 20_000, seed=seed, block_rows=7_000)
        return {n: hashlib.sha256(open(p, "rb").read()).hexdigest() for n, p in w["paths"].items()}

    a, b, c = digest(tmp_path / "a", 3), digest(tmp_path / "b", 3), digest(tmp_path / "c", 4)
    assert a == b
    assert all(a[n] != c[n] for n in a)


@pytest.mark.slow
def test_the_import_benchmark_measures_each_size_and_states_the_memory_verdict(tmp_path):
    """benchmarks/import_bench.py end to end on two tiny sets (two `derl import` processes)."""
    import json

    from derl.benchmarks import import_bench

    result = import_bench.run(["--out", str(tmp_path), "--sizes", "20000,40000", "--users", "200",
                               "--work", str(tmp_path / "work")])
    assert not result["errors"]
    data = json.loads((tmp_path / "import.json").read_text())
    rows = data["rows"]
    assert [r["behaviour_rows"] for r in rows] == [20000, 40000] and all(r["users"] == 200 for r in rows)
    for r, d in zip(rows, data["detail"]):
        assert r["peak_rss_mb"] > 100 and r["import_s"] > 0 and r["rows_per_s"] > r["behaviour_rows_per_s"]
        assert d["out_tables"]["engagements"] == r["behaviour_rows"]
        assert d["out_tables"]["ad_events"] == r["impression_rows"]
    assert set(data["meta"]["memory"]) == {"rows_ratio", "users_ratio", "peak_rss_ratio", "rss_grows_with_rows"}
    md = (tmp_path / "import.md").read_text()
    assert "## Memory" in md and "Peak RSS grew" in md and md.count("| 20000 |") == 1
    assert not (tmp_path / "work" / "taobao-20000").exists()  # removed without --keep
