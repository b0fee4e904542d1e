"""Synthetic files in the layout of Alibaba's Ali_Display_Ad_Click logs (Tianchi), for the
`taobao-ad` importer's benchmark and for tests that run the stack on an imported world.

    write_taobao_ad_files(folder, behaviour_rows, seed=0, users=None, ...) -> dict

The four files, each with the real header line (user_profile.csv's last name keeps the real
file's trailing space):
- raw_sample.csv    `user,time_stamp,adgroup_id,pid,nonclk,clk`: ad impressions over the 8 days
                    2017-05-06..05-13 (China time, UTC+8), pid `430548_1007` or `430539_1007`,
                    clk in {0, 1}, nonclk = 1 - clk, CTR about 5 %;
- behavior_log.csv  `user,time_stamp,btag,cate,brand`: organic events over the 22 days
                    2017-04-22..05-13, btag pv / cart / fav / buy (92.5 / 3.5 / 2.5 / 1.5 %);
- ad_feature.csv    `adgroup_id,cate_id,campaign_id,customer,brand,price`: brand is the literal
                    `NULL` for a few ads (`null_brand_share`), price with one decimal;
- user_profile.csv  `userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,
                    shopping_level,occupation,new_user_class_level `: pvalue_level and
                    new_user_class_level are empty for some users (`empty_pvalue_share`,
                    `empty_city_share`).
Timestamps are Unix seconds; ids are drawn without replacement from the real files' id ranges
(so they are sparse, as the real ones are); rows are in no particular order.

Sizes follow the real proportions: impressions = behaviour rows x 26.56M / 723.3M; users =
behaviour rows x 1.14M / 723.3M, categories and brands in proportion to users, ads in
proportion to impressions (846.8K : 26.56M), each with a floor so that a small set still makes
sense (at least 2,000 users for 200K rows, 100 categories, 3 ads per category).

The data has a structure a model can learn. Categories have Zipf-like popularity; every brand
belongs to one category. Each user prefers 4 categories (drawn by popularity, weights from a
Dirichlet) and one brand within each. A behaviour event is, with probability 0.8, in one of the
user's preferred categories (chosen by the user's weights; then with probability 0.6 the
preferred brand, else a brand of the category, popular ones first), otherwise in a random
category by popularity. Users' activity is log-normal (heavy users have more events and more
impressions). An impression shows, with probability 0.5, an ad of one of the user's preferred
categories, otherwise an ad drawn by ad popularity. A click's logit is
    b0 + 1.4 [ad category preferred] + 0.9 [ad brand preferred] + pid effect + user bias + ad bias,
b0 calibrated on a sample so that the CTR is `ctr` (0.05). So the organic log predicts clicks.

Coverage, guaranteed for any size with enough rows: every one of the 22 behaviour days and the
8 impression days has rows, every user has at least one behaviour event, every adgroup in
raw_sample is in ad_feature, and every user in raw_sample has a profile except a handful
(`missing_profiles`, at least 3, 0.5 % of users) that deliberately have none: in the real data
about 1.06M of 1.14M users have a profile.

Everything is drawn with numpy in blocks of `block_rows` and written with pyarrow's CSV writer;
the output is a function of the arguments alone (seed included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

# The real files' headers, byte for byte (user_profile's trailing space included).
HEADERS = {
    "raw_sample": "user,time_stamp,adgroup_id,pid,nonclk,clk",
    "behavior_log": "user,time_stamp,btag,cate,brand",
    "ad_feature": "adgroup_id,cate_id,campaign_id,customer,brand,price",
    "user_profile": ("userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
                     "shopping_level,occupation,new_user_class_level "),
}
FILES = {name: f"{name}.csv" for name in HEADERS}

# The real data's sizes (rows and distinct ids).
REAL_BEHAVIOUR_ROWS = 723_268_134
REAL_IMPRESSION_ROWS = 26_557_961
REAL_USERS = 1_141_729
REAL_ADS = 846_811
REAL_CATEGORIES = 12_968
REAL_BRANDS = 460_561
REAL_CAMPAIGNS = 423_436
REAL_CUSTOMERS = 255_875

# China time, UTC+8: 2017-04-22 00:00 and 2017-05-06 00:00.
BEHAVIOUR_START = 1_492_790_400
BEHAVIOUR_DAYS = 22
IMPRESSION_START = 1_494_000_000
IMPRESSION_DAYS = 8
DAY_S = 86_400

BTAGS = ("pv", "cart", "fav", "buy")
BTAG_SHARES = (0.925, 0.035, 0.025, 0.015)
PIDS = ("430548_1007", "430539_1007")
PID_SHARES = (0.6, 0.4)
PID_EFFECT = np.array([0.0, -0.2])
# Share of events per hour of the (China) day: quiet at night, peaks after work and late evening.
HOUR_WEIGHTS = np.array([3, 1.5, 0.8, 0.5, 0.4, 0.5, 1, 2, 3, 4, 4.5, 4.5,
                         4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 4.5, 5, 6, 6.5, 6, 4.5])

SLOTS = 4  # preferred categories per user
ORGANIC_IN_PREFERRED = 0.8
ORGANIC_PREFERRED_BRAND = 0.6
ADS_TARGETED = 0.5
CLICK_CATEGORY = 1.4
CLICK_BRAND = 0.9


def _cum(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _draw(rng: np.random.Generator, cum: np.ndarray, size: int) -> np.ndarray:
    """Indices drawn with the probabilities whose cumulative sum is `cum` (ends in 1)."""
    return np.minimum(np.searchsorted(cum, rng.random(size), side="right"), len(cum) - 1)


def _ids(rng: np.random.Generator, n: int, real_max: int) -> np.ndarray:
    """n distinct ids in 1..max(real_max, n), ascending: sparse, as the real files' are."""
    return np.sort(rng.choice(max(real_max, n), size=n, replace=False) + 1).astype(np.int64)


