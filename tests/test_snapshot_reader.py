"""A reader holds one version: whatever `--overwrite` swaps in and gc removes while a
`Snapshot` is open, every answer it gives comes from the one version it opened.

Every planted generation g of version "v" spells itself: cut day 2026-01-01 + g, each user's
vector (g + 1)·e_(g mod D), ad Pin 100 + j's vector e_((j + g) mod D). A reader whose tables and
index come from one generation always ranks ad 100 first with score g + 1; users of g1 with the
index of g2 rank ad 100 + (g1 - g2) mod D first, so a mix shows in the answer itself.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from derl.datapipes.snapshots import LATEST, Snapshot, SnapshotError, gc, versions
from derl.datapipes.snapshots.store import READER_HOLDS
from derl.launchers import cli
from helpers import plant_snapshot

D = 8
USERS = np.arange(2_000)  # enough rows that reading a table takes a while: room for a swap between reads
ADS = np.arange(100, 100 + D)


def _plant(root: Path, generation: int, version: str = "v", replace: bool = False) -> None:
    cut = (dt.date(2026, 1, 1) + dt.timedelta(days=generation)).isoformat()
    users = np.zeros((len(USERS), D), np.float32)
    users[:, generation % D] = generation + 1
    pins = np.eye(D, dtype=np.float32)[(np.arange(D) + generation) % D]
    plant_snapshot(root, version, cut, {"d/users": (USERS, users), "d/pins": (ADS, pins)}, dim=D, ads=ADS,
                   replace=replace)


def _mixed(snap: Snapshot) -> bool:
    """Whether the snapshot's answers come from more than one generation (module docstring)."""
    g = (dt.date.fromisoformat(snap.manifest["cut_day"]) - dt.date(2026, 1, 1)).days
    users, _ = snap.table("d", "users").lookup(USERS[[0, -1]])
    pins, _ = snap.table("d", "pins").lookup(ADS[:1])
    top, scores, missing = snap.retrieve_ads("d", USERS[[0, -1]], k=1)
    return not (np.all(users[:, g % D] == g + 1) and pins[0, g % D] == 1 and not missing.any()
                and np.all(top[:, 0] == ADS[0]) and np.allclose(scores[:, 0], g + 1))


def _generation(snap: Snapshot) -> int:
    return int(snap.table("d", "users").vectors[0].max()) - 1


def _replace_and_collect(root: Path, generations: int) -> None:
    """In a forked child: `derl export --overwrite`'s commit over and over, a gc after each."""
    for g in range(1, generations + 1):
        _plant(root, g, replace=True)
        gc(root, keep=1)


def test_an_open_snapshot_keeps_its_version_through_a_replace_and_gc(tmp_path):
    root = tmp_path / "snap"
    _plant(root, 0, "old")
    _plant(root, 1)
    with Snapshot(root, "old") as old, Snapshot(root) as held:
        _plant(root, 2, replace=True)
        done = gc(root, keep=1)
        assert done["removed"] == [] and done["skipped"]["old"] == f"not removed: {READER_HOLDS}"
        [kept] = [name for name, why in done["skipped"].items() if why == READER_HOLDS]
        assert kept.startswith(".v.tmp-")  # the replaced generation, moved aside while held
        assert _generation(held) == 1 and not _mixed(held) and not _mixed(old)
        with Snapshot(root) as fresh:
            assert _generation(fresh) == 2 and not _mixed(fresh)
    done = gc(root, keep=1)  # let go: now both go
    assert done["removed"] == ["old"] and done["leftovers_removed"] == [kept] and done["skipped"] == {}
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "v"]


@pytest.mark.slow
def test_a_reader_during_repeated_overwrites_and_gc_never_mixes_versions(tmp_path):
    """The audit's loop: fresh opens of LATEST, a snapshot held from the start and an older
    version that gc would remove, all asked again and again while another process replaces
    the version and collects; bounded in generations and in time."""
    root = tmp_path / "snap"
    _plant(root, 0, "old")
    _plant(root, 0)
    writer = multiprocessing.get_context("fork").Process(target=_replace_and_collect, args=(root, 40))
    mixed, errors, seen = 0, [], set()
    with Snapshot(root, "old") as old, Snapshot(root) as held:
        writer.start()
        deadline = time.monotonic() + 90
        while writer.is_alive() and time.monotonic() < deadline:
            try:
                with Snapshot(root) as fresh:
                    mixed += _mixed(fresh)
                    seen.add(_generation(fresh))
                mixed += _mixed(held) + _mixed(old)
            except (SnapshotError, OSError) as e:
                errors.append(str(e))
        writer.join(30)
        assert writer.exitcode == 0
        assert (mixed, errors[:3]) == (0, []) and _generation(held) == 0
    assert len(seen) >= 5  # the loop did read across many replacements
    assert versions(root) == ["old", "v"] and gc(root, keep=1)["removed"] == ["old"]


def test_a_commit_that_fails_removes_its_hidden_folder(tmp_path):
    root = tmp_path / "snap"
    _plant(root, 0)
    with pytest.raises(SnapshotError, match="version exists; pass --overwrite"):
        _plant(root, 1)
    bad = np.full((len(USERS), D), np.nan, np.float32)
    with pytest.raises(SnapshotError, match="not published: .*not finite"):
        plant_snapshot(root, "v2", "2026-01-09", {"d/users": (USERS, bad)}, dim=D)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "v"]  # nothing hidden left for a gc


def test_an_older_cut_never_moves_latest_back(tmp_path, capsys):
    root = tmp_path / "snap"
    _plant(root, 5, "new")
    capsys.readouterr()
    _plant(root, 2, "backfill")
    assert capsys.readouterr().out == ("LATEST stays on new (cut 2026-01-06): version backfill is cut earlier "
                                       "(2026-01-03); read it by name\n")
    assert Snapshot(root).version == "new" and versions(root) == ["backfill", "new"]
    _plant(root, 7, "backfill", replace=True)  # now the newest cut: LATEST moves on
    assert Snapshot(root).version == "backfill"


@pytest.mark.parametrize("action", ["list", "gc"])
def test_snapshots_on_a_missing_root_is_refused_by_name(tmp_path, capsys, action):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:
        cli.main(["snapshots", action, str(missing), *(["--keep", "1"] if action == "gc" else [])])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"{missing}: no such snapshot root (not a folder)")
    assert not missing.exists()
