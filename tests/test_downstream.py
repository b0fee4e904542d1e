"""Downstream rankers: the point-in-time snapshot join, the ranker's parts, the metrics, and
train-downstream / evaluate end to end on 1 and 2 gloo ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.snapshots import Snapshot, SnapshotError, SnapshotJoin, pinned
from derl.datapipes.sources import SourceTables
from derl.launchers.runtime import dist as derl_dist
from derl.datapipes.schema import CONTENT_DIM
from derl.launchers.runtime.config import to_flags
from derl.launchers.runtime.presets import SMALL_RANKER
from derl.launchers.runtime.runs import read_predictions
from derl.launchers.runtime.settings import TrainDownstreamConfig
from derl.models.downstream import Ranker, RankerConfig, UpstreamFeatures
from derl.models.metrics import binary_metrics, bootstrap_ne_gain, normalized_entropy
from helpers import DOWN, derl, plant_snapshot

DAY = 86_400
JAN = {d: int(np.datetime64(f"2026-01-{d:02d}", "s").astype(np.int64)) for d in range(1, 10)}


def _rows(users, days, pins=None):
    users = np.asarray(users)
    return {"user_id": users, "pin_id": np.asarray(pins if pins is not None else users + 100),
            "day_start": np.array([JAN[d] for d in days])}


@pytest.fixture
def planted(tmp_path) -> Path:
    """v1 cut on Jan 6 and v2 cut on Jan 7; user u's vector is [u, version, 0, 0]."""
    root = tmp_path / "snap"
    for n, (version, cut) in enumerate((("v1", "2026-01-06"), ("v2", "2026-01-07")), 1):
        ids = np.array([1, 2, 3])
        vec = np.stack([ids, np.full(3, n), np.zeros(3), np.zeros(3)], axis=1)
        plant_snapshot(root, version, cut, {"engagement/users": (ids, vec),
                                            "engagement/pins": (ids + 100, vec * 10)}, dim=4)
    return root


def test_each_row_gets_the_version_live_on_its_day_never_a_later_one(planted):
    join = SnapshotJoin(planted, ("engagement/users", "engagement/pins"))
    out = join(_rows([1, 1, 2, 3, 9], [6, 7, 8, 6, 7]))
    users = out["upstream"][:, 0]
    np.testing.assert_array_equal(users[:, 0], [1, 1, 2, 3, 0])  # the row's own user
    np.testing.assert_array_equal(users[:, 1], [1, 2, 2, 1, 0])  # Jan 6: v1; Jan 7 and 8: v2
    np.testing.assert_array_equal(out["upstream"][:, 1, 0], [10, 10, 20, 30, 0])  # its own Pin
    np.testing.assert_array_equal(out["upstream_missing"], [[0, 0]] * 4 + [[1, 1]])
    assert join.rows_by_version == {"v1": 2, "v2": 3}
    with pytest.raises(SnapshotError, match="no snapshot was live on 2026-01-05"):
        join(_rows([1], [5]))


def test_a_pinned_version_serves_every_day(planted):
    out = SnapshotJoin(planted, ("engagement/users",), version="v1")(_rows([1, 2], [6, 9]))
    np.testing.assert_array_equal(out["upstream"][:, 0, 1], [1, 1])


def test_a_snapshot_of_another_dimension_or_without_the_domain_is_refused(planted):
    with pytest.raises(SnapshotError, match="dimension 4, but this ranker takes vectors of dimension 8"):
        SnapshotJoin(planted, ("engagement/users",), dim=8)(_rows([1], [6]))
    with pytest.raises(SnapshotError, match="no conversion/users table"):
        SnapshotJoin(planted, ("conversion/users",))(_rows([1], [6]))


def test_a_version_is_never_used_on_a_day_its_upstream_trained_on(tmp_path):
    """Pinned to a version (--snapshot-version), rows of a day its upstream trained on are
    refused, naming the version, the domain and its days; the day after is fine, and so is
    every day the live version serves (cut after its training)."""
    ids, vec = np.arange(3), np.eye(3, 4)
    plant_snapshot(tmp_path, "v1", "2026-01-06", {"engagement/users": (ids, vec)}, dim=4)
    manifest_path = tmp_path / "v1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["domains"]["engagement"]["train_days"] = ["2026-01-01", "2026-01-07"]
    manifest_path.write_text(json.dumps(manifest))
    pinned_join = SnapshotJoin(tmp_path, ("engagement/users",), version="v1")
    for day in ("2026-01-06", "2026-01-07"):
        with pytest.raises(SnapshotError, match=f"snapshot v1: its engagement upstream trained on "
                                                f"2026-01-01..2026-01-07, so its vectors have seen {day}"):
            pinned_join.require_after_upstream(day)
    pinned_join.require_after_upstream("2026-01-08")
    manifest["domains"]["engagement"]["train_days"] = ["2026-01-01", "2026-01-05"]
    manifest_path.write_text(json.dumps(manifest))
    SnapshotJoin(tmp_path, ("engagement/users",)).require_after_upstream("2026-01-06")


