"""Upstream evaluation: does the user vector find the Pins the user engages with next?

On a day the model did not train on, for each task (save, click), every (user, Pin) pair with
that label is a query: the user's vector, as of the day's start, searches the whole catalogue of
Pins live that day, and recall@K is the share of pairs whose Pin is in the top K. The
popularity baseline answers every user with the K Pins most engaged with in the training window.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from derl.datapipes import schema as S
from derl.datapipes.features import FeatureJoiner
from derl.datapipes.sources import DayRange, SourceTables
from derl.launchers.dist import Worker
from derl.launchers.embedding import all_gather_rows, embed_chunks, rank_chunks
from derl.models.retrieval import hits_at_k, topk_rows

EVAL_TASKS = {"save": (S.Action.SAVE,), "click": (S.Action.CLICK, S.Action.LONG_CLICK)}
KS = (10, 50, 100)


def _positive_pairs(sources: SourceTables, day: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    t = sources.read("engagements", (day, day), columns=["user_id", "pin_id", "action"])
    action = t.column("action").to_numpy()
    users, pins = t.column("user_id").to_numpy(), t.column("pin_id").to_numpy()
    return {task: (users[np.isin(action, codes)], pins[np.isin(action, codes)])
            for task, codes in EVAL_TASKS.items()}


def popular_pins(sources: SourceTables, days: DayRange, k: int) -> np.ndarray:
    """The k Pins with the most positive engagements (anything but impression and hide)."""
    t = sources.read("engagements", days, columns=["pin_id", "action"])
    positive = pc.and_(pc.not_equal(t.column("action"), S.Action.IMPRESSION),
                       pc.not_equal(t.column("action"), S.Action.HIDE))
    pins = pc.filter(t.column("pin_id"), positive).to_numpy()
    ids, counts = np.unique(pins, return_counts=True)
    return ids[np.argsort(-counts, kind="stable")[:k]]


def _live_pins(joiner: FeatureJoiner, sources: SourceTables, day: str) -> np.ndarray:
    created = sources.read("pins", columns=["pin_id", "created_ds"])
    live = pc.less_equal(created.column("created_ds"), pc.strptime(day, "%Y-%m-%d", "s").cast("date32"))
    return np.sort(pc.filter(created.column("pin_id"), live).to_numpy())


def _positions(ranked: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in `ranked`, len(ranked) where absent."""
    order = np.argsort(ranked)
    pos = np.minimum(np.searchsorted(ranked[order], ids), len(ranked) - 1)
    return np.where(ranked[order][pos] == ids, order[pos], len(ranked))


@torch.no_grad()
def evaluate_recall(model: torch.nn.Module, joiner: FeatureJoiner, sources: SourceTables,
                    day: str, train_days: DayRange, worker: Worker, batch_size: int = 2048,
                    ks: Sequence[int] = KS) -> Dict[str, object]:
    """Collective. recall@K per task for `model` (a DERM, sharded or not) and for popularity."""
    catalogue_ids = _live_pins(joiner, sources, day)
    chunks = rank_chunks(catalogue_ids, worker.rank, worker.world_size, batch_size)
    local = embed_chunks(lambda b: model.embed_pins(b.sparse, b.dense["content_emb"]),
                         joiner.pin_batch, chunks, worker.device)
    ids = torch.from_numpy(np.concatenate([c[: n] for c, n in chunks])).to(worker.device)
    all_ids = all_gather_rows(ids).cpu().numpy()
    catalogue = all_gather_rows(local)
    order = np.argsort(all_ids)
    catalogue, all_ids = catalogue[torch.from_numpy(order).to(catalogue.device)], all_ids[order]

    pairs = _positive_pairs(sources, day)
    users = np.unique(np.concatenate([u for u, _ in pairs.values()]))
    chunks = rank_chunks(users, worker.rank, worker.world_size, batch_size)
    my_users = np.concatenate([c[:n] for c, n in chunks])
    user_vecs = embed_chunks(lambda b: model.embed_users(b.sparse, b.dense["seq_content"]),
                             lambda u: joiner.user_batch(u, day), chunks, worker.device)
    top = topk_rows(user_vecs, catalogue, max(ks)).cpu()
    popular = popular_pins(sources, train_days, max(ks))

    result: Dict[str, object] = {"day": day, "catalogue": len(all_ids), "users": len(users), "tasks": {}}
    for task, (u, p) in pairs.items():
        mine = np.isin(u, my_users)
        target = np.searchsorted(all_ids, p[mine])
        in_catalogue = (target < len(all_ids)) & (all_ids[np.minimum(target, len(all_ids) - 1)] == p[mine])
        owners = np.searchsorted(my_users, u[mine])
        hits = hits_at_k(top, torch.from_numpy(np.where(in_catalogue, target, -1)),
                         torch.from_numpy(owners), ks)
        pop_pos = _positions(popular, p[mine])
        counts = torch.tensor([int(mine.sum())] + [hits[k] for k in ks]
                              + [int((pop_pos < k).sum()) for k in ks], dtype=torch.float64)
        dist.all_reduce(counts)
        n = max(counts[0].item(), 1.0)
        result["tasks"][task] = {
            "pairs": int(counts[0].item()),
            **{f"recall@{k}": counts[1 + i].item() / n for i, k in enumerate(ks)},
            **{f"popularity_recall@{k}": counts[1 + len(ks) + i].item() / n for i, k in enumerate(ks)},
        }
    for key in [f"recall@{k}" for k in ks] + [f"popularity_recall@{k}" for k in ks]:
        result[key] = float(np.mean([t[key] for t in result["tasks"].values()]))
    return result
