"""Retrieval metrics: recall@K of held-out engagements under full-catalogue search."""

from __future__ import annotations

from typing import Dict, Sequence

import torch


def topk_rows(queries: torch.Tensor, catalogue: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """[n, k] catalogue rows with the largest inner product, exact, in query chunks."""
    k = min(k, catalogue.size(0))
    return torch.cat(
        [(q @ catalogue.T).topk(k, dim=1).indices for q in queries.split(chunk)]
    ) if len(queries) else torch.zeros(0, k, dtype=torch.long)


def hits_at_k(top: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor,
              ks: Sequence[int]) -> Dict[int, int]:
    """For (query `owners[i]`, catalogue row `targets[i]`) pairs: how many have the target among
    the query's first k results, for each k."""
    rank_of = top[owners] == targets.unsqueeze(1)  # [pairs, kmax]
    return {k: int(rank_of[:, :k].any(dim=1).sum()) for k in ks}