def test_the_reader_joins_each_row_with_its_own_users_and_pins_vectors(tiny_world, tmp_path):
    """Planted vectors that spell their own id and version: every row of every batch must
    carry its user's and its Pin's, from the version of its day."""
    sources = SourceTables(tiny_world)
    users = sources.read("users", columns=["user_id"]).column("user_id").to_numpy()
    pins = sources.read("pins", columns=["pin_id"]).column("pin_id").to_numpy()
    root = tmp_path / "snap"
    for n, cut in enumerate(("2026-01-05", "2026-01-07"), 1):
        known = users[users % 7 != 0]  # some users are not in the snapshot
        vec = lambda ids: np.stack([ids, np.full(len(ids), n)], axis=1)  # noqa: E731
        plant_snapshot(root, f"v{n}", cut, {"engagement/users": (known, vec(known)),
                                            "engagement/pins": (pins, vec(pins))}, dim=2)
    join = SnapshotJoin(root, ("engagement/users", "engagement/pins"))
    reader = ExampleReader(tiny_world, "ad_events", ("2026-01-05", "2026-01-08"),
                           config=ReaderConfig(batch_size=1024, prefetch=2), joins=[join])
    seen = 0
    for b in reader:
        up, missing = b.dense["upstream"].numpy(), b.dense["upstream_missing"].numpy()
        user, pin = b.meta["user_id"].numpy(), b.meta["pin_id"].numpy()
        version = np.where(b.meta["ts"].numpy() >= JAN[7], 2, 1)
        absent = user % 7 == 0
        np.testing.assert_array_equal(missing[:, 0], absent)
        np.testing.assert_array_equal(up[~absent, 0, 0], user[~absent])
        np.testing.assert_array_equal(up[~absent, 0, 1], version[~absent])
        np.testing.assert_array_equal(up[absent, 0], 0)
        np.testing.assert_array_equal(up[:, 1], np.stack([pin, version], axis=1))
        seen += len(user)
    assert seen == reader.stats.rows_emitted > 0 and sum(join.rows_by_version.values()) == seen


def test_missing_vectors_get_the_learned_default_and_each_domain_its_dot_product():
    cfg = RankerConfig({f: 10 for f in RankerConfig.__dataclass_fields__["sparse_features"].default},
                       upstream="snapshot", vectors=("engagement/users", "engagement/pins"),
                       upstream_dim=2, dot_temperatures=(0.05,))
    features = UpstreamFeatures(cfg)
    with torch.no_grad():
        features.default.copy_(torch.tensor([[5.0, 5.0], [7.0, 7.0]]))
    vectors = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
    missing = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    out, dots = features(vectors, missing)
    assert out.shape == (2, cfg.upstream_features) == (2, 4 + 1 + 2)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 2, 3, 4, 11, 0, 0]))
    torch.testing.assert_close(out[1], torch.tensor([5.0, 5, 3, 4, 35, 1, 0]))
    torch.testing.assert_close(dots, torch.tensor([[11.0], [35.0]]))


