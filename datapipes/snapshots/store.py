"""The snapshot root on disk: its layout, its versions, their verification, pins and clean-up.

Everything here works on files and manifests (no model state): what `derl snapshots list /
verify / gc` needs, what the reader checks before it opens a version, and what the writer checks
before it commits one. Every path built from a name that comes from outside (a flag, LATEST, a
manifest, a pin file) stays inside the root: names are single plain path components, manifest
entries relative and normalised, and a symlink anywhere inside a snapshot is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import weakref
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow.parquet as pq

from derl.datapipes.snapshots.parts import PART_GLOB, embedding_type, read_parts, stored_type

MANIFEST = "manifest.json"
LATEST = "LATEST"
ENTITIES = ("users", "pins")
ADS_INDEX = "ads.faiss"
ADS_IDS = "ads_ids.parquet"
PINS = "pins"  # <root>/pins/<owner hash>-<version>.json: {"version": ..., "owner": ...}
TMP = ".tmp-"  # <root>/.<version>.tmp-<run id>/: a version being written
LOCK = ".lock"  # <root>/.<version>.tmp-<run id>.lock: flocked by the export writing that folder
BESIDE = ".LATEST"  # <root>/.<version>.tmp-<run id>.LATEST: the new LATEST, written beside, then renamed
READER_HOLDS = "a reader holds it open (a Snapshot); a gc after it closes removes it"
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete, tampered with, or of the wrong shape."""


def plain_name(name: str, what: str = "version") -> str:
    """`name` if it is one plain path component (letters, digits, `._+-`, not hidden, not LATEST
    or pins): a version or domain name only ever names a folder directly inside its parent."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or name in (LATEST, PINS) or len(name) > 200:
        raise SnapshotError(f"{what} {name!r}: not a plain name (one path component of letters, digits "
                            f"and ._+-, not hidden, not {LATEST} or {PINS})")
    return name


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _digest(f)


def _digest(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


class Folder:
    """A snapshot folder opened once, by descriptor: every file is read through it (`open`), so
    what is read is this very folder whatever is renamed over its name later (an `--overwrite`
    swap). With `shared`, it holds a shared flock on the folder until `close` (or until it is
    garbage-collected): gc and the writer remove a folder only under an exclusive one
    (`remove_unheld`), so none of its files goes away while a reader holds it."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._close = weakref.finalize(self, os.close, self.fd)
        if shared:
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # waits while a removal (exclusive) is under way

    def close(self) -> None:
        self._close()

    def removed(self) -> bool:
        """Whether the folder was removed from the disk after it was opened."""
        return os.fstat(self.fd).st_nlink == 0

    def open(self, rel: str) -> IO[bytes]:
        return os.fdopen(os.open(rel, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd), "rb")

    def files(self) -> List[str]:
        """Every file but the manifest, relative, sorted. A symlink or special file anywhere is
        refused: it could lead outside the snapshot or hide files from the checks."""
        out = []
        for top, dirs, names, top_fd in os.fwalk(".", dir_fd=self.fd):
            for name in dirs + names:
                mode = os.stat(name, dir_fd=top_fd, follow_symlinks=False).st_mode
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    raise SnapshotError(f"{self.path / top / name}: a symlink or special file inside a "
                                        f"snapshot; refused")
            out += [os.path.normpath(os.path.join(top, n)) for n in names]
        return sorted(f for f in out if f != MANIFEST)

    def parts(self, domain: str, entity: str) -> List[str]:
        """The parts of one table, in rank order."""
        table = PurePosixPath(plain_name(domain, "domain"), entity)
        return [f for f in self.files() if PurePosixPath(f).parent == table and PurePosixPath(f).match(PART_GLOB)]

    def read_parts(self, domain: str, entity: str, dim: int) -> Tuple[np.ndarray, np.ndarray]:
        files = [self.open(rel) for rel in self.parts(domain, entity)]
        try:
            return read_parts(files, dim)
        finally:
            for f in files:
                f.close()


@contextmanager
def _through(path: Union[Path, Folder]) -> Iterator[Folder]:
    """`path` when it is an open Folder already; otherwise the folder, opened for the block."""
    if isinstance(path, Folder):
        yield path
        return
    folder = Folder(path)
    try:
        yield folder
    finally:
        folder.close()


