"""Daily refresh of a snapshot: align the new vectors onto the previous version, then smooth.

The paper smooths each entity's vector over days, E(t) = w·E(t−1) + (1−w)·E_daily(t). When the
upstream model was retrained in between, E_daily(t) lives in another space and the average
mixes two spaces. So first an orthogonal Procrustes rotation R = argmin ||E_daily R − E(t−1)||
is fitted on the entities both versions hold (each rank adds its share of the d×d cross
product; one all-reduce; every rank takes the same SVD), applied, and only then averaged.
R and the drift it removed (mean cosine between versions before and after) go into the manifest.
Each rank rewrites only its own parts, in the version being written.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

from derl.datapipes.snapshots.parts import read_part, write_part
from derl.datapipes.snapshots.reader import Snapshot
from derl.datapipes.snapshots.store import ENTITIES, SnapshotError
from derl.datapipes.snapshots.writer import SnapshotWriter

ALIGNMENT = "alignment.npy"  # <version>/<domain>/alignment.npy: R, d×d float32


def procrustes(cross: np.ndarray) -> np.ndarray:
    """The orthogonal R minimising ||A R − B||_F, given cross = Aᵀ B."""
    u, _, vt = np.linalg.svd(cross)
    return u @ vt


def _sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def refresh_domain(writer: SnapshotWriter, previous: Snapshot, domain: str, rank: int, weight: float,
                   align: bool, device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    """Collective. Rewrite this rank's parts of `domain` in `writer`'s version as aligned,
    smoothed vectors; return what was done, for the manifest. `device`: where the collective's
    tensors go (the process group's backend decides)."""
    if domain not in previous.domains:
        raise SnapshotError(f"{previous.path}: no {domain} vectors to smooth with")
    dim = previous.dim
    new, old = {}, {}
    cross, cos_before, shared = np.zeros((dim, dim)), 0.0, 0
    for entity in ENTITIES:
        ids, vectors = read_part(writer.part(domain, entity, rank))
        if vectors.shape[1] != previous.dim:
            raise SnapshotError(f"previous version {previous.version} has dimension {previous.dim}, "
                                f"the new vectors {vectors.shape[1]}")
        vectors = vectors.astype(np.float64)
        prev, missing = previous.table(domain, entity).lookup(ids)
        both = ~missing
        new[entity], old[entity] = (ids, vectors), (prev.astype(np.float64), both)
        cross += vectors[both].T @ prev[both]
        cos_before += float(np.sum(vectors[both] * prev[both]))
        shared += int(both.sum())
    cross = _sum(cross, device)
    cos_before, shared = _sum(np.array([cos_before, shared]), device)
    rotation = procrustes(cross) if align else np.eye(dim)
    cos_after = 0.0
    for entity in ENTITIES:
        ids, vectors = new[entity]
        prev, both = old[entity]
        aligned = vectors @ rotation
        cos_after += float(np.sum(aligned[both] * prev[both]))
        smoothed = np.where(both[:, None], weight * prev + (1 - weight) * aligned, aligned)
        smoothed /= np.maximum(np.linalg.norm(smoothed, axis=1, keepdims=True), 1e-12)
        write_part(writer.part(domain, entity, rank), ids, smoothed)
    cos_after = float(_sum(np.array([cos_after]), device)[0])
    if rank == 0 and align:
        np.save(writer.folder / domain / ALIGNMENT, rotation.astype(np.float32))
    n = max(shared, 1.0)
    return {
        "previous_version": previous.version,
        "weight": weight,
        "aligned": align,
        "shared_entities": int(shared),
        "mean_cosine_before_alignment": cos_before / n,
        "mean_cosine_after_alignment": cos_after / n,
    }