def test_the_wide_path_adds_each_dot_over_its_temperature_to_the_logits():
    """The ranker's wide path: logit += w · dot / temperature per task; it starts at zero."""
    from derl.datapipes.batch import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    features = RankerConfig.__dataclass_fields__["sparse_features"].default
    cfg = RankerConfig({f: 10 for f in features}, upstream="snapshot", upstream_dim=2,
                       vectors=("engagement/users", "engagement/pins"), dot_temperatures=(0.5,))
    with pytest.raises(ValueError, match="one dot temperature per user·Pin pair"):
        RankerConfig(cfg.num_embeddings, upstream="snapshot", upstream_dim=2, vectors=cfg.vectors)
    torch.manual_seed(0)
    ranker = Ranker(cfg).eval()
    batch = Batch(
        sparse=KeyedJaggedTensor.from_lengths_sync(list(features), torch.zeros(2 * len(features), dtype=torch.long),
                                                   torch.ones(2 * len(features), dtype=torch.int32)),
        dense={"content_emb": torch.zeros(2, CONTENT_DIM),
               "upstream": torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]),
               "upstream_missing": torch.zeros(2, 2)},
        labels={}, meta={})
    before = ranker(batch)[1]
    with torch.no_grad():
        ranker.wide.weight.copy_(torch.tensor([[0.3], [-0.2]]))
    after = ranker(batch)[1]
    logit = lambda p: torch.log(p / (1 - p))  # noqa: E731
    # dots 1 and 0 over temperature 0.5: the first row's logits move by 2w, the second's not at all
    torch.testing.assert_close(logit(after["ctr"]) - logit(before["ctr"]), torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(logit(after["cvr"]) - logit(before["cvr"]), torch.tensor([-0.4, 0.0]))


def test_metrics_agree_with_a_direct_computation():
    pred = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.6])
    label = np.array([0, 0, 1, 1, 0, 1])
    m = binary_metrics(pred, label)
    # AUC: share of (positive, negative) pairs ranked right; 8 of 9 here.
    pos, neg = pred[label == 1], pred[label == 0]
    assert m["auc"] == pytest.approx(np.mean(pos[:, None] > neg[None, :]), abs=1e-6) == pytest.approx(8 / 9, abs=1e-6)
    ce = -np.mean(label * np.log(pred) + (1 - label) * np.log(1 - pred))
    assert m["ne"] == pytest.approx(ce / -(0.5 * np.log(0.5) * 2), rel=1e-6)
    assert m["ne"] == pytest.approx(normalized_entropy(pred, label), rel=1e-9)
    assert m["calibration"] == pytest.approx(pred.sum() / label.sum(), rel=1e-6)
    assert m["rows"] == 6 and m["positives"] == 3


def test_the_bootstrap_tells_a_real_gain_from_none():
    rng = np.random.default_rng(0)
    truth = rng.beta(1, 20, size=20_000)
    label = (rng.random(20_000) < truth).astype(float)
    flat = np.full_like(truth, label.mean())
    better = bootstrap_ne_gain(label, truth, flat, resamples=200)
    assert better["significant"] and better["ci_low"] > 0 and better["ci_low"] <= better["gain"] <= better["ci_high"]
    same = bootstrap_ne_gain(label, flat, flat, resamples=200)
    assert same["gain"] == 0 and not same["significant"]


# -- end to end ----------------------------------------------------------------------------



def _train(world, out, mode, snapshots=None, *extra, **kw):
    snap = ["--snapshots", str(snapshots)] if snapshots else []
    return derl("train-downstream", "--data", str(world), "--out", str(out), "--upstream", mode,
                *snap, *DOWN, *extra, **kw)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("mode", ["none", "snapshot", "coupled"])
def test_each_mode_trains_and_scores_the_held_out_day(mode, nproc, tiny_world, learned_snapshot, tmp_path):
    run = tmp_path / "run"
    _train(tiny_world, run, mode, learned_snapshot, "--max-steps", "3", "--nproc", str(nproc))
    m = _metrics(run)
    assert m["upstream"] == mode and m["steps"] == 3 and m["world_size"] == nproc
    eval_rows = SourceTables(tiny_world).read("ad_events", (m["eval_day"], m["eval_day"]))
    preds = read_predictions(run)
    assert len(preds["request_id"]) == eval_rows.num_rows == m["eval"]["ctr"]["rows"]
    assert set(preds["request_id"]) == set(eval_rows.column("request_id").to_pylist())
    assert 0 < preds["p_ctr"].min() and preds["p_ctr"].max() < 1
    # Three steps from the training days' base rate (the heads' prior): measured NE 0.9992-1.0003.
    assert abs(m["eval"]["ctr"]["ne"] - 1) < 0.01
    assert (run / "checkpoints" / "step-000003").is_dir()
    version = Snapshot(learned_snapshot).version
    if mode == "snapshot":  # training rows joined with the one live version (read-ahead too), pinned
        assert set(m["snapshot_versions"]) == {version} and m["snapshot_versions"][version] >= 3 * 256 * nproc
        assert str(run.resolve()) in pinned(learned_snapshot)[version]
        assert preds["missing"].shape[1] == 4
    if mode == "coupled":
        assert set(m["coupled_checkpoints"]) == {"engagement", "conversion"}


