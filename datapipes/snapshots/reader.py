"""Opening a snapshot version: verified first, then its tables and ad indexes on demand.

Lookups are vectorised: ids -> rows by binary search over a sorted id array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from derl.datapipes.snapshots.index import read_ad_ids, read_ads_index
from derl.datapipes.snapshots.parts import part_paths, read_parts
from derl.datapipes.snapshots.store import (ENTITIES, MANIFEST, SnapshotError, check_finite, plain_name, read_manifest,
                                            resolve, verify)


class EmbeddingTable:
    """One snapshot table in memory: sorted ids and a [n, d] float32 matrix."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.ids, self.vectors = ids[order], np.ascontiguousarray(vectors[order])

    @classmethod
    def read(cls, folder: Path, dim: int) -> "EmbeddingTable":
        return cls(*read_parts(part_paths(folder), dim))

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
        self.manifest = verify(self.path) if check else read_manifest(self.path)
        self.version = self.manifest["version"]
        self.dim = self.manifest["dim"]
        self._tables: Dict[Tuple[str, str], EmbeddingTable] = {}

    @property
    def domains(self) -> List[str]:
        return sorted(self.manifest["domains"])

    def _folder(self, domain: str, entity: str = "") -> Path:
        """The folder of a domain (or one of its tables) that the manifest names: never a path
        the caller makes up."""
        if domain not in self.manifest["domains"] or (entity and entity not in ENTITIES):
            raise SnapshotError(f"{self.path}: no {domain}{'/' + entity if entity else ''} table "
                                f"(domains: {self.domains})")
        return self.path / plain_name(domain, "domain") / entity

    def table(self, domain: str, entity: str) -> EmbeddingTable:
        """One table, its vectors checked finite as they are read (verified or not)."""
        key = (domain, entity)
        if key not in self._tables:
            table = EmbeddingTable.read(self._folder(domain, entity), self.dim)
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
        """The domain's ad Pin ids in index order. The id map names the version it was built
        for: an index from another version (another space) is refused rather than queried with
        these user vectors."""
        ids, built_for = read_ad_ids(self._folder(domain))
        if built_for != self.version:
            raise SnapshotError(
                f"{self.path / domain}: ad index built for version {built_for or '?'}, "
                f"not {self.version}: user vectors and index must come from one version"
            )
        return ids

    def ads_index(self, domain: str, k: int = 0):
        """(faiss index over the domain's ad Pins, good for top-k searches; their Pin ids in
        index order, as many as the index holds)."""
        ids = self.ad_ids(domain)
        index = read_ads_index(self._folder(domain), k)
        if index.ntotal != len(ids):
            raise SnapshotError(f"{self.path / domain}: the ad index holds {index.ntotal} ads, its id map {len(ids)}")
        return index, ids

    def retrieve_ads(self, domain: str, user_ids: np.ndarray, k: int):
        """Top-k ad Pins per user by inner product: ([n, k'] Pin ids, [n, k'] scores, missing
        users), k' = k or the whole catalogue when it is smaller: only real ads, never a
        placeholder id. An empty index and k < 1 are refused. Unknown users come back flagged.
        An index one wider than the vectors holds each ad's popularity prior in its last
        column (`derl export`); the queries then carry a 1 there."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors, missing = self.table(domain, "users").lookup(np.asarray(user_ids))
        index, ids = self.ads_index(domain, k)
        if not len(ids):
            raise SnapshotError(f"{self.path / domain}: the ad index is empty: version {self.version} "
                                f"holds no ads for {domain}")
        if index.d == self.dim + 1:
            vectors = np.column_stack([vectors, np.ones(len(vectors))])
        scores, rows = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(ids)))
        if (rows < 0).any():
            raise SnapshotError(f"{self.path / domain}: the ad index returned fewer ads than it holds")
        return ids[rows], scores, missing
