"""Snapshots used as a hostile or careless user would: nothing lost, nothing silently wrong.

One section per guarantee of docs/snapshots.md ("Guarantees"): confinement; atomic replace and
safe collection; finite or stopped; no time leaks; flags checked before any work. Most tests
plant small snapshots through `SnapshotWriter` (`helpers.plant_snapshot`) and call the library;
the CLI runs in-process (`cli.main`) where the flag and the exit code matter, and as a process
where it must be killed. docs/_cases_snapshots.md lists every case with its test.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from derl.datapipes.snapshots import (LATEST, MANIFEST, Snapshot, SnapshotError, SnapshotJoin, SnapshotWriter, gc,
                                      pin, resolve, sha256, verify, versions, write_part)
from derl.datapipes.sources import SourceTables
from derl.launchers import cli
from derl.launchers.runtime import faults, runs
from helpers import derl, export, plant_snapshot

IDS = np.arange(5)
ADS = (100, 101, 102)
# The commit's filesystem steps, in order (datapipes/snapshots/writer.py); from "in-place" on, the
# version's name holds the new content.
STEPS = ("snapshot-manifest", "snapshot-in-place", "snapshot-latest-beside", "snapshot-latest",
         "snapshot-old-removed")
NEW_FROM = STEPS.index("snapshot-in-place")


def _plant(root: Path, version: str = "v1", cut: str = "2026-01-06", scale: float = 1.0, ads=ADS, **kw) -> dict:
    """A small version: users 0..4 and Pins 100..104 (three of them ads), vectors `scale` x e_i."""
    vectors = np.eye(5, 4) * scale
    return plant_snapshot(root, version, cut, {"d/users": (IDS, vectors), "d/pins": (IDS + 100, vectors)},
                          dim=4, ads=ads, **kw)


def _scale(root: Path) -> float:
    """Which planting LATEST serves (the `scale` of `_plant`), read through a verified open."""
    return float(Snapshot(root).table("d", "users").vectors[0, 0])


def _main(capsys, *argv) -> str:
    """`derl ARGV` in this process: it must exit 2; returns what it wrote to stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def _export_flags(tmp_path: Path, runs_by_domain=None, out=None, world=None) -> list:
    ups = runs_by_domain or {"engagement": tmp_path / "no-run"}
    return ["export", "--data", world or tmp_path / "no-world",
            *[a for d, r in ups.items() for a in ("--upstream", f"{d}={r}")],
            "--out", out or tmp_path / "snap"]


def _listing(root: Path) -> list:
    return sorted(p.name for p in root.iterdir())


# --- 1. confinement --------------------------------------------------------------------------

BAD_NAMES = ("../victim", ".", "..", ".hidden", "a/b", "/abs", "LATEST", "pins", "", "v 1")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_version_name_that_is_not_one_plain_component_is_refused_everywhere(tmp_path, name):
    root = tmp_path / "snap"
    _plant(root)
    calls = (lambda: SnapshotWriter(root, name, 4), lambda: resolve(root, name), lambda: Snapshot(root, name),
             lambda: pin(root, name, "ranker"), lambda: SnapshotJoin(root, ("d/users",), version=name))
    for call in calls:
        with pytest.raises(SnapshotError, match=f"version {re.escape(repr(name))}: not a plain name"):
            call()
    assert _listing(tmp_path) == ["snap"] and _listing(root) == ["LATEST", "v1"]


def test_export_to_a_version_outside_the_root_deletes_nothing(tmp_path, capsys):
    """The reported cases: `--version ../victim --overwrite` deleted the folder beside the root
    and pointed LATEST at it; `--version . --overwrite` deleted the root."""
    root = tmp_path / "snap"
    _plant(root)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    for name in ("../victim", ".", "..", str(victim)):
        err = _main(capsys, *_export_flags(tmp_path), "--version", name, "--overwrite")
        assert f"--version {name!r}: not a plain name" in err
    err = _main(capsys, *_export_flags(tmp_path), "--previous", "../victim")
    assert "--previous '../victim': not a plain name" in err
    assert (victim / "keep.txt").read_text() == "mine" and _listing(root) == ["LATEST", "v1"]
    assert Snapshot(root).version == "v1"


