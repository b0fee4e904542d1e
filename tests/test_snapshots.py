"""derl export and the snapshot reader: per-rank parts, verification, atomicity, lookups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from derl.datapipes.sequences import sequences_as_of
from derl.datapipes.snapshots import (EmbeddingTable, Snapshot, SnapshotError, SnapshotWriter, gc, pin, versions,
                                     write_part)
from derl.datapipes.snapshots.refresh import procrustes
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from helpers import SMALL, derl, export, plant_snapshot


def _retained(world: Path, cut: str, days: int) -> dict:
    """The retention rule computed directly with pandas from the source Parquet: per entity the
    latest ts of its engagements and ad events before the cut, else the later of its signup /
    creation day and the logs' first day; kept when that is at most `days` days before the
    cut's start. Sorted ids kept and dropped."""
    cut_s = int(pd.Timestamp(cut, tz="UTC").timestamp())
    activity = pd.concat([
        pads.dataset(world / t, format="parquet", partitioning="hive")
        .to_table(columns=["user_id", "pin_id", "ts"]).to_pandas()
        for t in ("engagements", "ad_events")])
    activity = activity[activity["ts"] < cut_s]
    logs_from = int(pd.Timestamp(min(p.name[3:] for p in (world / "engagements").glob("ds=*")), tz="UTC").timestamp())
    out = {}
    entities = (("users", "user_id", "signup_ds", ["user_id", "signup_ds"]),
                ("pins", "pin_id", "created_ds", ["pin_id", "created_ds", "is_ad"]))
    for name, col, born, columns in entities:
        frame = pq.read_table(world / name, columns=columns).to_pandas()
        since = pd.to_datetime(frame[born]).astype("datetime64[s]").astype("int64")
        frame, since = frame[since < cut_s], since[since < cut_s]
        last = frame[col].map(activity.groupby(col)["ts"].max())
        keep = last.fillna(np.maximum(since, logs_from)) >= cut_s - days * 86_400
        out[name] = np.sort(frame[col][keep].to_numpy())
        out[f"{name}_dropped"] = np.sort(frame[col][~keep].to_numpy())
        out[f"{name}_never_active"] = np.sort(frame[col][last.isna()].to_numpy())
        if name == "pins":
            out["ads"] = np.sort(frame[col][keep & frame["is_ad"]].to_numpy())
            out["ads_dropped"] = np.sort(frame[col][~keep & frame["is_ad"]].to_numpy())
    return out


def test_two_rank_export_writes_a_verified_snapshot(snapshot_root, tiny_world):
    cut = default_split(SourceTables(tiny_world).days("engagements")).cut_day
    snap = Snapshot(snapshot_root)  # verifies every checksum
    assert snap.version == cut and (snapshot_root / "LATEST").read_text().strip() == cut
    m = snap.manifest
    assert m["dim"] == 16 and m["normalised"] and m["world_size"] == 2
    want = _retained(tiny_world, cut, 90)  # the default window
    n_users = len(want["users"])
    assert m["retention_days"] == 90
    assert m["dropped_idle"] == {"users": len(want["users_dropped"]), "pins": len(want["pins_dropped"]),
                                 "ads": len(want["ads_dropped"])}
    for domain in ("engagement", "conversion"):
        info = m["domains"][domain]
        assert info["rows"] == {"users": n_users, "pins": len(want["pins"]), "ads": len(want["ads"])}
        assert len(list((snap.path / domain / "users").glob("part-*.parquet"))) == 2  # one per rank
        table = snap.table(domain, "users")
        assert len(table) == n_users and len(np.unique(table.ids)) == n_users
        np.testing.assert_array_equal(table.ids, want["users"])
        np.testing.assert_allclose(np.linalg.norm(table.vectors, axis=1), 1.0, rtol=1e-5)
        index, ids = snap.ads_index(domain)
        assert index.ntotal == len(ids) == info["rows"]["ads"]
        assert info["entities_per_s"] > 0 and info["upstream_metrics"]["recall@50"] >= 0


