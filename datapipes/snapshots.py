"""Reading embedding snapshots (DESIGN.md stage 3): the hand-over from upstream to downstream.

    <root>/<version>/<domain>/{users,pins}/part-*.parquet  (entity_id int64, embedding list<float32>[d])
    <root>/<version>/<domain>/ads.faiss + ads_ids.parquet
    <root>/<version>/manifest.json
    <root>/LATEST

Opening a snapshot verifies it against its manifest first (every file present with its sha256,
no unlisted part, every part of the stated dimension, the index the size of its id map): a
half-written or tampered snapshot is refused with `SnapshotError` naming what is wrong.
Lookups are vectorised: ids -> rows by binary search over a sorted id array.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
LATEST = "LATEST"
ENTITIES = ("users", "pins")


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete, tampered with, or of the wrong shape."""


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("entity_id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions(root: Path) -> List[str]:
    """Complete versions under `root` (folders with a manifest), oldest first."""
    return sorted(p.name for p in Path(root).iterdir() if (p / MANIFEST).is_file()) if Path(root).is_dir() else []


def resolve(root: Path, version: Optional[str] = None) -> Path:
    """The folder of `version`, or of the one LATEST names."""
    root = Path(root)
    if version is None:
        latest = root / LATEST
        if not latest.is_file():
            raise SnapshotError(f"{root}: no {LATEST} file, so no complete snapshot")
        version = latest.read_text().strip()
    path = root / version
    if not (path / MANIFEST).is_file():
        raise SnapshotError(f"{path}: no such snapshot version (no {MANIFEST})")
    return path


def verify(path: Path) -> dict:
    """Check a snapshot folder against its manifest; return the manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path / MANIFEST}: unreadable manifest ({e})") from e
    listed = manifest.get("files", {})
    for rel, digest in listed.items():
        f = path / rel
        if not f.is_file():
            raise SnapshotError(f"{path}: manifest names {rel}, which is not there")
        if sha256(f) != digest:
            raise SnapshotError(f"{f}: checksum mismatch (manifest {digest[:12]}…): the file changed")
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise SnapshotError(f"{path}: files not in the manifest: {', '.join(extra[:5])}")
    for domain, info in manifest["domains"].items():
        dim = manifest["dim"]
        for entity in ENTITIES:
            for part in sorted((path / domain / entity).glob("part-*.parquet")):
                got = pq.read_schema(part).field("embedding").type
                if got != pa.list_(pa.float32(), dim):
                    raise SnapshotError(f"{part}: embedding type {got}, manifest says dimension {dim}")
        ids = pq.read_metadata(path / domain / "ads_ids.parquet").num_rows
        if ids != info["rows"]["ads"]:
            raise SnapshotError(f"{path / domain}: ads_ids has {ids} rows, manifest says {info['rows']['ads']}")
    return manifest


PINS = "pins"  # <root>/pins/<owner>.json: {"version": ..., "owner": ...}


def pin(root: Path, version: str, owner: str) -> Path:
    """Record that `owner` (e.g. a downstream model) depends on `version`: gc keeps it."""
    resolve(root, version)
    folder = Path(root) / PINS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(owner.encode()).hexdigest()[:16]}.json"
    path.write_text(json.dumps({"version": version, "owner": owner}))
    return path


def pinned(root: Path) -> Dict[str, List[str]]:
    """version -> owners that pin it."""
    out: Dict[str, List[str]] = {}
    for f in sorted((Path(root) / PINS).glob("*.json")):
        p = json.loads(f.read_text())
        out.setdefault(p["version"], []).append(p["owner"])
    return out


def gc(root: Path, keep: int, dry_run: bool = False) -> Dict[str, List[str]]:
    """Remove all but the `keep` newest versions, never LATEST nor a pinned one, and the
    leftovers of killed exports (hidden `.*.tmp-*` folders)."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    root = Path(root)
    all_versions = versions(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    protected = set(all_versions[-keep:]) | set(pinned(root)) | ({latest} if latest else set())
    removed = [v for v in all_versions if v not in protected]
    leftovers = sorted(p.name for p in root.glob(".*.tmp-*") if p.is_dir())
    if not dry_run:
        for name in removed + leftovers:
            shutil.rmtree(root / name)
    return {"removed": removed, "kept": [v for v in all_versions if v in protected],
            "pinned": sorted(set(pinned(root)) & set(all_versions)), "leftovers_removed": leftovers}


class EmbeddingTable:
    """One snapshot table in memory: sorted ids and a [n, d] float32 matrix."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.ids, self.vectors = ids[order], np.ascontiguousarray(vectors[order])

    @classmethod
    def read(cls, folder: Path, dim: int) -> "EmbeddingTable":
        parts = sorted(Path(folder).glob("part-*.parquet"))
        t = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else embedding_schema(dim).empty_table()
        emb = t.column("embedding").combine_chunks()
        vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), dim)
        return cls(t.column("entity_id").to_numpy(), vectors.astype(np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray, default: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """([len(ids), d] vectors, [len(ids)] missing flags); missing ids get `default` (zeros)."""
        dim = self.vectors.shape[1]
        if not len(self.ids):
            missing = np.ones(len(ids), dtype=bool)
            return np.broadcast_to(default if default is not None else np.zeros(dim, np.float32), (len(ids), dim)).copy(), missing
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        missing = self.ids[pos] != ids
        out = self.vectors[pos].copy()
        out[missing] = default if default is not None else 0.0
        return out, missing


class Snapshot:
    """A verified snapshot version: its manifest, its tables and its ad indexes."""

    def __init__(self, root: Path, version: Optional[str] = None, check: bool = True):
        self.path = resolve(root, version)
        self.manifest = verify(self.path) if check else json.loads((self.path / MANIFEST).read_text())
        self.version = self.manifest["version"]
        self.dim = self.manifest["dim"]
        self._tables: Dict[Tuple[str, str], EmbeddingTable] = {}

    @property
    def domains(self) -> List[str]:
        return sorted(self.manifest["domains"])

    def table(self, domain: str, entity: str) -> EmbeddingTable:
        if domain not in self.manifest["domains"] or entity not in ENTITIES:
            raise SnapshotError(f"{self.path}: no {domain}/{entity} table (domains: {self.domains})")
        key = (domain, entity)
        if key not in self._tables:
            self._tables[key] = EmbeddingTable.read(self.path / domain / entity, self.dim)
        return self._tables[key]

    def dot_temperature(self, domain: str) -> float:
        """The temperature of the upstream model whose vectors the domain holds: dot / it is that
        model's logit, the scale a ranker takes the user·Pin dot on (`Ranker`'s wide path)."""
        dot = self.manifest["domains"].get(domain, {}).get("dot", {})
        if "temperature" not in dot:
            raise SnapshotError(f"{self.path / MANIFEST}: domain {domain!r} has no dot.temperature; "
                                f"re-export it with this derl")
        return float(dot["temperature"])

    def ads_index(self, domain: str):
        """(faiss index over the domain's ad Pins, their Pin ids in index order). The id map
        names the version it was built for: an index from another version (another space) is
        refused rather than queried with these user vectors."""
        import faiss

        ids_table = pq.read_table(self.path / domain / "ads_ids.parquet")
        built_for = (ids_table.schema.metadata or {}).get(b"snapshot_version", b"").decode()
        if built_for != self.version:
            raise SnapshotError(
                f"{self.path / domain}: ad index built for version {built_for or '?'}, "
                f"not {self.version}: user vectors and index must come from one version"
            )
        index = faiss.read_index(str(self.path / domain / "ads.faiss"))
        return index, ids_table.column("pin_id").to_numpy()

    def retrieve_ads(self, domain: str, user_ids: np.ndarray, k: int):
        """Top-k ad Pins per user by inner product: ([n, k] Pin ids, [n, k] scores, missing
        users). Unknown users are refused by the caller's choice: they come back flagged.
        An index one wider than the vectors holds each ad's popularity prior in its last
        column (`derl export`); the queries then carry a 1 there."""
        vectors, missing = self.table(domain, "users").lookup(np.asarray(user_ids))
        index, ids = self.ads_index(domain)
        if index.d == self.dim + 1:
            vectors = np.column_stack([vectors, np.ones(len(vectors))])
        scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), scores, missing


# The upstream vectors a ranker can take, as "<domain>/<entity>"; the paper's ablation sets.
VECTOR_SETS: Dict[str, Tuple[str, ...]] = {
    "user": ("engagement/users",),
    "user_pin": ("engagement/users", "engagement/pins"),
    "all": ("engagement/users", "engagement/pins", "conversion/users", "conversion/pins"),
}


def cut_days(root: Path) -> List[Tuple[str, str]]:
    """(cut day, version) of every complete version, by cut day."""
    out = []
    for v in versions(root):
        manifest = json.loads((Path(root) / v / MANIFEST).read_text())
        out.append((manifest["cut_day"], v))
    return sorted(out)


class SnapshotJoin:
    """Point-in-time join of snapshot vectors onto event rows (a reader's `DenseJoin`).

    A row of day D gets the vectors of the version live on D: the newest whose cut day is <= D
    (it was built from data before D), never a later one. With `version` set, every row gets
    that version instead (scoring a ranker trained on N with N+1). Adds to the batch:
    `upstream` [n, k, d] (zeros where missing) and `upstream_missing` [n, k] (1.0 where the
    version does not hold the id), k = len(vectors). Every version is verified on first use and
    must have dimension `dim` (when given) and every domain the vectors name.
    """

    def __init__(self, root: Path, vectors: Sequence[str], version: Optional[str] = None,
                 dim: Optional[int] = None):
        self.root = Path(root)
        self.vectors = tuple(vectors)
        for v in self.vectors:
            domain, _, entity = v.partition("/")
            if entity not in ENTITIES:
                raise ValueError(f"vector {v!r}: expected <domain>/users or <domain>/pins")
        self.pinned = version
        self.timeline = cut_days(self.root)
        if not self.timeline:
            raise SnapshotError(f"{self.root}: no complete snapshot version")
        self.dim = dim
        self._snapshots: Dict[str, Snapshot] = {}
        self.rows_by_version: Dict[str, int] = {}

    def version_on(self, day: str) -> str:
        if self.pinned is not None:
            return self.pinned
        live = [v for cut, v in self.timeline if cut <= day]
        if not live:
            raise SnapshotError(
                f"{self.root}: no snapshot was live on {day} (the earliest is cut on "
                f"{self.timeline[0][0]}); train and evaluate on days from the first cut on")
        return live[-1]

    def snapshot(self, version: str) -> Snapshot:
        if version not in self._snapshots:
            snap = Snapshot(self.root, version)
            if self.dim is None:
                self.dim = snap.dim
            if snap.dim != self.dim:
                raise SnapshotError(f"{snap.path}: dimension {snap.dim}, but this ranker takes "
                                    f"vectors of dimension {self.dim}")
            for v in self.vectors:
                snap.table(*v.split("/"))  # refuses a missing domain, by name
            self._snapshots[version] = snap
        return self._snapshots[version]

    def __call__(self, rows: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        n = len(rows["user_id"])
        days = np.asarray(rows["day_start"], dtype="datetime64[s]").astype("datetime64[D]")
        out, missing = None, np.zeros((n, len(self.vectors)), dtype=np.float32)
        for day in np.unique(days):
            idx = np.flatnonzero(days == day)
            version = self.version_on(str(day))
            snap = self.snapshot(version)
            if out is None:
                out = np.zeros((n, len(self.vectors), snap.dim), dtype=np.float32)
            for j, v in enumerate(self.vectors):
                domain, entity = v.split("/")
                ids = rows["user_id" if entity == "users" else "pin_id"][idx]
                vectors, absent = snap.table(domain, entity).lookup(ids)
                out[idx, j], missing[idx, j] = vectors, absent
            self.rows_by_version[version] = self.rows_by_version.get(version, 0) + len(idx)
        if out is None:
            out = np.zeros((n, len(self.vectors), self.dim or 0), dtype=np.float32)
        return {"upstream": out, "upstream_missing": missing}
