"""The point-in-time join: each event row gets the vectors of the version live on its day.

This is what keeps a downstream ranker honest: a row never sees vectors built from data after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from derl.datapipes.snapshots.reader import Snapshot
from derl.datapipes.snapshots.store import ENTITIES, SnapshotError, cut_days, resolve


def require_fits(snap: Snapshot, vectors: Sequence[str], dim: int, taker: str = "this ranker") -> None:
    """Refuse a version whose vectors a ranker (`taker`) cannot take: another dimension than
    `dim`, or a domain of `vectors` it lacks; each refusal names the version and `taker`."""
    if snap.dim != dim:
        raise SnapshotError(f"{snap.path}: dimension {snap.dim}, but {taker} takes vectors of dimension {dim}")
    for v in vectors:
        if v.split("/")[0] not in snap.manifest["domains"]:
            raise SnapshotError(f"{snap.path}: no {v} table (domains: {snap.domains}), but {taker} takes "
                                f"{', '.join(vectors)}")


def join_vectors(table: Callable[[str, str], object], vectors: Sequence[str], user_ids: np.ndarray,
                 pin_ids: np.ndarray, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """The join itself, for rows of (user, Pin): ([n, k, dim] vectors, zeros where missing;
    [n, k] float32 flags, 1.0 where the table lacks the id), k = len(vectors), each looked up in
    `table(domain, entity)` (an `EmbeddingTable`, or anything with its `lookup`). Training,
    `derl score` and `derl serve` all join through here."""
    out = np.zeros((len(user_ids), len(vectors), dim), dtype=np.float32)
    missing = np.zeros((len(user_ids), len(vectors)), dtype=np.float32)
    for j, v in enumerate(vectors):
        domain, entity = v.split("/")
        out[:, j], missing[:, j] = table(domain, entity).lookup(user_ids if entity == "users" else pin_ids)
    return out, missing


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
        if version is not None:
            resolve(self.root, version)  # a name that is no version of this root is refused now, by name
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

    def require_after_upstream(self, day: str) -> None:
        """The point-in-time rule, enforced: the version rows of `day` get was trained only on
        days before `day`. (A version cut on or before `day` always was; a pinned
        --snapshot-version may not be, and would hand a ranker vectors that saw its own
        training or evaluation day.)"""
        version = self.version_on(day)
        snap = self.snapshot(version)
        for domain in sorted({v.split("/")[0] for v in self.vectors}):
            trained = snap.manifest["domains"][domain].get("train_days")
            if trained and trained[1] >= day:
                raise SnapshotError(
                    f"snapshot {version}: its {domain} upstream trained on {trained[0]}..{trained[1]}, "
                    f"so its vectors have seen {day}; use them only on days after {trained[1]}")

    def snapshot(self, version: str) -> Snapshot:
        if version not in self._snapshots:
            snap = Snapshot(self.root, version)
            if self.dim is None:
                self.dim = snap.dim
            require_fits(snap, self.vectors, self.dim)
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
            out[idx], missing[idx] = join_vectors(snap.table, self.vectors, rows["user_id"][idx],
                                                  rows["pin_id"][idx], snap.dim)
            self.rows_by_version[version] = self.rows_by_version.get(version, 0) + len(idx)
        if out is None:
            out = np.zeros((n, len(self.vectors), self.dim or 0), dtype=np.float32)
        return {"upstream": out, "upstream_missing": missing}
