"""Writing a snapshot version so that a reader sees all of it or none of it, and LATEST always
names a complete version.

Every rank of a run writes its parts into one hidden folder, `<root>/.<version>.tmp-<run id>`
(the launcher's run id, so all ranks agree on it; the process id when run alone). The process
that prepares it holds an flock on `<that folder>.lock` until the commit is over, so `gc` never
touches a folder that is still being written, and takes it (with everything named after it)
once that process is gone, however it died. The commit, one filesystem step at a time (each a
fault point, `reached`):

1. the tables are checked (dimension, finite vectors, rows) and the manifest is written into the
   hidden folder (`snapshot-manifest`);
2. the folder takes its version's name: renamed into place, or, replacing a version, swapped
   with the old one in one atomic exchange, so the name holds a whole version at every instant
   and the old one is left under the hidden name (`snapshot-in-place`);
3. LATEST is written beside (`<folder>.LATEST`, `snapshot-latest-beside`) and renamed over the
   old one (`snapshot-latest`), unless LATEST names another version of a later cut day: a
   version cut earlier is published beside it, LATEST stays, and the commit says so;
4. when replacing, the old version is removed from the hidden name (`snapshot-old-removed`),
   then the lock file. An old version a reader still holds (`Snapshot`) is moved under a fresh
   hidden name instead, for a gc once the reader lets go.

A run killed anywhere leaves LATEST naming a complete version, and at most a hidden folder that
gc clears. A commit that fails with an exception (a full disk, a refused replace) removes its
own hidden folder, as does `abort` for an export that fails before its commit.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import IO, Callable, Dict, Optional

import numpy as np

from derl.datapipes.snapshots.index import build_ads_index
from derl.datapipes.snapshots.parts import part_name, write_part
from derl.datapipes.snapshots.store import (BESIDE, LATEST, LOCK, MANIFEST, TMP, SnapshotError, check_tables,
                                            discard, files_of, latest, plain_name, read_manifest, refuse_replacing,
                                            sha256, take_lock)


def exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np
    RENAME_SWAP): a reader of either name sees one whole folder or the other, never neither."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin":
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)
    else:
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    if rc != 0:
        code = ctypes.get_errno()
        raise SnapshotError(f"cannot swap {a} with {b} atomically here ({errno.errorcode.get(code, code)}: "
                            f"{os.strerror(code)}); nothing was replaced: export under another --version")


class SnapshotWriter:
    """Version `version` of dimension `dim` under `root`, being written in `folder`."""

    def __init__(self, root: Path, version: str, dim: int, run_id: Optional[str] = None):
        self.root, self.version, self.dim = Path(root), plain_name(version), dim
        run_id = run_id or os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
        self.run_id = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)
        self.folder = self.root / f".{version}{TMP}{self.run_id}"
        self.lock = self.folder.with_name(self.folder.name + LOCK)
        self.final = self.root / version
        self._lock: Optional[IO] = None

    def prepare(self) -> "SnapshotWriter":
        """An empty `folder`, locked by this process until the commit (one process, before any
        rank writes into it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = take_lock(self.lock, create=True)
        if self._lock is None:
            raise SnapshotError(f"{self.folder}: another export with run id {self.run_id} is writing it")
        discard(self.folder)  # a killed run's, with this run id
        self.folder.mkdir()
        return self

    def part(self, domain: str, entity: str, rank: int) -> Path:
        """Where `rank` writes its part of the (domain, entity) table."""
        return self.folder / domain / entity / part_name(rank)

    def ads_index(self, domain: str, ad_ids: np.ndarray, prior: Optional[np.ndarray] = None) -> Dict[str, object]:
        """The domain's ad index over the sorted `ad_ids`, from its Pin parts (all written)."""
        return build_ads_index(self.folder / domain, ad_ids, self.dim, self.version, prior)

    def commit(self, manifest: dict, replace: bool = False,
               reached: Callable[[str], object] = lambda point: None) -> dict:
        """Publish the version (module docstring): `manifest` with its version and created_at
        first and the sha256 of every file last; over an existing version only with `replace`,
        and only over derl's own, unpinned one. `reached(point)` is called after each step (the
        fault hook). Returns the manifest as written. The lock is released however it ends; an
        exception removes the hidden folder first (`abort`)."""
        try:
            return self._commit(manifest, replace, reached)
        except BaseException:
            self.abort()
            raise
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def abort(self) -> None:
        """Remove this writer's hidden folder and what is named after it (an export that failed:
        its parts would hold the disk until a gc). Only the process that prepared it, holding
        its lock, removes anything."""
        if self._lock is None:
            return
        discard(self.folder)
        self.folder.with_name(self.folder.name + BESIDE).unlink(missing_ok=True)
        self.lock.unlink(missing_ok=True)
        self._lock.close()
        self._lock = None

    def _commit(self, manifest: dict, replace: bool, reached: Callable[[str], object]) -> dict:
        files = {rel: sha256(self.folder / rel) for rel in files_of(self.folder)}
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        manifest = {"version": self.version, "created_at": created, **manifest, "files": files}
        try:
            check_tables(self.folder, manifest)
        except SnapshotError as e:
            raise SnapshotError(f"version {self.version} not published: {e}") from None
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        reached("snapshot-manifest")
        replacing = self.final.exists() or self.final.is_symlink()
        if replacing:
            if not replace:
                raise SnapshotError(f"{self.final}: version exists; pass --overwrite to replace it")
            refuse_replacing(self.root, self.version)
            exchange(self.folder, self.final)
        else:
            self.folder.rename(self.final)
        reached("snapshot-in-place")
        newer = self._newer_latest(manifest["cut_day"])
        if newer:
            print(f"LATEST stays on {newer}: version {self.version} is cut earlier ({manifest['cut_day']}); "
                  f"read it by name")
        else:
            beside = self.folder.with_name(self.folder.name + BESIDE)
            beside.write_text(self.version + "\n")
            reached("snapshot-latest-beside")
            beside.rename(self.root / LATEST)
            reached("snapshot-latest")
        if replacing:
            discard(self.folder)
            reached("snapshot-old-removed")
        if self._lock is not None:
            self.lock.unlink()
        return manifest

    def _newer_latest(self, cut_day: str) -> str:
        """'version (cut day)' of the other version LATEST names when it is cut later than
        `cut_day` (versions are ordered by cut day, then creation: a new one of the same cut is
        the newest); '' otherwise."""
        current = latest(self.root)
        if current is None or current == self.version or not (self.root / current).is_dir():
            return ""
        cut = str(read_manifest(self.root / current).get("cut_day", ""))
        return f"{current} (cut {cut})" if cut > str(cut_day) else ""


def write_snapshot(root: Path, version: str, cut_day: str, tables: Dict[str, tuple], dim: int, *,
                   temperature: float, normalised: bool, ads=(), replace: bool = False,
                   reached: Callable[[str], object] = lambda point: None) -> dict:
    """A complete version from vectors in hand, without an upstream run: `tables` maps
    "domain/entity" to (ids, [n, dim] vectors); every domain gets an ad index over the `ads`
    among its Pins and its dot temperature (`temperature`, what a ranker divides the dot by).
    For vectors no model exported: the tests' planted tables, the ceiling benchmark's true
    latents. LATEST names it."""
    writer = SnapshotWriter(root, version, dim).prepare()
    domains: Dict[str, dict] = {}
    for key, (ids, vectors) in tables.items():
        domain, entity = key.split("/")
        write_part(writer.part(domain, entity, 0), ids, vectors)
        domains.setdefault(domain, {"rows": {"users": 0, "pins": 0, "ads": 0},
                                    "dot": {"temperature": temperature}})["rows"][entity] = len(ids)
    for domain, info in domains.items():
        info["rows"]["ads"] = writer.ads_index(domain, np.sort(np.asarray(ads, np.int64)))["size"]
    return writer.commit({"cut_day": cut_day, "dim": dim, "normalised": normalised, "domains": domains},
                         replace=replace, reached=reached)