def coupled_pin_worker(run: str, world: str) -> dict:
    """Rebuild a coupled ranker as train-downstream does, load the upstream towers, and embed
    the evaluation day's Pins with them."""
    from derl.launchers.stages import train_downstream

    worker = derl_dist.init()
    try:
        t = train_downstream.build(TrainDownstreamConfig(
            data=Path(world), out=Path(run), upstream="coupled", snapshots=Path(run).parent / "snap",
            **SMALL_RANKER), worker)
        dmp, eval_day = t.dmp, t.eval_day
        dmp.eval()
        reader = ExampleReader(Path(world), "ad_events", (eval_day, eval_day),
                               config=ReaderConfig(batch_size=512, shuffle_buffer=0, prefetch=0))
        batch = next(iter(reader))
        with torch.no_grad():
            pins = dmp.module.towers.models["engagement"].embed_pins(batch.sparse, batch.dense)
        return {"pin_id": batch.meta["pin_id"].numpy(), "vectors": pins.numpy()}
    finally:
        derl_dist.shutdown()


def test_coupled_towers_start_from_the_checkpoint_that_made_the_snapshot(tiny_world, learned_snapshot, tmp_path):
    shutil.copytree(learned_snapshot, tmp_path / "snap")
    out = derl_dist.launch(coupled_pin_worker, 1, str(tmp_path / "run"), str(tiny_world))
    exported, missing = Snapshot(tmp_path / "snap").table("engagement", "pins").lookup(out["pin_id"])
    np.testing.assert_allclose(out["vectors"][~missing], exported[~missing], atol=1e-5)
    assert (~missing).sum() > 100


def _rewrite(part: Path, edit) -> None:
    """Apply `edit` to a Parquet file's rows (as a DataFrame, in place), keeping its schema."""
    t = pq.read_table(part).to_pandas()
    edit(t)
    pq.write_table(pq.read_table(part).from_pandas(t, schema=pq.read_schema(part), preserve_index=False), part)