def _zipf(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """Zipf-like popularity weights over n items, in a random order of the items."""
    return rng.permutation(1.0 / np.arange(1, n + 1) ** a)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def sizes(behaviour_rows: int, users: Optional[int] = None, impression_rows: Optional[int] = None,
          ads: Optional[int] = None) -> Dict[str, int]:
    """The set's sizes: the real proportions to the behaviour rows, with floors (module doc)."""
    n_imp = impression_rows if impression_rows is not None else max(
        IMPRESSION_DAYS, round(behaviour_rows * REAL_IMPRESSION_ROWS / REAL_BEHAVIOUR_ROWS))
    n_users = users or max(round(behaviour_rows * REAL_USERS / REAL_BEHAVIOUR_ROWS),
                           min(2000, max(10, behaviour_rows // 100)))
    n_cates = max(min(100, max(5, n_users // 10)), round(n_users * REAL_CATEGORIES / REAL_USERS))
    n_brands = max(2 * n_cates, round(n_users * REAL_BRANDS / REAL_USERS))
    n_ads = ads or max(round(n_imp * REAL_ADS / REAL_IMPRESSION_ROWS), min(3 * n_cates, max(1, n_imp // 4)))
    return {"behaviour_rows": int(behaviour_rows), "impression_rows": int(n_imp), "users": int(n_users),
            "categories": int(n_cates), "brands": int(n_brands), "ads": int(n_ads)}


class _Universe:
    """Categories, brands, ads and users with their preferences: the static part of the set."""

    def __init__(self, rng: np.random.Generator, sz: Dict[str, int], null_brand_share: float):
        n_users, n_cates, n_brands, n_ads = sz["users"], sz["categories"], sz["brands"], sz["ads"]
        self.user_id = _ids(rng, n_users, REAL_USERS)
        self.cate_id = _ids(rng, n_cates, REAL_CATEGORIES)
        self.brand_id = _ids(rng, n_brands, REAL_BRANDS)
        self.adgroup_id = _ids(rng, n_ads, REAL_ADS)
        self.cate_cum = _cum(_zipf(rng, n_cates, 1.0))
        # Brands: one per category first (none is empty), the rest by category popularity; then
        # grouped by category, popular ones (an index skew in `brand_of`) first within each.
        brand_cate = np.concatenate([np.arange(n_cates), _draw(rng, self.cate_cum, n_brands - n_cates)])
        order = np.argsort(brand_cate, kind="stable")
        self.brand_by_cate = rng.permutation(n_brands)[order]  # brand indices grouped by category
        self.brand_count = np.bincount(brand_cate, minlength=n_cates)
        self.brand_start = np.concatenate([[0], np.cumsum(self.brand_count)[:-1]])
        # Ads: a category by popularity, a brand of it (NULL for a few), campaigns and customers.
        self.ad_cate = _draw(rng, self.cate_cum, n_ads)
        self.ad_brand = self.brand_of(rng, self.ad_cate)
        self.ad_brand_null = rng.random(n_ads) < null_brand_share
        self.ad_cum = _cum(_zipf(rng, n_ads, 0.8))
        ad_order = np.argsort(self.ad_cate, kind="stable")
        self.ad_by_cate = ad_order
        self.ad_count = np.bincount(self.ad_cate, minlength=n_cates)
        self.ad_start = np.concatenate([[0], np.cumsum(self.ad_count)[:-1]])
        self.ad_bias = rng.normal(0.0, 0.3, n_ads)
        # Users: log-normal activity, SLOTS preferred categories (by popularity) with Dirichlet
        # weights, heaviest first, and one preferred brand in each.
        self.activity = rng.lognormal(0.0, 1.0, n_users)
        self.activity_cum = _cum(self.activity)
        self.pref_cate = _draw(rng, self.cate_cum, n_users * SLOTS).reshape(n_users, SLOTS)
        w = -np.sort(-rng.dirichlet(np.full(SLOTS, 0.7), n_users), axis=1)
        self.pref_cum = np.cumsum(w, axis=1)
        self.pref_cum[:, -1] = 1.0
        self.pref_brand = self.brand_of(rng, self.pref_cate.ravel()).reshape(n_users, SLOTS)
        self.user_bias = rng.normal(0.0, 0.5, n_users)

    def brand_of(self, rng: np.random.Generator, cate: np.ndarray) -> np.ndarray:
        """A brand of each category, the category's first (popular) brands more often."""
        k = np.floor(self.brand_count[cate] * rng.random(len(cate)) ** 2).astype(np.int64)
        return self.brand_by_cate[self.brand_start[cate] + k]

    def slot(self, rng: np.random.Generator, user: np.ndarray) -> np.ndarray:
        """One of each user's preferred slots, by the user's weights."""
        return (rng.random(len(user))[:, None] > self.pref_cum[user]).sum(axis=1).clip(max=SLOTS - 1)

    def impressions(self, rng: np.random.Generator, n: int):
        """n impressions' users, ads, pids and click logits without b0."""
        user = _draw(rng, self.activity_cum, n)
        ad = _draw(rng, self.ad_cum, n)
        cate = self.pref_cate[user, self.slot(rng, user)]
        targeted = (rng.random(n) < ADS_TARGETED) & (self.ad_count[cate] > 0)
        k = np.floor(rng.random(n) * self.ad_count[cate]).astype(np.int64)
        ad = np.where(targeted, self.ad_by_cate[np.minimum(self.ad_start[cate] + k, len(self.ad_cate) - 1)], ad)
        pid = _draw(rng, _cum(np.array(PID_SHARES)), n)
        cat_match = (self.pref_cate[user] == self.ad_cate[ad][:, None]).any(axis=1)
        brand_match = ~self.ad_brand_null[ad] & (self.pref_brand[user] == self.ad_brand[ad][:, None]).any(axis=1)
        logit = (CLICK_CATEGORY * cat_match + CLICK_BRAND * brand_match + PID_EFFECT[pid]
                 + self.user_bias[user] + self.ad_bias[ad])
        return user, ad, pid, logit


def _timestamps(rng: np.random.Generator, start: int, day: np.ndarray) -> np.ndarray:
    hour = _draw(rng, _cum(HOUR_WEIGHTS), len(day))
    return start + day * DAY_S + hour * 3600 + rng.integers(0, 3600, len(day))


def _calibrate(u: _Universe, rng: np.random.Generator, ctr: float, n: int = 200_000) -> float:
    """b0 such that the mean click probability of n drawn impressions is `ctr` (bisection)."""
    logit = u.impressions(rng, n)[3]
    lo, hi = -20.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(mid + logit).mean() < ctr else (lo, mid)
    return (lo + hi) / 2


class _Csv:
    """One CSV file: the header line as given, then pyarrow-written blocks (no quotes; nulls
    as empty fields)."""

    def __init__(self, path: Path, header: str, schema: pa.Schema):
        self.schema = schema
        self.f = open(path, "wb")
        self.f.write((header + "\n").encode())
        self.w = pacsv.CSVWriter(self.f, schema, write_options=pacsv.WriteOptions(
            include_header=False, quoting_style="none", batch_size=65_536))
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.w.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self.w.close()
        self.f.close()


def _strings(values, index: np.ndarray) -> pa.Array:
    """index into `values`, as a plain string column (through a dictionary: no Python loop)."""
    return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), pa.array(list(values))).cast(pa.string())


def _cover(g: np.ndarray, column: np.ndarray, n: int) -> None:
    """Rows whose global index g is below n take the value g: every value in 0..n-1 occurs."""
    first = g < n
    column[first] = g[first]


def write_taobao_ad_files(folder, behaviour_rows: int, seed: int = 0, users: Optional[int] = None,
                          impression_rows: Optional[int] = None, ads: Optional[int] = None,
                          ctr: float = 0.05, null_brand_share: float = 0.05,
                          empty_pvalue_share: float = 0.1, empty_city_share: float = 0.05,
                          missing_profile_share: float = 0.005, block_rows: int = 2_000_000,
                          progress=None) -> dict:
    """Write raw_sample.csv, behavior_log.csv, ad_feature.csv and user_profile.csv into `folder`
    (module doc); return {folder, paths, rows (per file), sizes, ctr (the drawn one),
    missing_profiles (user ids in raw_sample without a profile), seconds}. `progress`, if
    given, is called with a line of text after each block."""
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: None)
    sz = sizes(behaviour_rows, users, impression_rows, ads)
    rng = np.random.default_rng([seed, 0])
    u = _Universe(rng, sz, null_brand_share)
    b0 = _calibrate(u, np.random.default_rng([seed, 1]), ctr)
    paths = {name: folder / f for name, f in FILES.items()}
    i64 = pa.int64()

    # behavior_log.csv, block by block (stream [seed, 2, block]).
    out = _Csv(paths["behavior_log"], HEADERS["behavior_log"], pa.schema(
        [("user", i64), ("time_stamp", i64), ("btag", pa.string()), ("cate", i64), ("brand", i64)]))
    btag_cum = _cum(np.array(BTAG_SHARES))
    for b, start in enumerate(range(0, behaviour_rows, block_rows)):
        r = np.random.default_rng([seed, 2, b])
        n = min(block_rows, behaviour_rows - start)
        g = np.arange(start, start + n)
        user = _draw(r, u.activity_cum, n)
        _cover(g, user, sz["users"])
        slot = u.slot(r, user)
        preferred = r.random(n) < ORGANIC_IN_PREFERRED
        cate = np.where(preferred, u.pref_cate[user, slot], _draw(r, u.cate_cum, n))
        brand = np.where(preferred & (r.random(n) < ORGANIC_PREFERRED_BRAND), u.pref_brand[user, slot],
                         u.brand_of(r, cate))
        day = r.integers(0, BEHAVIOUR_DAYS, n)
        _cover(g, day, BEHAVIOUR_DAYS)
        order = r.permutation(n) if start == 0 else slice(None)  # the covering rows, scattered
        out.write(pa.table([u.user_id[user][order], _timestamps(r, BEHAVIOUR_START, day)[order],
                            _strings(BTAGS, _draw(r, btag_cum, n)[order]), u.cate_id[cate][order],
                            u.brand_id[brand][order]], schema=out.schema))
        say(f"behavior_log.csv: {out.rows:,} / {behaviour_rows:,} rows")
    out.close()

    # raw_sample.csv (stream [seed, 3, block]); the users seen, for their profiles.
    n_imp = sz["impression_rows"]
    out = _Csv(paths["raw_sample"], HEADERS["raw_sample"], pa.schema(
        [("user", i64), ("time_stamp", i64), ("adgroup_id", i64), ("pid", pa.string()),
         ("nonclk", i64), ("clk", i64)]))
    seen = np.zeros(sz["users"], dtype=bool)
    clicks = 0
    for b, start in enumerate(range(0, n_imp, block_rows)):
        r = np.random.default_rng([seed, 3, b])
        n = min(block_rows, n_imp - start)
        user, ad, pid, logit = u.impressions(r, n)
        clk = (r.random(n) < _sigmoid(b0 + logit)).astype(np.int64)
        day = r.integers(0, IMPRESSION_DAYS, n)
        _cover(np.arange(start, start + n), day, IMPRESSION_DAYS)
        order = r.permutation(n) if start == 0 else slice(None)
        seen[user] = True
        clicks += int(clk.sum())
        out.write(pa.table([u.user_id[user][order], _timestamps(r, IMPRESSION_START, day)[order],
                            u.adgroup_id[ad][order], _strings(PIDS, pid[order]), (1 - clk)[order], clk[order]],
                           schema=out.schema))
        say(f"raw_sample.csv: {out.rows:,} / {n_imp:,} rows")
    out.close()

    # ad_feature.csv: every ad (those of raw_sample among them).
    r = np.random.default_rng([seed, 4])
    n_ads = sz["ads"]
    campaign_ids = _ids(r, max(1, round(n_ads * REAL_CAMPAIGNS / REAL_ADS)), REAL_CAMPAIGNS)
    customer_ids = _ids(r, max(1, round(len(campaign_ids) * REAL_CUSTOMERS / REAL_CAMPAIGNS)), REAL_CUSTOMERS)
    campaign = r.integers(0, len(campaign_ids), n_ads)
    campaign_customer = r.integers(0, len(customer_ids), len(campaign_ids))
    brand = np.where(u.ad_brand_null, "NULL", u.brand_id[u.ad_brand].astype(str))
    price = np.char.mod("%.1f", np.round(r.lognormal(5.0, 1.3, n_ads), 1))
    ad_table = pa.table({"adgroup_id": u.adgroup_id, "cate_id": u.cate_id[u.ad_cate],
                         "campaign_id": campaign_ids[campaign], "customer": customer_ids[campaign_customer[campaign]],
                         "brand": pa.array(brand.tolist()), "price": pa.array(price.tolist())})
    out = _Csv(paths["ad_feature"], HEADERS["ad_feature"], ad_table.schema)
    out.write(ad_table.take(pa.array(r.permutation(n_ads))))
    out.close()

    # user_profile.csv: every user but a handful of those in raw_sample.
    r = np.random.default_rng([seed, 5])
    n_users = sz["users"]
    in_sample = np.flatnonzero(seen)
    n_missing = min(len(in_sample), max(3, round(n_users * missing_profile_share)))
    missing = np.sort(r.choice(in_sample, size=n_missing, replace=False)) if n_missing else np.array([], int)
    keep = np.setdiff1d(np.arange(n_users), missing)
    n = len(keep)
    gender = 1 + (r.random(n) < 0.65).astype(np.int64)  # 1 male, 2 female
    age = _draw(r, _cum(np.array([0.01, 0.05, 0.25, 0.33, 0.22, 0.11, 0.03])), n)
    group = np.where(gender == 1, age, 6 + np.maximum(age, 1))  # 0..12, as gender x age groups
    rank = np.argsort(np.argsort(u.activity[keep])) / max(1, n - 1)  # heavy users shop more
    shopping = np.where(rank < 0.05, 1, np.where(rank < 0.3, 2, 3))
    pvalue = 1 + _draw(r, _cum(np.array([0.3, 0.55, 0.15])), n)
    city = 1 + _draw(r, _cum(np.array([0.1, 0.4, 0.3, 0.2])), n)
    segid = np.where(r.random(n) < 0.9, 0, r.integers(1, 97, n))
    profile = pa.table([
        u.user_id[keep], segid, group, gender, age,
        pa.array(pvalue, mask=r.random(n) < empty_pvalue_share), shopping,
        (r.random(n) < 0.06).astype(np.int64),
        pa.array(city, mask=r.random(n) < empty_city_share)],
        names=HEADERS["user_profile"].split(","))
    out = _Csv(paths["user_profile"], HEADERS["user_profile"], profile.schema)
    out.write(profile.take(pa.array(r.permutation(n))))
    out.close()

    rows = {"raw_sample": n_imp, "behavior_log": behaviour_rows, "ad_feature": n_ads, "user_profile": n}
    return {"folder": str(folder), "paths": {k: str(p) for k, p in paths.items()}, "rows": rows,
            "sizes": sz, "ctr": clicks / max(1, n_imp),
            "missing_profiles": u.user_id[missing].tolist(), "seconds": round(time.perf_counter() - t0, 2)}
