"""Opening a snapshot version: it holds that one version for its life, verified first, then its
tables and ad indexes read on demand.

Why it holds the folder: `derl export --overwrite` swaps a new folder in under the same name
and gc removes old ones, at any time; a reader that read its files by path one after another
could mix two versions (the users of one, the ad index of the other) without a word. So
`Snapshot` resolves its version once, opens that folder once (`store.Folder`: one descriptor,
with a shared flock) and reads every file through that descriptor: a swap renames the folder
but not what the descriptor names, and gc and the writer never remove a folder a reader holds
(they need the flock exclusively; a replaced version a reader holds is moved aside for a later
gc). `close()` (or the end of a `with` block, or garbage collection) lets it go.

Lookups are vectorised: ids -> rows by binary search over a sorted id array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from derl.datapipes.snapshots.index import deepen, read_ad_ids, read_ads_index
from derl.datapipes.snapshots.store import (ADS_IDS, ADS_INDEX, ENTITIES, LATEST, MANIFEST, Folder, SnapshotError,
                                            check_finite, plain_name, read_manifest, resolve, verify)

OPEN_TRIES = 3  # a version removed between naming it and holding it is named again (LATEST moved on)


class EmbeddingTable:
    """One snapshot table in memory: sorted ids and a [n, d] float32 matrix."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.ids, self.vectors = ids[order], np.ascontiguousarray(vectors[order])

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray, default: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """([len(ids), d] vectors, [len(ids)] missing flags); missing ids get `default` (zeros)."""
        dim = self.vectors.shape[1]
        if not len(self.ids):
            missing = np.ones(len(ids), dtype=bool)
            return np.broadcast_to(default if default is not None else np.zeros(dim, np.float32),
                                   (len(ids), dim)).copy(), missing
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        missing = self.ids[pos] != ids
        out = self.vectors[pos].copy()
        out[missing] = default if default is not None else 0.0
        return out, missing


def _hold(root: Path, version: Optional[str]) -> Folder:
    """The version's folder, opened and held (module docstring). One removed before the hold
    took (gc, or the old side of a swap) is resolved again."""
    for _ in range(OPEN_TRIES):
        path = resolve(root, version)
        try:
            folder = Folder(path, shared=True)
        except FileNotFoundError:
            continue
        if not folder.removed():
            return folder
        folder.close()
    raise SnapshotError(f"{Path(root) / (version or LATEST)}: removed {OPEN_TRIES} times while being "
                        f"opened; open it again")


class Snapshot:
    """A verified snapshot version: its manifest, its tables and its ad indexes, all read from
    the one folder it holds until `close` (module docstring)."""

    def __init__(self, root: Path, version: Optional[str] = None, check: bool = True):
        self._held = _hold(Path(root), version)
        self.path = self._held.path
        try:
            self.manifest = verify(self._held) if check else read_manifest(self._held)
        except BaseException:
            self.close()
            raise
        self.version = self.manifest["version"]
        self.dim = self.manifest["dim"]
        self._tables: Dict[Tuple[str, str], EmbeddingTable] = {}
        self._indexes: Dict[str, tuple] = {}

    def close(self) -> None:
        """Let the version go: gc may remove it from now on."""
        self._held.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def domains(self) -> List[str]:
        return sorted(self.manifest["domains"])

    def _domain(self, domain: str, entity: str = "") -> str:
        """A domain (or one of its tables) that the manifest names: never a path the caller
        makes up."""
        if domain not in self.manifest["domains"] or (entity and entity not in ENTITIES):
            raise SnapshotError(f"{self.path}: no {domain}{'/' + entity if entity else ''} table "
                                f"(domains: {self.domains})")
        return plain_name(domain, "domain")

    def table(self, domain: str, entity: str) -> EmbeddingTable:
        """One table, its vectors checked finite as they are read (verified or not)."""
        key = (domain, entity)
        if key not in self._tables:
            table = EmbeddingTable(*self._held.read_parts(self._domain(domain, entity), entity, self.dim))
            check_finite(f"{self.path}: {domain}/{entity}", table.vectors)
            self._tables[key] = table
        return self._tables[key]

    def dot_temperature(self, domain: str) -> float:
        """The temperature of the upstream model whose vectors the domain holds: dot / it is that
        model's logit, the scale a ranker takes the user·Pin dot on (`Ranker`'s wide path)."""
        dot = self.manifest["domains"].get(domain, {}).get("dot", {})
        if "temperature" not in dot:
            raise SnapshotError(f"{self.path / MANIFEST}: domain {domain!r} has no dot.temperature; "
                                f"re-export it with this derl")
        return float(dot["temperature"])

    def ad_ids(self, domain: str) -> np.ndarray:
        """The domain's ad Pin ids in index order."""
        return self.ads_index(domain)[1]

    def ads_index(self, domain: str, k: int = 0):
        """(faiss index over the domain's ad Pins, good for top-k searches; their Pin ids in
        index order, as many as the index holds), read once. The id map names the version it
        was built for: an index from another version (another space) is refused rather than
        queried with these user vectors."""
        if domain not in self._indexes:
            name = self._domain(domain)
            with self._held.open(f"{name}/{ADS_IDS}") as f:
                ids, built_for = read_ad_ids(f)
            if built_for != self.version:
                raise SnapshotError(f"{self.path / domain}: ad index built for version {built_for or '?'}, "
                                    f"not {self.version}: user vectors and index must come from one version")
            with self._held.open(f"{name}/{ADS_INDEX}") as f:
                index = read_ads_index(f)
            if index.ntotal != len(ids):
                raise SnapshotError(f"{self.path / domain}: the ad index holds {index.ntotal} ads, "
                                    f"its id map {len(ids)}")
            self._indexes[domain] = (index, ids)
        index, ids = self._indexes[domain]
        deepen(index, k)
        return index, ids

    def retrieve_ads(self, domain: str, user_ids: np.ndarray, k: int):
        """Top-k ad Pins per user by inner product: ([n, k'] Pin ids, [n, k'] scores, missing
        users), k' = k or the whole catalogue when it is smaller: only real ads, never a
        placeholder id. An empty index and k < 1 are refused. Unknown users come back flagged.
        An index one wider than the vectors holds each ad's popularity prior in its last
        column (`derl export`); the queries then carry a 1 there."""
        vectors, missing = self.table(domain, "users").lookup(np.asarray(user_ids))
        pins, scores = self.search_ads(domain, vectors, k)
        return pins, scores, missing

    def search_ads(self, domain: str, vectors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Top-k ad Pins per user vector ([n, dim], this version's space: from its users table,
        or from the online store that holds this version): ([n, k'] Pin ids, [n, k'] scores), as
        `retrieve_ads` describes."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        index, ids = self.ads_index(domain, k)
        if not len(ids):
            raise SnapshotError(f"{self.path / domain}: the ad index is empty: version {self.version} "
                                f"holds no ads for {domain}")
        if index.d == self.dim + 1:
            vectors = np.column_stack([vectors, np.ones(len(vectors))])
        scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(ids)))
        if (rows < 0).any():
            raise SnapshotError(f"{self.path / domain}: the ad index returned fewer ads than it holds")
        return ids[rows], scores