def files_of(folder: Path) -> List[str]:
    """Every file under `folder` but its manifest (`Folder.files`)."""
    with _through(folder) as opened:
        return opened.files()


def read_manifest(path: Union[Path, Folder]) -> dict:
    """A version folder's manifest, or a SnapshotError naming it."""
    where = path.path if isinstance(path, Folder) else Path(path)
    try:
        with _through(path) as folder, folder.open(MANIFEST) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{where / MANIFEST}: unreadable manifest ({e})") from e


def catalogue(root: Path) -> Tuple[List[Tuple[str, dict]], Dict[str, str]]:
    """([(version, manifest)] oldest first by the manifests, cut day then created_at, never by
    name), and {entry: why it is not a version} for the other visible entries of the root. A
    root that is not a folder is refused by name."""
    root, found, skipped = Path(root), [], {}
    if not root.is_dir():
        raise SnapshotError(f"{root}: no such snapshot root (not a folder)")
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name in (LATEST, PINS):
            continue
        if p.is_symlink():
            skipped[p.name] = "a symlink, not a version folder"
        elif not (p / MANIFEST).is_file():
            skipped[p.name] = f"no {MANIFEST}"
        else:
            try:
                m = read_manifest(p)
                found.append(((str(m["cut_day"]), str(m.get("created_at", ""))), plain_name(p.name), m))
            except (SnapshotError, KeyError, TypeError) as e:
                skipped[p.name] = f"not a readable version ({e})"
    return [(v, m) for _, v, m in sorted(found, key=lambda f: f[0])], skipped


def versions(root: Path) -> List[str]:
    """Complete versions under `root` (folders with a manifest), oldest first (`catalogue`)."""
    return [v for v, _ in catalogue(root)[0]]


def cut_days(root: Path) -> List[Tuple[str, str]]:
    """(cut day, version) of every complete version, oldest first (`catalogue`)."""
    return [(m["cut_day"], v) for v, m in catalogue(root)[0]]


def _no_symlink(path: Path) -> Path:
    if path.is_symlink():
        raise SnapshotError(f"{path}: a symlink inside a snapshot root; refused")
    return path


def latest(root: Path) -> Optional[str]:
    """The version LATEST names, or None without a LATEST file."""
    path = _no_symlink(Path(root) / LATEST)
    return plain_name(path.read_text().strip(), f"{path} names") if path.is_file() else None


def resolve(root: Path, version: Optional[str] = None) -> Path:
    """The folder of `version`, or of the one LATEST names: always a folder directly inside root."""
    root = Path(root)
    if version is None:
        version = latest(root)
        if version is None:
            raise SnapshotError(f"{root}: no {LATEST} file, so no complete snapshot")
    path = _no_symlink(root / plain_name(version))
    if not (path / MANIFEST).is_file():
        raise SnapshotError(f"{path}: no such snapshot version (no {MANIFEST})")
    return path


