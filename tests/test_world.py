"""The synthetic world: deterministic, shaped like the ads regime of the paper, and leak-free."""

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from derl.datapipes import schema as S
from derl.datapipes import world
from derl.datapipes.world import WORLD_PRESETS, WORLD_META, generate

# Small enough to make several times in one test.
SMALL = dataclasses.replace(WORLD_PRESETS["tiny"], num_users=200, num_pins=600, num_days=3)


def _table(root, name):
    return pads.dataset(root / name, format="parquet", partitioning="hive").to_table()


def test_same_seed_same_world_other_seed_other_world(tmp_path, tiny_world):
    again = tmp_path / "again"
    generate(again, WORLD_PRESETS["tiny"], seed=0)
    other = tmp_path / "other"
    generate(other, WORLD_PRESETS["tiny"], seed=1)
    for name in S.TABLES:
        assert _table(again, name).equals(_table(tiny_world, name)), name
    assert not _table(other, "engagements").equals(_table(tiny_world, "engagements"))


def test_every_table_has_its_schema_and_day_partitions(tiny_world):
    for name, spec in S.TABLES.items():
        for path in sorted((tiny_world / name).rglob("*.parquet")):
            schema = pq.read_schema(path)
            for f in spec.schema:
                assert schema.field(f.name).type == f.type, (path, f.name)
            if spec.partitioned_by_day:
                S.parse_day(path.parent.name.removeprefix("ds="))
    assert len(list((tiny_world / "engagements").glob("ds=*"))) == WORLD_PRESETS["tiny"].num_days


def test_ads_are_sparse_and_noisy_organic_is_rich(tiny_world):
    ads = _table(tiny_world, "ad_events")
    clicked = ads.column("clicked").to_numpy()
    converted = ads.column("converted").to_numpy()
    assert 0.01 <= clicked.mean() <= 0.03  # CTR around 1-3 %
    assert 0.05 <= converted.sum() / clicked.sum() <= 0.15  # CVR given click 5-15 %
    assert not (converted & ~clicked.astype(bool)).any()
    eng = _table(tiny_world, "engagements")
    actions = np.bincount(eng.column("action").to_numpy(), minlength=S.NUM_ACTIONS)
    organic_signal = actions.sum() - actions[S.Action.IMPRESSION]
    assert eng.num_rows > 2 * ads.num_rows
    assert organic_signal > 20 * clicked.sum()  # the ad side alone is starved of signal
    assert (actions > 0).all()  # every action type occurs
    assert actions[S.Action.IMPRESSION] > actions[S.Action.SAVE] > 0