def test_bad_input_is_refused_or_repaired_and_reported(world_copy, learned_snapshot, tmp_path):
    # Conversions without a click on a training day; campaigns outside the table on the
    # evaluation day (scored in full, so every repair is in its count).
    train_part = sorted((world_copy / "ad_events" / "ds=2026-01-06").glob("*.parquet"))[0]
    eval_part = sorted((world_copy / "ad_events" / "ds=2026-01-08").glob("*.parquet"))[0]

    def orphan_conversions(t):
        t.loc[t.index[t["clicked"] == 0][:5], "converted"] = 1

    def huge_campaigns(t):
        t.loc[t.index[:7], "campaign_id"] = 10**9

    _rewrite(train_part, orphan_conversions)
    _rewrite(eval_part, huge_campaigns)
    run = tmp_path / "run"
    _train(world_copy, run, "none", None, "--epochs", "1")
    m = _metrics(run)
    assert m["data_repairs_train"][0]["repaired"]["converted_without_click"] == 5
    assert m["data_repairs_eval"][0]["repaired"]["hashed_campaign_id"] == 7
    # A label outside {0, 1}: an error naming the file and column.
    _rewrite(train_part, lambda t: t.__setitem__("clicked", t["clicked"].where(t.index != 0, 3)))
    p = _train(world_copy, tmp_path / "bad", "none", None, "--max-steps", "1", check=False)
    assert p.returncode != 0 and "column 'clicked' has 1 labels outside {0, 1}" in p.stderr
    # A snapshot that fails verification.
    snap = tmp_path / "snap"
    shutil.copytree(learned_snapshot, snap)
    v = snap / (snap / "LATEST").read_text().strip()
    victim = sorted((v / "engagement" / "users").glob("part-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-4] + b"oops")
    p = _train(world_copy, tmp_path / "tampered", "snapshot", snap, "--max-steps", "1", check=False)
    assert p.returncode == 2 and "checksum mismatch" in p.stderr


@pytest.mark.slow
def test_a_folder_takes_one_ranker_run_and_overwrite_leaves_nothing_of_the_earlier_one(tiny_world, tmp_path):
    """A 1-rank ranker over a 2-rank one: refused without --overwrite; with it, the earlier run's
    second prediction part is gone and the metrics count the evaluation day's rows once."""
    run = tmp_path / "run"
    _train(tiny_world, run, "none", None, "--max-steps", "2", "--nproc", "2")
    assert len(list((run / "predictions").glob("part-*.parquet"))) == 2
    p = _train(tiny_world, run, "none", None, "--max-steps", "2", check=False)
    assert p.returncode == 2 and "holds an earlier ranker run; pass --resume" in p.stderr
    _train(tiny_world, run, "none", None, "--max-steps", "2", "--overwrite")
    m = _metrics(run)
    eval_rows = SourceTables(tiny_world).read("ad_events", (m["eval_day"], m["eval_day"])).num_rows
    assert m["world_size"] == 1 and m["eval"]["ctr"]["rows"] == eval_rows
    assert [p.name for p in (run / "predictions").iterdir()] == ["part-00000.parquet"]


@pytest.mark.slow
def test_a_ranker_whose_loss_turns_non_finite_stops_and_writes_no_metrics(tiny_world, tmp_path):
    p = _train(tiny_world, tmp_path / "run", "none", None, "--max-steps", "6", "--dense-lr", "1e30",
               "--embedding-lr", "1e30", check=False)
    assert p.returncode == 2 and "the loss is not finite" in p.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_bad_flags_fail_before_training_with_the_flag_named(tiny_world, tmp_path):
    base = ["train-downstream", "--data", str(tiny_world), "--out", str(tmp_path / "r")]
    p = derl(*base, "--upstream", "snapshot", check=False)
    assert p.returncode == 2 and "--upstream snapshot needs --snapshots" in p.stderr
    p = derl(*base, "--upstream", "none", "--projection-dim", "0", check=False)
    assert p.returncode == 2 and "--projection-dim must be positive" in p.stderr
    p = derl(*base, "--upstream", "none", "--eval-day", "2026-01-07", check=False)
    assert p.returncode == 2 and "--eval-day 2026-01-07 is not after the training days" in p.stderr
    p = derl("score", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "s"), check=False)
    assert p.returncode == 2 and "not a finished ranker run" in p.stderr


def test_vectors_that_carry_affinity_make_snapshot_beat_none(tiny_pipeline, tmp_path):
    """The downstream half of the paper's claim, on the tiny world: a snapshot whose vectors
    carry the users' and ads' affinity (here the world's own latents, planted for the ids the
    learned snapshot holds) makes the same ranker beat `none` in CTR NE. Measured: +2.18 %
    [+1.41 %, +2.89 %] (CTR AUC 0.725 against 0.608); the assertion keeps about half. The
    learned upstream's vectors give +0.05 % [-0.12 %, +0.22 %] here, within the noise of the
    92 clicks of the evaluation day (docs/results.md, "Downstream": the demo world resolves it)."""
    from derl.datapipes.world import latent_state
    from derl.launchers.runtime.presets import STAGE_PRESETS

    learned = Snapshot(tiny_pipeline / "snapshots")
    users, pins = latent_state(tiny_pipeline / "world", learned.version)
    user_ids = learned.table("engagement", "users").ids
    pin_ids = learned.table("engagement", "pins").ids
    plant_snapshot(tmp_path / "truth", learned.version, learned.version,
                   {"engagement/users": (user_ids, users[user_ids]),
                    "engagement/pins": (pin_ids, pins[pin_ids])}, dim=users.shape[1])
    derl("train-downstream", "--data", str(tiny_pipeline / "world"), "--snapshots", str(tmp_path / "truth"),
         "--out", str(tmp_path / "ranker"), "--upstream", "snapshot", "--vectors", "user_pin",
         *to_flags(TrainDownstreamConfig, STAGE_PRESETS["tiny"].downstream))
    derl("evaluate", "--runs", f"none={tiny_pipeline / 'downstream' / 'none'}",
         f"snapshot={tmp_path / 'ranker'}", "--out", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["ctr_ne_gain_ci_low"] > 0 and report["ctr_ne_gain"] > 0.01
    assert report["modes"]["snapshot"]["ctr_auc"] > report["modes"]["none"]["ctr_auc"] + 0.05


def test_a_snapshot_without_the_dot_temperature_is_refused_by_name(tmp_path):
    """The wide path needs each domain's upstream temperature from the manifest; a snapshot
    exported before it was recorded is refused with the manifest and domain named."""
    ids, vec = np.arange(3), np.eye(3, 4)
    plant_snapshot(tmp_path, "v1", "2026-01-06", {"engagement/users": (ids, vec)}, dim=4)
    snap = Snapshot(tmp_path)
    assert snap.dot_temperature("engagement") == 0.05
    manifest = json.loads((snap.path / "manifest.json").read_text())
    del manifest["domains"]["engagement"]["dot"]
    (snap.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"manifest.json: domain 'engagement' has no dot.temperature"):
        Snapshot(tmp_path).dot_temperature("engagement")