def test_default_retention_keeps_every_entity_of_a_short_log(snapshot_root, tiny_world):
    """The tiny world logs 5 days before the cut, far inside 90 days: every entity is kept,
    never-active ones included (their idleness is only known since the logs' first day)."""
    snap = Snapshot(snapshot_root)
    want = _retained(tiny_world, snap.manifest["cut_day"], 90)
    for entity in ("users", "pins"):
        assert len(want[f"{entity}_dropped"]) == 0 and len(want[f"{entity}_never_active"]) > 0
        np.testing.assert_array_equal(snap.table("engagement", entity).ids, want[entity])
    assert snap.manifest["activity_days"] == ["2026-01-01", "2026-01-05"]


def test_one_and_two_ranks_export_the_same_vectors(snapshot_root, tiny_world, upstream_runs, tmp_path):
    export(tiny_world, upstream_runs, tmp_path / "one", "--nproc", "1")
    one, two = Snapshot(tmp_path / "one"), Snapshot(snapshot_root)
    for domain in ("engagement", "conversion"):
        for entity in ("users", "pins"):
            a, b = one.table(domain, entity), two.table(domain, entity)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)


def test_tampered_or_half_written_snapshots_are_refused(snapshot_root, tmp_path):
    def copy() -> Path:
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(snapshot_root, dst)
        return dst / (snapshot_root / "LATEST").read_text().strip()

    v = copy()
    part = sorted((v / "engagement" / "pins").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        Snapshot(v.parent)
    v = copy()
    sorted((v / "conversion" / "users").glob("part-*.parquet"))[1].unlink()
    with pytest.raises(SnapshotError, match=r"manifest names conversion/users/part-00001.parquet, which is not there"):
        Snapshot(v.parent)
    v = copy()
    (v / "engagement" / "users" / "part-00009.parquet").write_bytes(b"stray")
    with pytest.raises(SnapshotError, match="files not in the manifest: engagement/users/part-00009.parquet"):
        Snapshot(v.parent)
    v = copy()
    manifest = json.loads((v / "manifest.json").read_text())
    manifest["dim"] = 8
    (v / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="manifest says dimension 8"):
        Snapshot(v.parent)


def test_an_export_killed_mid_way_leaves_no_version_and_latest_untouched(
        snapshot_root, tiny_world, upstream_runs, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    before = (root / "LATEST").read_text()
    p = export(tiny_world, upstream_runs, root, "--nproc", "2", "--version", "v-killed",
               env={"DERL_FAULT": "export-parts"}, check=False)
    assert p.returncode != 0
    assert versions(root) == [before.strip()]
    assert (root / "LATEST").read_text() == before
    assert not (root / "v-killed").exists()
    with pytest.raises(SnapshotError, match="no such snapshot version"):
        Snapshot(root, "v-killed")
    # Rank 0 outlived the killed rank and removed its hidden folder: nothing holds the disk.
    assert not list(root.glob(".v-killed*"))
    # Killed alone, nobody is left to clean up; the lock died with it: gc takes the hidden
    # folder, and only that.
    p = export(tiny_world, upstream_runs, root, "--version", "v-killed",
               env={"DERL_FAULT": "export-parts"}, check=False)
    assert p.returncode != 0
    [leftover] = [p.name for p in root.glob(".v-killed.tmp-*") if p.is_dir()]
    assert gc(root, keep=1)["leftovers_removed"] == [leftover]
    assert sorted(p.name for p in root.iterdir()) == sorted(["LATEST", before.strip()])


def test_lookup_returns_vectors_by_id_and_a_default_with_a_flag_for_unknown_ids():
    table = EmbeddingTable(np.array([30, 10, 20]), np.array([[3.0, 0], [1, 0], [2, 0]], np.float32))
    vectors, missing = table.lookup(np.array([20, 99, 10, 5]), default=np.array([-1.0, -1.0]))
    np.testing.assert_array_equal(vectors, [[2, 0], [-1, -1], [1, 0], [-1, -1]])
    np.testing.assert_array_equal(missing, [False, True, False, True])


def test_a_written_version_reads_back_verified_and_replaces_only_when_asked(tmp_path):
    rng = np.random.default_rng(0)
    ids, vectors = rng.permutation(100), rng.standard_normal((100, 4)).astype(np.float32)

    def write(version: str, scale: float, replace: bool = False) -> dict:
        writer = SnapshotWriter(tmp_path, version, 4).prepare()
        for rank, rows in enumerate((slice(0, 60), slice(60, 100))):  # two ranks' parts
            write_part(writer.part("d", "users", rank), ids[rows], vectors[rows] * scale)
            write_part(writer.part("d", "pins", rank), ids[rows] + 1000, vectors[rows])
        info = {"rows": {"users": 100, "pins": 100}}
        info["ads_index"] = writer.ads_index("d", np.arange(1000, 1010))
        info["rows"]["ads"] = info["ads_index"]["size"]
        return writer.commit({"cut_day": "2026-01-06", "dim": 4, "domains": {"d": info}}, replace=replace)

    manifest = write("v1", 1.0)
    assert list(manifest)[0] == "version" and list(manifest)[-1] == "files"
    snap = Snapshot(tmp_path)  # verifies
    assert snap.manifest == manifest and versions(tmp_path) == ["v1"]
    np.testing.assert_array_equal(snap.table("d", "users").lookup(ids)[0], vectors)
    assert snap.ads_index("d")[0].ntotal == 10
    snap.close()  # a version a reader holds would be moved aside, not removed, by the replace
    with pytest.raises(SnapshotError, match="version exists"):
        write("v1", 2.0)
    write("v1", 2.0, replace=True)
    np.testing.assert_array_equal(Snapshot(tmp_path).table("d", "users").lookup(ids)[0], 2 * vectors)
    assert (sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "v1"]
            and (tmp_path / "LATEST").read_text() == "v1\n")


def test_sequences_as_of_a_day_match_that_days_partition(tiny_world):
    sources = SourceTables(tiny_world)
    day = "2026-01-05"
    stored = pads.dataset(tiny_world / "user_sequences" / f"ds={day}", format="parquet").to_table()
    stored = stored.sort_by("user_id")
    rebuilt = sequences_as_of(sources, day, 32, stored.column("user_id").to_numpy()).sort_by("user_id")
    assert rebuilt.select(stored.column_names).equals(stored.cast(rebuilt.select(stored.column_names).schema))
    # Users with no history before the day are left out, as in the stored partitions.
    assert rebuilt.num_rows == stored.num_rows and isinstance(rebuilt, pa.Table)


def test_retrieve_answers_top_k_ads_from_the_same_version(snapshot_root, tiny_world, tmp_path):
    snap = Snapshot(snapshot_root)
    uid = int(snap.table("engagement", "users").ids[3])
    p = derl("retrieve", "--snapshots", str(snapshot_root), "--user", str(uid), "-k", "5")
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 6 and f"top 5 ads for user {uid}" in lines[0]
    pins, scores, missing = snap.retrieve_ads("engagement", [uid], 5)
    assert not missing[0] and (np.diff(scores[0]) <= 1e-6).all()
    assert set(pins[0]) <= set(snap.ad_ids("engagement"))
    # Exact search: the index agrees with brute force over the ad vectors plus each ad's
    # popularity prior (temperature x log of its impression share; the model trained without logQ).
    info = snap.manifest["domains"]["engagement"]
    assert info["dot"]["retrieval_prior_weight"] == 1.0 and info["ads_index"]["popularity_prior"]
    index, ids = snap.ads_index("engagement")
    stored = index.reconstruct_n(0, index.ntotal)
    ad_vecs, _ = snap.table("engagement", "pins").lookup(ids)
    np.testing.assert_allclose(stored[:, :-1], ad_vecs, rtol=1e-6)
    shown = SourceTables(tiny_world).read("ad_events", tuple(info["train_days"]), columns=["pin_id"])
    counts = shown.to_pandas()["pin_id"].value_counts().reindex(ids, fill_value=0).to_numpy()
    want = info["dot"]["temperature"] * np.log(np.maximum(counts, 0.5) / counts.sum())
    prior = stored[:, -1]
    np.testing.assert_allclose(prior, want, rtol=1e-5)
    user = snap.table("engagement", "users").lookup(np.array([uid]))[0][0]
    best = ids[np.argsort(-(ad_vecs @ user + prior))[:5]]
    assert list(pins[0]) == list(best)


def test_an_ad_index_from_another_version_is_refused(snapshot_root, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    v = root / (root / "LATEST").read_text().strip()
    ids = pq.read_table(v / "engagement" / "ads_ids.parquet")
    pq.write_table(ids.replace_schema_metadata({"snapshot_version": "2025-12-31"}),
                   v / "engagement" / "ads_ids.parquet")
    with pytest.raises(SnapshotError, match="ad index built for version 2025-12-31"):
        Snapshot(root, check=False).ads_index("engagement")


def test_retrieve_for_a_user_the_snapshot_does_not_hold_is_a_clear_error(snapshot_root):
    p = derl("retrieve", "--snapshots", str(snapshot_root), "--user", "99999999", check=False)
    assert p.returncode == 2 and "user 99999999 is not in snapshot" in p.stderr


def test_gc_keeps_the_newest_latest_and_pinned_versions_and_clears_killed_exports(tmp_path):
    root = tmp_path / "s"
    ids = np.arange(3)
    for day in ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"):
        plant_snapshot(root, day, day, {"d/users": (ids, np.eye(3, 4))}, dim=4)
    (root / "LATEST").write_text("2026-01-03\n")  # an older version may be LATEST after a rollback
    # What a killed export leaves: its hidden folder and its lock file, which nobody holds any more.
    killed = SnapshotWriter(root, "2026-01-05", 4, run_id="123").prepare().folder
    pin(root, "2026-01-01", "ranker run A")
    done = gc(root, keep=1)
    assert done["removed"] == ["2026-01-02"] and done["pinned"] == ["2026-01-01"]
    assert versions(root) == ["2026-01-01", "2026-01-03", "2026-01-04"]
    assert done["leftovers_removed"] == [killed.name] and not killed.exists()
    assert sorted(p.name for p in root.iterdir()) == ["2026-01-01", "2026-01-03", "2026-01-04", "LATEST", "pins"]


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a = rng.standard_normal((500, 8))
    np.testing.assert_allclose(procrustes(a.T @ (a @ q)), q, atol=1e-8)


def test_refresh_aligns_a_retrained_space_then_smooths(snapshot_root, tiny_world, upstream_runs, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    first = Snapshot(root)
    # A "retrained" engagement model: another seed, another space of the same dimension.
    retrained = {"engagement": tmp_path / "retrained"}
    derl("train-upstream", "--data", str(tiny_world), "--out", str(retrained["engagement"]),
         "--domain", "engagement", "--max-steps", "3", "--seed", "1", *SMALL)
    export(tiny_world, retrained, root, "--version", "v2", "--previous", "latest", "--weight", "0.8")
    raw = tmp_path / "raw"
    export(tiny_world, retrained, raw, "--version", "v2")
    second, daily = Snapshot(root), Snapshot(raw)
    assert second.version == "v2" and versions(root) == [first.version, "v2"]
    info = second.manifest["domains"]["engagement"]["refresh"]
    assert info["previous_version"] == first.version and info["shared_entities"] > 0
    assert info["mean_cosine_after_alignment"] > info["mean_cosine_before_alignment"]
    rotation = np.load(second.path / "engagement" / "alignment.npy")
    ids = first.table("engagement", "users").ids[:50]
    prev = first.table("engagement", "users").lookup(ids)[0]
    new = daily.table("engagement", "users").lookup(ids)[0] @ rotation
    want = 0.8 * prev + 0.2 * new
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(second.table("engagement", "users").lookup(ids)[0], want, atol=1e-5)


def test_retention_window_drops_exactly_the_idle_entities_and_refresh_still_smooths(
        snapshot_root, tiny_world, upstream_runs, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    first = Snapshot(root)
    export(tiny_world, upstream_runs, root, "--nproc", "2", "--version", "v-idle",
           "--previous", "latest", "--retention-days", "2")
    snap = Snapshot(root)
    assert snap.version == "v-idle" and versions(root) == [first.version, "v-idle"]
    want = _retained(tiny_world, snap.manifest["cut_day"], 2)
    before = _retained(tiny_world, snap.manifest["cut_day"], 90)
    m = snap.manifest
    assert m["retention_days"] == 2 and m["idle_before"] == "2026-01-04T00:00:00"
    dropped = {e: len(want[f"{e}_dropped"]) for e in ("users", "pins", "ads")}
    assert m["dropped_idle"] == dropped and dropped["users"] > 0 and dropped["pins"] > 0 and dropped["ads"] > 0
    # Never-active users (empty histories) count from the logs' first day: they drop too.
    assert len(np.intersect1d(want["users_dropped"], want["users_never_active"])) > 0
    for domain in ("engagement", "conversion"):
        info = m["domains"][domain]
        for entity in ("users", "pins"):
            table = snap.table(domain, entity)
            np.testing.assert_array_equal(table.ids, want[entity])
            np.testing.assert_allclose(np.linalg.norm(table.vectors, axis=1), 1.0, rtol=1e-5)
            # The previous version is untouched: it still holds its (90-day) entities.
            np.testing.assert_array_equal(first.table(domain, entity).ids, before[entity])
        assert info["rows"] == {"users": len(want["users"]), "pins": len(want["pins"]), "ads": len(want["ads"])}
        index, ids = snap.ads_index(domain)
        np.testing.assert_array_equal(np.sort(ids), want["ads"])
        assert index.ntotal == len(want["ads"]) and not np.isin(want["ads_dropped"], ids).any()
        # Refresh: every kept entity was in the previous (90-day) version and was smoothed with it.
        refresh = info["refresh"]
        assert refresh["previous_version"] == first.version
        assert refresh["shared_entities"] == len(want["users"]) + len(want["pins"])
    p = export(tiny_world, upstream_runs, root, "--retention-days", "0", check=False)
    assert p.returncode == 2 and "--retention-days must be positive, got 0" in p.stderr


def test_ann_bench_measures_a_real_snapshot(snapshot_root, tmp_path):
    from derl.benchmarks import ann_bench

    snap = Snapshot(snapshot_root)
    rows = ann_bench.run(["--out", str(tmp_path), "--ads", "0", "--snapshots", str(snapshot_root),
                          "--queries", "50", "--min-time", "0", "--threads", "1", "--build-threads", "1"])["rows"]
    assert {r["dataset"] for r in rows} == {f"snapshot-{snap.version}-engagement"}
    assert all(r["ads"] == snap.manifest["domains"]["engagement"]["rows"]["ads"] for r in rows)
    assert [r["recall@10_%"] for r in rows if r["index"] == "flat_ip"] == [100.0]
    assert all(0 < r["recall@10_%"] <= 100 and r["qps_k10"] > 0 for r in rows)
    assert (tmp_path / "ann.png").is_file()


def test_ad_catalogues_above_the_flat_limit_get_an_hnsw_index(monkeypatch, tmp_path):
    import faiss

    from derl.datapipes.snapshots import index as ad_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    writer = SnapshotWriter(tmp_path, "v", 8).prepare()
    write_part(writer.part("d", "pins", 0), np.arange(300), vectors)
    ads = np.arange(0, 300, 2)
    assert writer.ads_index("d", ads)["kind"] == "flat_ip"
    monkeypatch.setattr(ad_index, "FLAT_INDEX_MAX", 100)
    assert writer.ads_index("d", ads) == {"kind": "hnsw32_ip", "size": 150, "popularity_prior": False}
    index = faiss.read_index(str(writer.folder / "d" / "ads.faiss"))
    assert index.ntotal == 150 and index.hnsw.efSearch == ad_index.HNSW_EF_SEARCH
    np.testing.assert_array_equal(ad_index.read_ad_ids(writer.folder / "d" / "ads_ids.parquet")[0], ads)
    with open(writer.folder / "d" / "ads.faiss", "rb") as f:
        assert ad_index.read_ads_index(f, k=500).hnsw.efSearch == 500  # never below k