def test_pin_popularity_is_power_law(tiny_world):
    counts = np.bincount(_table(tiny_world, "engagements").column("pin_id").to_numpy())
    top = np.sort(counts)[::-1]
    # A uniform catalogue would give the top 1 % of Pins 1 % of impressions.
    assert top[: len(top) // 100].sum() / top.sum() > 0.15


def test_cold_users_and_pins_appear_only_on_the_last_days(tiny_world):
    cfg = WORLD_PRESETS["tiny"]
    first_cold = S.parse_day(cfg.start_day) + dt.timedelta(days=cfg.num_days - cfg.cold_days)
    users = pq.read_table(tiny_world / "users")
    pins = pq.read_table(tiny_world / "pins")
    cold_users = users.filter(pads.field("signup_ds") >= first_cold).column("user_id").to_numpy()
    cold_pins = pins.filter(pads.field("created_ds") >= first_cold).column("pin_id").to_numpy()
    assert len(cold_users) > 0 and len(cold_pins) > 0
    eng = _table(tiny_world, "engagements")
    before = eng.filter(pads.field("ds") < f"{first_cold:%Y-%m-%d}")
    assert not np.isin(before.column("user_id").to_numpy(), cold_users).any()
    assert not np.isin(before.column("pin_id").to_numpy(), cold_pins).any()
    after = eng.filter(pads.field("ds") >= f"{first_cold:%Y-%m-%d}")
    assert np.isin(after.column("user_id").to_numpy(), cold_users).any()


def test_user_sequences_hold_the_last_engagements_before_the_day_and_nothing_after(tiny_world):
    cfg = WORLD_PRESETS["tiny"]
    eng = _table(tiny_world, "engagements").to_pandas()
    positive = eng[eng.action != S.Action.IMPRESSION]
    seqs = _table(tiny_world, "user_sequences").to_pandas()
    assert len(seqs) > 0
    for ds, day in seqs.groupby("ds"):
        day_start = S.day_start_ts(S.parse_day(ds))
        flat_ts = np.concatenate(day.seq_ts.to_numpy())
        assert (flat_ts < day_start).all(), f"leak on {ds}"
        # Spot-check the contents against the engagement log itself.
        history = positive[positive.ts < day_start].sort_values(["ts"], kind="stable")
        for row in day.head(20).itertuples():
            mine = history[history.user_id == row.user_id].tail(cfg.sequence_length)
            assert list(row.seq_pin_id) == mine.pin_id.tolist()
            assert list(row.seq_action) == mine.action.tolist()
            assert list(row.seq_ts) == mine.ts.tolist()


def test_ad_truth_is_the_generator_own_answer(tiny_world):
    """`ad_truth` recomputes the probabilities the world drew its ad outcomes from: summed over
    the impressions they predict the clicks and conversions that happened (within 4 binomial
    standard deviations), and they rank them far better than the base rate does."""
    from derl.datapipes.world import ad_truth
    from derl.models.metrics import binary_metrics

    cols = ["user_id", "pin_id", "surface", "position", "clicked", "converted"]
    days = sorted(p.name.split("=")[1] for p in (tiny_world / "ad_events").iterdir())
    parts = []
    for day in days:
        t = pads.dataset(tiny_world / "ad_events" / f"ds={day}", format="parquet").to_table(columns=cols)
        rows = {c: t.column(c).to_numpy() for c in cols}
        parts.append({**rows, **ad_truth(tiny_world, day, rows)})
    a = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    clicked = a["clicked"] == 1
    for p, y in ((a["click"], a["clicked"]), (a["conversion"][clicked], a["converted"][clicked])):
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    assert binary_metrics(a["click"], a["clicked"])["ne"] < 0.95  # measured 0.925 (base rate: 1)
    assert binary_metrics(a["conversion"][clicked], a["converted"][clicked])["auc"] > 0.6  # measured 0.72
    assert np.all(np.abs(a["affinity"]) <= 1 + 1e-5)  # a dot of unit latents


def test_the_hidden_state_of_a_world_it_cannot_rebuild_is_refused_by_name(tiny_world, tmp_path):
    from derl.datapipes.world import latent_state

    with pytest.raises(ValueError, match="not a world made by `derl generate`"):
        latent_state(tmp_path, "2026-01-01")
    with pytest.raises(ValueError, match="day 2031-01-01 is not one of the world's days"):
        latent_state(tiny_world, "2031-01-01")


def test_overwrite_replaces_only_a_world_and_refuses_anything_else_by_name(tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=rf"--overwrite: {notes} holds no {WORLD_META}, so it is not a world"):
        generate(notes, SMALL, seed=0, overwrite=True)
    monkeypatch.chdir(notes)  # `derl generate --out . --overwrite`
    with pytest.raises(FileExistsError, match=rf"--overwrite: {notes} holds no {WORLD_META}"):
        generate(Path("."), SMALL, seed=0, overwrite=True)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FileExistsError, match="a-file holds no"):
        generate(tmp_path / "a-file", SMALL, seed=0, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        generate(notes, SMALL, seed=0)
    assert (notes / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()  # an empty folder loses nothing
    generate(tmp_path / "empty", SMALL, seed=0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty", "notes"]  # nothing left beside


def test_overwrite_puts_the_new_world_in_place_before_the_old_one_goes(tmp_path, monkeypatch):
    out = tmp_path / "w"
    generate(out, SMALL, seed=0)
    write = world._write_world
    old_while_writing = []

    def spy(tmp, *args):
        meta = write(tmp, *args)
        old_while_writing.append(json.loads((out / WORLD_META).read_text())["seed"])
        return meta

    monkeypatch.setattr(world, "_write_world", spy)
    generate(out, SMALL, seed=1, overwrite=True)
    assert old_while_writing == [0]  # the old world stood whole until the new one was complete
    assert json.loads((out / WORLD_META).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_failed_generation_leaves_the_old_world_whole_and_nothing_beside_it(tmp_path, monkeypatch):
    out = tmp_path / "w"
    generate(out, SMALL, seed=0)
    before = _table(out, "engagements")
    simulate = world._simulate_day

    def killed_on_day_2(cfg, e, campaign, day_index, *args):
        if day_index == 1:
            raise KeyboardInterrupt
        return simulate(cfg, e, campaign, day_index, *args)

    monkeypatch.setattr(world, "_simulate_day", killed_on_day_2)
    with pytest.raises(KeyboardInterrupt):
        generate(out, SMALL, seed=1, overwrite=True)
    assert _table(out, "engagements").equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.slow
def test_the_demo_world_has_conversions_to_measure_and_keeps_the_ad_signal_sparse(tmp_path):
    """The demo preset is ad-heavy so that its evaluation day has enough conversions to tell a
    CVR gain from noise (docs/results.md, "Downstream"); organic actions still outnumber ad clicks."""
    generate(tmp_path / "demo", WORLD_PRESETS["demo"], seed=0)
    ads = _table(tmp_path / "demo", "ad_events")
    clicked = ads.column("clicked").to_numpy()
    actions = np.bincount(_table(tmp_path / "demo", "engagements").column("action").to_numpy(),
                          minlength=S.NUM_ACTIONS)
    assert actions.sum() - actions[S.Action.IMPRESSION] > 8 * clicked.sum()  # measured 11.8x
    last_day = ads.filter(pads.field("ds") == ads.column("ds").to_numpy().max())
    assert last_day.column("converted").to_numpy().sum() > 1_000  # measured 1,409