def _listed(path: Path, rel: str) -> str:
    """A manifest's file entry, when it names a file inside the version (relative, normalised)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or str(p) != rel or ".." in p.parts or "\\" in rel or rel == MANIFEST:
        raise SnapshotError(f"{path / MANIFEST}: file entry {rel!r} is not a relative, normalised path "
                            f"inside the version; refused")
    return rel


def verify(path: Union[Path, Folder]) -> dict:
    """Check a version folder against its manifest; return the manifest. Refused: a symlink, a
    listed file missing or changed, an unlisted file, a manifest of another version, and what
    `check_tables` refuses. Every file is read through one descriptor of the folder (`Folder`)."""
    with _through(path) as folder:
        return _verify(folder)


def _verify(folder: Folder) -> dict:
    path = folder.path
    try:
        present = folder.files()
        manifest = read_manifest(folder)
        if manifest["version"] != path.name:
            raise SnapshotError(f"{path}: the manifest is version {manifest['version']!r}'s, not {path.name!r}'s")
        listed = {_listed(path, rel): digest for rel, digest in manifest["files"].items()}
        missing = sorted(set(listed) - set(present))
        if missing:
            raise SnapshotError(f"{path}: manifest names {', '.join(missing[:5])}, which is not there")
        extra = sorted(set(present) - set(listed))
        if extra:
            raise SnapshotError(f"{path}: files not in the manifest: {', '.join(extra[:5])}")
        for rel, digest in listed.items():
            with folder.open(rel) as f:
                if _digest(f) != digest:
                    raise SnapshotError(f"{path / rel}: checksum mismatch (manifest {digest[:12]}…): the file changed")
        check_tables(folder, manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise SnapshotError(f"{path / MANIFEST}: malformed manifest ({type(e).__name__}: {e})") from e
    return manifest


def nonfinite_rows(vectors: np.ndarray) -> int:
    """How many rows of [n, d] `vectors` hold a NaN or an infinity."""
    return int(np.count_nonzero(~np.isfinite(vectors).all(axis=1))) if len(vectors) else 0


def check_finite(what: str, vectors: np.ndarray) -> None:
    """Refuse vectors holding a NaN or an infinity, saying how many rows."""
    bad = nonfinite_rows(vectors)
    if bad:
        raise SnapshotError(f"{what}: {bad:,} of {len(vectors):,} vectors are not finite (NaN or inf)")


def check_tables(path: Union[Path, Folder], manifest: dict) -> None:
    """Every part of the manifest's dimension, its vectors finite, each table the rows the
    manifest states, each ad id map the stated size. The writer checks this before a commit."""
    with _through(path) as folder:
        path, dim = folder.path, manifest["dim"]
        for domain, info in manifest["domains"].items():
            for entity in ENTITIES:
                for rel in folder.parts(domain, entity):
                    with folder.open(rel) as f:
                        got = stored_type(f)
                    if got != embedding_type(dim):
                        raise SnapshotError(f"{path / rel}: embedding type {got}, manifest says dimension {dim}")
                ids, vectors = folder.read_parts(domain, entity, dim)
                check_finite(f"{path}: {domain}/{entity}", vectors)
                if len(ids) != info["rows"][entity]:
                    raise SnapshotError(f"{path}: {domain}/{entity} holds {len(ids):,} rows, the manifest says "
                                        f"{info['rows'][entity]:,}")
            with folder.open(f"{domain}/{ADS_IDS}") as f:
                ads = pq.read_metadata(f).num_rows
            if ads != info["rows"]["ads"]:
                raise SnapshotError(f"{path / domain}: ads_ids has {ads} rows, manifest says {info['rows']['ads']}")


def pin(root: Path, version: str, owner: str) -> Path:
    """Record that `owner` (e.g. a downstream model) depends on `version`: gc keeps it and
    `--overwrite` never replaces it."""
    resolve(root, version)
    folder = _no_symlink(Path(root) / PINS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_owner_key(owner)}-{version}.json"  # one per version the owner uses
    path.write_text(json.dumps({"version": version, "owner": owner}))
    return path


def _owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:16]


def unpin(root: Path, owner: str, version: Optional[str] = None) -> List[str]:
    """Drop every pin `owner` holds (a ranker about to be trained again), or only its pin of
    `version` (a service moving to a newer one); the versions freed."""
    pattern = f"{_owner_key(owner)}-{plain_name(version)}.json" if version else f"{_owner_key(owner)}*.json"
    freed = []
    for f in sorted(_no_symlink(Path(root) / PINS).glob(pattern)):
        freed.append(json.loads(_no_symlink(f).read_text())["version"])
        f.unlink()
    return freed


def pinned(root: Path) -> Dict[str, List[str]]:
    """version -> owners that pin it. An unreadable pin is an error, not an absent one: what it
    protects is unknown."""
    out: Dict[str, List[str]] = {}
    for f in sorted(_no_symlink(Path(root) / PINS).glob("*.json")):
        try:
            p = json.loads(_no_symlink(f).read_text())
            out.setdefault(plain_name(p["version"], f"{f}: version"), []).append(str(p["owner"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"{f}: unreadable pin ({e})") from e
    return out


def refuse_replacing(root: Path, version: str) -> None:
    """`--overwrite` replaces only derl's own version (a manifest that verifies as `version`)
    that nobody pins; anything else is never deleted."""
    try:
        path = resolve(root, version)
        verify(path)
    except SnapshotError as e:
        raise SnapshotError(f"--overwrite: {Path(root) / version} is not a derl snapshot version that "
                            f"verifies ({e}); derl never deletes it: move it away first") from None
    owners = pinned(root).get(version)
    if owners:
        raise SnapshotError(f"--overwrite: {path} is pinned by {', '.join(owners)}; a pinned version is "
                            f"never replaced: export under another --version")


def take_lock(path: Path, create: bool = False) -> Optional[IO]:
    """The open file holding an exclusive flock on `path`, or None when another process holds it
    (or, unless `create`, the file is gone). The lock dies with its process, however it dies."""
    try:
        f = open(path, "a" if create else "r")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _exclusive(path: Path) -> Optional[Folder]:
    """The folder opened and flocked exclusively, or None while a reader holds it (`Folder`)."""
    folder = Folder(path)
    try:
        fcntl.flock(folder.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        folder.close()
        return None
    return folder


def remove_unheld(path: Path) -> bool:
    """Remove a folder unless a reader holds it open; whether it is gone."""
    if not Path(path).is_dir():
        return True
    held = _exclusive(path)
    if held is None:
        return False
    try:
        shutil.rmtree(path)
    finally:
        held.close()
    return True


def discard(folder: Path) -> None:
    """Remove a hidden folder; one a reader still holds (a version just replaced, say) is moved
    under a fresh hidden name with a free lock file instead, which gc clears once no reader
    holds it."""
    if not remove_unheld(folder):
        kept = folder.with_name(f"{folder.name}-held-{time.time_ns()}")
        kept.with_name(kept.name + LOCK).touch()  # first: a folder without it would not be gc's
        folder.rename(kept)


def _leftovers(root: Path, dry_run: bool, skipped: Dict[str, str]) -> List[str]:
    """Remove what exports that no longer run left: each entry named after a hidden folder
    (the folder, its LATEST beside, its lock file) once that lock, derl's, is free and no reader
    holds the folder. A folder without a lock file is not derl's; one whose lock is held is
    being written."""
    removed = []
    for name in sorted({p.name.removesuffix(LOCK).removesuffix(BESIDE) for p in root.glob(f".*{TMP}*")}):
        folder, beside, lock = root / name, root / (name + BESIDE), root / (name + LOCK)
        if folder.is_symlink():
            skipped[name] = "a symlink, left in place"
            continue
        if not lock.is_file():
            skipped[name] = "no derl lock file beside it: not derl's, left in place"
            continue
        held = take_lock(lock)
        if held is None:
            skipped[name] = "an export is still writing it"
            continue
        try:
            if not dry_run:
                if not remove_unheld(folder):
                    skipped[name] = READER_HOLDS
                    continue
                beside.unlink(missing_ok=True)
                lock.unlink()
            removed.append(name)
        except OSError as e:
            skipped[name] = f"could not remove it ({e})"
        finally:
            held.close()
    return removed


def gc(root: Path, keep: int, dry_run: bool = False) -> Dict[str, object]:
    """Remove all but the `keep` newest versions (by their manifests), never LATEST nor a pinned
    one nor one that does not verify as derl's nor one a reader holds open, and the folders of
    exports that died. What it passes over, and why, is in `skipped`; nothing stops it half-way."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    root = Path(root)
    found, skipped = catalogue(root)
    names = [v for v, _ in found]
    pins, current = pinned(root), latest(root)  # an unreadable pin or LATEST stops gc before it removes anything
    protected = set(names[-keep:]) | set(pins) | {current}
    removed = []
    for v in (v for v in names if v not in protected):
        try:
            held = _exclusive(root / v)
            if held is None:
                skipped[v] = f"not removed: {READER_HOLDS}"
                continue
            try:
                verify(held)
                if not dry_run:
                    shutil.rmtree(root / v)
            finally:
                held.close()
            removed.append(v)
        except (SnapshotError, OSError) as e:
            skipped[v] = f"not removed: {e}"
    return {"removed": removed, "kept": [v for v in names if v in protected],
            "pinned": sorted(set(pins) & set(names)), "leftovers_removed": _leftovers(root, dry_run, skipped),
            "skipped": skipped}