def test_latest_naming_a_path_outside_the_root_is_refused(tmp_path, capsys):
    _plant(tmp_path, "victim")  # a complete version beside the root: what ../victim would open
    root = tmp_path / "snap"
    _plant(root)
    for content in ("../victim", str(tmp_path / "victim"), ".", "pins"):
        (root / LATEST).write_text(content + "\n")
        with pytest.raises(SnapshotError, match=r"LATEST names .*: not a plain name"):
            Snapshot(root)
    assert "not a plain name" in _main(capsys, "snapshots", "verify", root)


def test_manifest_file_entries_outside_the_version_are_refused(tmp_path, capsys):
    """A manifest listing a file outside its version, with that file's right sha256, was hashed
    and said OK."""
    root = tmp_path / "snap"
    _plant(root)
    outside = tmp_path / "secret.txt"
    outside.write_text("not the snapshot's")
    v = root / "v1"
    original = (v / MANIFEST).read_text()
    for entry in ("../../secret.txt", str(outside), "d/../../../secret.txt", "d/./users/part-00000.parquet"):
        manifest = json.loads(original)
        manifest["files"][entry] = sha256(outside)
        (v / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(SnapshotError, match=f"file entry {re.escape(repr(entry))} is not a relative, normalised"):
            verify(v)
    assert "is not a relative, normalised path" in _main(capsys, "snapshots", "verify", root)


def test_a_symlink_anywhere_inside_a_snapshot_is_refused(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    v = root / "v1"
    # A table folder swapped for a link to a copy holding one more part: its rows would be served.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(v / "d" / "users", elsewhere)
    write_part(elsewhere / "part-00009.parquet", np.array([99]), np.ones((1, 4)))
    shutil.rmtree(v / "d" / "users")
    (v / "d" / "users").symlink_to(elsewhere)
    with pytest.raises(SnapshotError, match=r"v1/d/users: a symlink or special file inside a snapshot"):
        Snapshot(root)
    # A part file that is a link (to a byte-identical copy, so its checksum matches).
    (v / "d" / "users").unlink()
    shutil.copytree(elsewhere, v / "d" / "users")
    (elsewhere / "part-00009.parquet").unlink()
    (v / "d" / "users" / "part-00009.parquet").unlink()
    (v / "d" / "users" / "part-00000.parquet").unlink()
    (v / "d" / "users" / "part-00000.parquet").symlink_to(elsewhere / "part-00000.parquet")
    with pytest.raises(SnapshotError, match="part-00000.parquet: a symlink"):
        Snapshot(root)
    # A version folder that is a link, and a LATEST that is a link.
    _plant(tmp_path / "other", "v2")
    (root / "v2").symlink_to(tmp_path / "other" / "v2")
    with pytest.raises(SnapshotError, match="v2: a symlink inside a snapshot root"):
        Snapshot(root, "v2")
    (root / LATEST).unlink()
    (root / LATEST).symlink_to(tmp_path / "other" / LATEST)
    with pytest.raises(SnapshotError, match="LATEST: a symlink inside a snapshot root"):
        Snapshot(root)


def test_verify_checks_every_tables_rows_against_the_manifest(tmp_path, capsys):
    root = tmp_path / "snap"
    _plant(root)
    v = root / "v1"
    original = (v / MANIFEST).read_text()
    manifest = json.loads(original)
    manifest["domains"]["d"]["rows"]["users"] = 6
    (v / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="d/users holds 5 rows, the manifest says 6"):
        verify(v)
    # A part rewritten with fewer rows and its checksum updated to match: only the count tells.
    manifest = json.loads(original)
    part = v / "d" / "pins" / "part-00000.parquet"
    write_part(part, IDS[:3] + 100, np.eye(3, 4))
    manifest["files"]["d/pins/part-00000.parquet"] = sha256(part)
    (v / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="d/pins holds 3 rows, the manifest says 5"):
        verify(v)
    assert "holds 3 rows, the manifest says 5" in _main(capsys, "snapshots", "verify", root)


def test_overwrite_replaces_only_derls_own_version(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    (root / "mine").mkdir()  # not derl's: no manifest
    (root / "mine" / "notes.txt").write_text("mine")
    shutil.copytree(root / "v1", root / "v2")  # derl's v1, under another version's name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (root / "v3").symlink_to(elsewhere)
    for name, why in (("mine", "no such snapshot version"), ("v2", "the manifest is version 'v1'"),
                      ("v3", "a symlink")):
        with pytest.raises(SnapshotError, match=f"--overwrite: .*{name} is not a derl snapshot version .*{why}"):
            _plant(root, name, replace=True)
    assert (root / "mine" / "notes.txt").read_text() == "mine" and (elsewhere / "keep.txt").read_text() == "mine"
    assert json.loads((root / "v2" / MANIFEST).read_text())["version"] == "v1"
    assert Snapshot(root).version == "v1"  # LATEST untouched by the refused commits


# --- 2. atomic replace and safe collection ----------------------------------------------------

def test_replacing_the_latest_version_keeps_latest_complete_between_every_step(tmp_path):
    root = tmp_path / "snap"
    _plant(root, scale=1.0)
    seen = []

    def reached(point: str) -> None:
        seen.append(point)
        assert versions(root) == ["v1"] and Snapshot(root).version == "v1"  # verifies
        assert _scale(root) == (2.0 if point in STEPS[NEW_FROM:] else 1.0)

    _plant(root, scale=2.0, replace=True, reached=reached)
    assert seen == list(STEPS) and _listing(root) == ["LATEST", "v1"]


def _replace_killed_at(root: Path, point: str) -> None:
    """In a forked child: arm the fault hook for `point`, then replace v1 (`derl export
    --overwrite`'s commit)."""
    os.environ["DERL_FAULT"] = point
    importlib.reload(faults)
    _plant(root, scale=2.0, replace=True)


def _fork(target, *args) -> multiprocessing.Process:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


@pytest.mark.slow
@pytest.mark.parametrize("point", STEPS)
def test_a_replace_killed_at_each_step_leaves_latest_on_a_complete_version(tmp_path, point):
    root = tmp_path / "snap"
    _plant(root, scale=1.0)
    child = _fork(_replace_killed_at, root, point)
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert Snapshot(root).version == "v1" and _scale(root) == (2.0 if point in STEPS[NEW_FROM:] else 1.0)
    # The dead commit's lock died with it: gc takes what it left, and never the version.
    [leftover] = gc(root, keep=1)["leftovers_removed"]
    assert leftover.startswith(".v1.tmp-") and _listing(root) == ["LATEST", "v1"]
    _plant(root, scale=3.0, replace=True)
    assert _scale(root) == 3.0


def test_overwrite_never_replaces_a_pinned_version(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    pin(root, "v1", "ranker A")
    with pytest.raises(SnapshotError, match="pinned by ranker A; a pinned version is never replaced"):
        _plant(root, scale=2.0, replace=True)
    assert _scale(root) == 1.0
    with pytest.raises(SnapshotError, match="version exists; pass --overwrite"):
        _plant(root, scale=2.0)


def test_gc_orders_versions_by_their_manifests_never_by_name(tmp_path):
    root = tmp_path / "snap"
    for version, cut in (("v10", "2026-01-10"), ("v8", "2026-01-08"), ("v9", "2026-01-09")):
        _plant(root, version, cut)
    assert versions(root) == ["v8", "v9", "v10"]  # by name, v10 would come first
    assert Snapshot(root).version == "v10"  # LATEST stays on the newest cut, whatever the planting order
    (root / LATEST).write_text("v9\n")
    done = gc(root, keep=1)  # the newest, v10, and LATEST, v9, stay
    assert done["removed"] == ["v8"] and versions(root) == ["v9", "v10"]
    same = tmp_path / "one-cut"
    for version in ("c", "b", "a"):  # one cut day: created_at decides
        _plant(same, version, "2026-01-06")
    (same / LATEST).write_text("c\n")
    assert versions(same) == ["c", "b", "a"] and gc(same, keep=1)["removed"] == ["b"]


def test_gc_never_touches_the_folder_of_a_running_export(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    running = SnapshotWriter(root, "v2", 4).prepare()  # holds its lock, as a running export does
    write_part(running.part("d", "users", 0), IDS, np.eye(5, 4))
    for dry_run in (True, False):
        done = gc(root, keep=1, dry_run=dry_run)
        assert (done["leftovers_removed"] == []
                and done["skipped"] == {running.folder.name: "an export is still writing it"})
    running.ads_index("d", np.zeros(0, np.int64))
    running.commit({"cut_day": "2026-01-07", "dim": 4, "domains": {"d": {"rows": {"users": 5, "pins": 0, "ads": 0}}}})
    assert versions(root) == ["v1", "v2"] and Snapshot(root).version == "v2"


def _hold_a_lock(root: Path) -> None:
    """In a forked child: an export that has prepared its folder and is still working."""
    writer = SnapshotWriter(root, "v2", 4).prepare()  # the lock lives as long as the writer
    time.sleep(600)  # killed in here
    return writer


@pytest.mark.slow
def test_gc_takes_a_running_exports_folder_only_once_its_process_is_gone(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    child = _fork(_hold_a_lock, root)
    deadline = time.monotonic() + 60
    while not [p for p in root.glob(".v2.tmp-*") if p.is_dir()] and time.monotonic() < deadline:
        time.sleep(0.05)
    [folder] = [p for p in root.glob(".v2.tmp-*") if p.is_dir()]
    assert gc(root, keep=1)["skipped"] == {folder.name: "an export is still writing it"} and folder.is_dir()
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert gc(root, keep=1)["leftovers_removed"] == [folder.name] and _listing(root) == ["LATEST", "v1"]


def test_gc_removes_nothing_it_cannot_name_as_derls(tmp_path, capsys):
    root = tmp_path / "snap"
    for n in (1, 2, 3):
        _plant(root, f"v{n}", f"2026-01-0{n}")
    part = root / "v1" / "d" / "users" / "part-00000.parquet"
    part.write_bytes(part.read_bytes() + b"x")  # old enough to go, but it no longer verifies as derl's
    (root / ".notes.tmp-1").mkdir()  # named like an export's folder, but without derl's lock file
    (root / "photos").mkdir()  # no manifest
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (root / "v0").symlink_to(elsewhere)
    (root / ".v0.tmp-2").symlink_to(elsewhere)
    (root / ".v0.tmp-2.lock").touch()
    done = gc(root, keep=1)  # no traceback at the symlinks: skipped and said
    assert done["removed"] == ["v2"] and versions(root) == ["v1", "v3"]
    assert set(done["skipped"]) == {"v1", ".notes.tmp-1", "photos", "v0", ".v0.tmp-2"}
    assert "checksum mismatch" in done["skipped"]["v1"] and "symlink" in done["skipped"]["v0"]
    assert (elsewhere / "keep.txt").read_text() == "mine" and (root / ".notes.tmp-1").is_dir()
    cli.main(["snapshots", "list", str(root)])
    out = capsys.readouterr().out
    assert "v3 (LATEST)" in out and "not a version: photos (no manifest.json)" in out


def test_gc_with_an_unreadable_pin_or_latest_removes_nothing(tmp_path):
    root = tmp_path / "snap"
    _plant(root, "v1", "2026-01-01")
    _plant(root, "v2", "2026-01-02")
    (root / "pins").mkdir()
    (root / "pins" / "bad.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="bad.json: unreadable pin"):
        gc(root, keep=1)
    (root / "pins" / "bad.json").write_text(json.dumps({"version": "../v1", "owner": "x"}))
    with pytest.raises(SnapshotError, match="not a plain name"):
        gc(root, keep=1)
    (root / "pins" / "bad.json").unlink()
    (root / LATEST).write_text("../v2\n")
    with pytest.raises(SnapshotError, match="LATEST names '../v2'"):
        gc(root, keep=1)
    assert versions(root) == ["v1", "v2"]


# --- 3. finite or stopped ---------------------------------------------------------------------

def test_non_finite_vectors_are_never_published(tmp_path):
    root = tmp_path / "snap"
    _plant(root)
    bad = np.eye(5, 4)
    bad[1, 0], bad[3, 2] = np.nan, np.inf
    tables = {"d/users": (IDS, np.eye(5, 4)), "d/pins": (IDS + 100, bad)}
    with pytest.raises(SnapshotError, match=r"version v2 not published: .*d/pins: 2 of 5 vectors are not finite"):
        plant_snapshot(root, "v2", "2026-01-07", tables, dim=4)
    with pytest.raises(SnapshotError, match=r"version v1 not published: .*d/pins: 2 of 5 vectors are not finite"):
        plant_snapshot(root, "v1", "2026-01-06", tables, dim=4, replace=True)
    assert versions(root) == ["v1"] and _scale(root) == 1.0


def test_verify_and_the_reader_refuse_non_finite_vectors(tmp_path, capsys):
    """Vectors gone non-finite after the export, with a manifest made to match them."""
    root = tmp_path / "snap"
    _plant(root)
    v = root / "v1"
    part = v / "d" / "users" / "part-00000.parquet"
    vectors = np.eye(5, 4)
    vectors[2] = np.nan
    write_part(part, IDS, vectors)
    manifest = json.loads((v / MANIFEST).read_text())
    manifest["files"]["d/users/part-00000.parquet"] = sha256(part)
    (v / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="d/users: 1 of 5 vectors are not finite"):
        verify(v)
    with pytest.raises(SnapshotError, match="d/users: 1 of 5 vectors are not finite"):
        Snapshot(root, check=False).table("d", "users")
    assert "1 of 5 vectors are not finite" in _main(capsys, "snapshots", "verify", root)


def test_retrieval_returns_only_real_ads(tmp_path, capsys):
    root = tmp_path / "snap"
    _plant(root)
    pins, scores, missing = Snapshot(root).retrieve_ads("d", IDS, 10)  # more than the 3 ads
    assert pins.shape == scores.shape == (5, 3) and set(pins.ravel()) == set(ADS) and not missing.any()
    cli.main(["retrieve", "--snapshots", str(root), "--domain", "d", "--user", "1", "-k", "50"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "top 3 ads for user 1" in lines[0] and "the catalogue holds only 3 ads" in lines[0]
    assert {int(line.split()[2]) for line in lines[1:]} == set(ADS) and len(lines) == 4


def test_retrieval_refuses_k_below_one_and_an_empty_ad_index(tmp_path, capsys):
    root = tmp_path / "snap"
    _plant(root)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        Snapshot(root).retrieve_ads("d", IDS, 0)
    _plant(root, "v2", "2026-01-07", ads=())
    for k in ("0", "-3"):
        assert f"-k must be at least 1, got {k}" in _main(capsys, "retrieve", "--snapshots", root, "--domain", "d",
                                                          "--user", "1", "-k", k)
    err = _main(capsys, "retrieve", "--snapshots", root, "--domain", "d", "--user", "1")
    assert "the ad index is empty: version v2 holds no ads for d" in err
    assert "no ../d/users table" in _main(capsys, "retrieve", "--snapshots", root, "--domain", "../d", "--user", "1")


@pytest.mark.slow
def test_export_stops_on_non_finite_vectors_by_domain_and_rows(upstream_runs, tiny_world, tmp_path,
                                                               monkeypatch, capsys):
    from derl.models.upstream import DERM

    embed = DERM.embed_pins

    def poisoned(self, *args, **kwargs):
        out = embed(self, *args, **kwargs).clone()
        out[::2] = float("nan")
        return out

    monkeypatch.setattr(DERM, "embed_pins", poisoned)
    root = tmp_path / "s"
    err = _main(capsys, *_export_flags(tmp_path, upstream_runs, root, tiny_world), "--version", "v-nan")
    assert re.search(r"--upstream engagement=\S+: 0 of [\d,]+ user and [1-9][\d,]* of [\d,]+ Pin vectors are "
                     r"not finite \(NaN or inf\), from \S+; nothing was published", err), err
    assert versions(root) == [] and not (root / LATEST).exists()


# --- 4. no time leaks -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cut_on_or_before_an_upstream_training_day_is_refused(upstream_runs, tiny_world, tmp_path,
                                                                capsys):
    first, last = runs.read_config(upstream_runs["engagement"])["days"]
    for cut in (last, first):
        err = _main(capsys, *_export_flags(tmp_path, upstream_runs, world=tiny_world), "--cut", cut)
        assert (f"--cut {cut}: --upstream engagement={upstream_runs['engagement']} trained on {first}..{last}; "
                f"a snapshot's cut must come after every day its upstream runs trained on") in err
    assert not (tmp_path / "snap").exists()


@pytest.mark.slow
def test_a_cut_after_the_data_never_publishes_an_empty_snapshot(snapshot_root, upstream_runs,
                                                                tiny_world, tmp_path, capsys):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    before = (root / LATEST).read_text()
    last = SourceTables(tiny_world).days("engagements")[-1]
    for extra in (("--cut", "2030-01-01"), ("--cut", str(np.datetime64(last) + 3), "--retention-days", "1")):
        err = _main(capsys, *_export_flags(tmp_path, upstream_runs, root, tiny_world), *extra)
        assert f"--cut {extra[1]}: the snapshot would hold 0 users and 0 Pins" in err
        assert "an empty snapshot is never published" in err
    assert (root / LATEST).read_text() == before and versions(root) == [before.strip()]


# --- 5. flags checked before any work ---------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (("--batch-size", "0"), "--batch-size must be positive, got 0"),
    (("--weight", "1.5"), "--weight must be between 0 and 1, got 1.5"),
    (("--weight", "-0.1"), "--weight must be between 0 and 1, got -0.1"),
    (("--retention-days", "0"), "--retention-days must be positive, got 0"),
    (("--nproc", "0"), "--nproc must be positive, got 0"),
    (("--cut", "2026-1-6"), "--cut must be a day written YYYY-MM-DD, got '2026-1-6'"),
])
def test_export_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    """No world, no runs: the flag is refused before anything is read or written."""
    assert message in _main(capsys, *_export_flags(tmp_path), *flags)
    assert _listing(tmp_path) == []


def test_export_out_naming_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert f"--out {out}: a file, not a snapshot root" in _main(capsys, *_export_flags(tmp_path, out=out))
    assert out.read_text() == "mine"


@pytest.mark.parametrize("argv, message", [
    (("retrieve", "--snapshots", "{root}", "--user", "1", "-k", "0"), "-k must be at least 1, got 0"),
    (("snapshots", "gc", "{root}", "--keep", "0"), "--keep must be at least 1, got 0"),
    (("snapshots", "gc", "{root}", "--keep", "-1"), "--keep must be at least 1, got -1"),
    (("snapshots", "gc", "{root}"), "snapshots gc needs --keep N"),
])
def test_snapshot_and_retrieve_flags_are_checked_before_any_work(tmp_path, capsys, argv, message):
    """Against a root with something gc would remove and a LATEST that names nothing: the flag
    is what is refused, and nothing changed."""
    root = tmp_path / "snap"
    _plant(root, "v1", "2026-01-01")
    _plant(root, "v2", "2026-01-02")
    (root / LATEST).write_text("gone\n")
    assert message in _main(capsys, *[a.format(root=root) for a in argv])
    assert versions(root) == ["v1", "v2"]


# --- through `derl export` for real -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", ("snapshot-manifest", "snapshot-in-place"))
def test_derl_export_overwrite_killed_at_the_commit_leaves_latest_complete(snapshot_root,
                                                                           upstream_runs, tiny_world,
                                                                           tmp_path, point):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    old = Snapshot(root).manifest
    p = export(tiny_world, upstream_runs, root, "--overwrite", env={"DERL_FAULT": point}, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    now = Snapshot(root).manifest  # LATEST names a version that verifies
    assert now["version"] == old["version"]
    assert (now["created_at"] == old["created_at"]) == (point == "snapshot-manifest")
    assert len(gc(root, keep=1)["leftovers_removed"]) == 1 and _listing(root) == sorted(["LATEST", old["version"]])


@pytest.mark.slow
def test_derl_export_overwrite_refuses_a_pinned_version(snapshot_root, upstream_runs, tiny_world,
                                                        tmp_path):
    root = tmp_path / "s"
    shutil.copytree(snapshot_root, root)
    version = Snapshot(root).version
    pin(root, version, "ranker B")
    p = derl(*_export_flags(tmp_path, upstream_runs, root, tiny_world), "--overwrite", check=False)
    assert p.returncode == 2 and f"{root / version} is pinned by ranker B" in p.stderr
    assert _listing(root) == sorted(["LATEST", "pins", version]) and Snapshot(root).version == version
