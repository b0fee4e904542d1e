"""Embedding many entities with a sharded model: every rank its own share, in lockstep.

A sharded model's forward is collective (its input and output distributions talk to every
rank), so all ranks must make the same number of calls with the same batch size. `rank_chunks`
cuts an id list so that they do: each rank gets as many equally sized chunks, the last ones
padded by repeating an id, and the padding is cut off again after the forward.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from derl.datapipes.batch import Batch

Chunk = Tuple[np.ndarray, int]  # (ids padded to the common size, how many are real)


def rank_chunks(ids: np.ndarray, rank: int, world_size: int, batch_size: int) -> List[Chunk]:
    per_rank = max(1, -(-len(ids) // (world_size * batch_size)))
    size = max(1, -(-len(ids) // (world_size * per_rank)))
    chunks = []
    for i in range(rank, world_size * per_rank, world_size):
        real = ids[i * size : (i + 1) * size]
        pad = np.full(size - len(real), ids[-1] if len(ids) else 0, dtype=ids.dtype)
        chunks.append((np.concatenate([real, pad]), len(real)))
    return chunks


@torch.no_grad()
def embed_chunks(embed: Callable[[Batch], torch.Tensor], make_batch: Callable[[np.ndarray], Batch],
                 chunks: List[Chunk], device: torch.device) -> torch.Tensor:
    """[sum of real ids, d]: `embed(make_batch(ids))` for each chunk, padding removed."""
    out = [embed(make_batch(ids).to(device))[:real] for ids, real in chunks]
    return torch.cat(out) if out else torch.zeros(0)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows, in rank order (rows of different counts allowed)."""
    world = dist.get_world_size()
    if world == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.size(0)], device=local.device))
    most = int(max(c.item() for c in counts))
    padded = torch.zeros(most, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: local.size(0)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])
