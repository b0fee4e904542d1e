"""Full-ranking HR@K and NDCG@K with one target per user, on batched user x item score matrices.

    r = ranks(scores, targets, seen_rows, seen_items)   # 0-based rank of each target
    m = from_ranks(r)                                   # {"hr@5": ..., "ndcg@20": ...}

Every item 1..N is ranked (column 0, padding, never is); the user's earlier items are removed
from the ranking (set to -inf), the target itself excepted should it be among them. The rank is
the number of items scored above the target, plus the tied ones with a smaller id: exactly the
position a stable sort (or a topk on id-tie-broken scores) gives it, computed with one
comparison per matrix entry instead of a sort. HR@K = 1 if rank < K (= recall@K with one
target); NDCG@K = 1 / log2(rank + 2) if rank < K, else 0 (the ideal DCG is 1).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

CUTOFFS = (5, 10, 20)
NAMES = tuple(f"{m}@{k}" for m in ("hr", "ndcg") for k in CUTOFFS)


def ranks(scores: torch.Tensor, targets: torch.Tensor, seen_rows: Optional[torch.Tensor] = None,
          seen_items: Optional[torch.Tensor] = None, exact_below: Optional[int] = None) -> torch.Tensor:
    """[B] 0-based rank of targets[b] among items 1..N of scores[b] ([B, N + 1]; modified in place).

    exact_below: ties are resolved only where the target has fewer than this many items
    strictly above it (elsewhere the rank is at least exact_below, which is all HR@K and NDCG@K
    with K <= exact_below need, and it saves a pass over the matrix); None: everywhere.
    """
    scores = scores.float() if scores.dtype != torch.float32 else scores
    scores.nan_to_num_(nan=float("-inf"))
    t = scores.gather(1, targets[:, None])
    scores[:, 0] = float("-inf")
    if seen_rows is not None and len(seen_rows):
        scores[seen_rows, seen_items] = float("-inf")
    above = (scores > t).sum(1, dtype=torch.int64)
    rows = torch.arange(len(scores), device=scores.device)
    if exact_below is not None:
        rows = (above < exact_below).nonzero().squeeze(1)
    if len(rows):
        ids = torch.arange(scores.shape[1], device=scores.device)
        tg = targets[rows, None]
        ties = ((scores[rows] == t[rows]) & (ids[None, :] < tg)).sum(1, dtype=torch.int64)
        above[rows] += ties
    return above


def sums(r: torch.Tensor, ks: Iterable[int] = CUTOFFS) -> Dict[str, float]:
    """Per-metric sums over a batch of ranks (to add up over batches, then divide by the users)."""
    r = r.double()
    gain = 1.0 / torch.log2(r + 2.0)
    ks = tuple(ks)
    hits = {k: r < k for k in ks}
    return {**{f"hr@{k}": float(hits[k].sum()) for k in ks},
            **{f"ndcg@{k}": float((gain * hits[k]).sum()) for k in ks}}


def from_ranks(r: torch.Tensor, ks: Iterable[int] = CUTOFFS) -> Dict[str, float]:
    n = max(len(r), 1)
    return {k: v / n for k, v in sums(r, ks).items()}
