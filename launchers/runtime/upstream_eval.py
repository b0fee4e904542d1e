"""Upstream evaluation: does the user vector find the Pins the user engages with next?

On a day the model did not train on, for each task (save, click), every (user, Pin) pair with
that label is a query: the user's vector, as of the day's start, searches the whole catalogue of
Pins live that day, and recall@K is the share of pairs whose Pin is in the top K. The
popularity baseline answers every user with the K Pins most engaged with in the training window.

Recall rewards a space that finds what a user will engage with among all Pins, which popularity
alone goes a long way towards. The snapshot's vectors are also features of pointwise rankers, so
the evaluation also asks whether the user·Pin dot product ranks the day's impressions by what
came of them: `dot_auc_<task>`, the ROC-AUC of the dot among that day's organic impressions
(save, click) and ad impressions (ad_click). 0.5 means the dot knows nothing about affinity.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from derl.datapipes import schema as S
from derl.datapipes.features import FeatureJoiner
from derl.datapipes.sources import DayRange, SourceTables
from derl.launchers.runtime.dist import Worker
from derl.launchers.runtime.embedding import all_gather_rows, embed_chunks, rank_chunks
from derl.models.metrics import binary_metrics
from derl.models.retrieval import hits_at_k, topk_rows

EVAL_TASKS = {"save": (S.Action.SAVE,), "click": (S.Action.CLICK, S.Action.LONG_CLICK)}
RECALL_KS = (10, 50, 100)
# The dot-product AUC's tasks: saves and clicks among organic impressions, clicks among ad ones.
AUC_TASKS = ("save", "click", "ad_click")


def _positive_pairs(sources: SourceTables, day: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    t = sources.read("engagements", (day, day), columns=["user_id", "pin_id", "action"])
    action = t.column("action").to_numpy()
    users, pins = t.column("user_id").to_numpy(), t.column("pin_id").to_numpy()
    return {task: (users[np.isin(action, codes)], pins[np.isin(action, codes)])
            for task, codes in EVAL_TASKS.items()}


def _impressions(sources: SourceTables,
                 day: str) -> Tuple[np.ndarray, np.ndarray, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Every impression of the day, organic and ad: (user ids, Pin ids, task -> (row mask, label)).
    An organic row is one impression with its strongest action; an ad row one ad impression."""
    eng = sources.read("engagements", (day, day), columns=["user_id", "pin_id", "action"])
    columns = {"user_id": pa.int64(), "pin_id": pa.int64(), "clicked": pa.int8()}
    ads = (sources.read("ad_events", (day, day), columns=list(columns))
           if sources.has("ad_events") and day in sources.days("ad_events")
           else pa.table({c: pa.array([], t) for c, t in columns.items()}))  # no ad impressions that day
    n, m = eng.num_rows, ads.num_rows
    users = np.concatenate([eng.column("user_id").to_numpy(), ads.column("user_id").to_numpy()])
    pins = np.concatenate([eng.column("pin_id").to_numpy(), ads.column("pin_id").to_numpy()])
    action = eng.column("action").to_numpy()
    organic = np.arange(n + m) < n
    label = np.zeros(n + m, dtype=bool)
    tasks = {}
    for task, codes in EVAL_TASKS.items():
        tasks[task] = (organic, np.concatenate([np.isin(action, codes), label[n:]]))
    tasks["ad_click"] = (~organic, np.concatenate([label[:n], ads.column("clicked").to_numpy() > 0]))
    return users, pins, tasks


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
                    ks: Sequence[int] = RECALL_KS, temperature: float = 1.0,
                    pin_log_prior: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Collective. recall@K per task for `model` (a DERM, sharded or not) and for popularity.

    Retrieval ranks the catalogue by user·Pin / `temperature` + `pin_log_prior` (per row of
    `joiner`'s pins; None: by the dot alone): a model trained without the full logQ
    correction leaves (part of) each Pin's log popularity out of the dot, and the prior puts
    it back (`UpstreamConfig.retrieval_prior_weight`). The dot-product AUC uses the dot alone."""
    catalogue_ids = _live_pins(joiner, sources, day)
    chunks = rank_chunks(catalogue_ids, worker.rank, worker.world_size, batch_size)
    local = embed_chunks(lambda b: model.embed_pins(b.sparse, b.dense),
                         joiner.pin_batch, chunks, worker.device)
    ids = torch.from_numpy(np.concatenate([c[: n] for c, n in chunks])).to(worker.device)
    all_ids = all_gather_rows(ids).cpu().numpy()
    catalogue = all_gather_rows(local)
    order = np.argsort(all_ids)
    catalogue, all_ids = catalogue[torch.from_numpy(order).to(catalogue.device)], all_ids[order]
    scored = catalogue
    if pin_log_prior is not None:  # [v, 1]·[p/t, prior] = v·p/t + prior: one inner product
        prior = pin_log_prior[joiner.entities.pins.rows(all_ids)[0]]
        scored = torch.cat([catalogue / temperature,
                            torch.from_numpy(prior).to(catalogue).unsqueeze(1)], dim=1)

    pairs = _positive_pairs(sources, day)
    users = np.unique(np.concatenate([u for u, _ in pairs.values()]))
    seen_users, seen_pins, auc_tasks = _impressions(sources, day)
    everyone = np.union1d(users, seen_users)
    chunks = rank_chunks(everyone, worker.rank, worker.world_size, batch_size)
    my_all = np.concatenate([c[:n] for c, n in chunks])  # sorted: chunks are ordered slices
    all_vecs = embed_chunks(lambda b: model.embed_users(b.sparse, b.dense),
                            lambda u: joiner.user_batch(u, day), chunks, worker.device)
    queries = np.isin(my_all, users)  # recall's queries: users with a positive pair
    my_users = my_all[queries]
    user_vecs = all_vecs[torch.from_numpy(np.flatnonzero(queries)).to(all_vecs.device)]
    if pin_log_prior is not None:
        user_vecs = torch.cat([user_vecs, user_vecs.new_ones(len(user_vecs), 1)], dim=1)
    top = topk_rows(user_vecs, scored, max(ks)).cpu()
    popular = popular_pins(sources, train_days, max(ks))

    result: Dict[str, object] = {"day": day, "catalogue": len(all_ids), "users": len(users), "tasks": {}}
    result["dot_auc"] = _dot_auc(all_vecs, my_all, catalogue, all_ids, seen_users, seen_pins, auc_tasks)
    for task, (u, p) in pairs.items():
        mine = np.isin(u, my_users)
        target = np.searchsorted(all_ids, p[mine])
        in_catalogue = (target < len(all_ids)) & (all_ids[np.minimum(target, len(all_ids) - 1)] == p[mine])
        owners = np.searchsorted(my_users, u[mine])
        hits = hits_at_k(top, torch.from_numpy(np.where(in_catalogue, target, -1)),
                         torch.from_numpy(owners), ks)
        pop_pos = _positions(popular, p[mine])
        counts = torch.tensor([int(mine.sum())] + [hits[k] for k in ks]
                              + [int((pop_pos < k).sum()) for k in ks], dtype=torch.float64,
                              device=worker.device)  # nccl reduces device tensors only
        dist.all_reduce(counts)
        n = counts[0].item() or float("nan")  # no pairs: no recall, rather than a recall of 0
        result["tasks"][task] = {
            "pairs": int(counts[0].item()),
            **{f"recall@{k}": counts[1 + i].item() / n for i, k in enumerate(ks)},
            **{f"popularity_recall@{k}": counts[1 + len(ks) + i].item() / n for i, k in enumerate(ks)},
        }
    # A task without pairs that day (an imported log without saves) has no recall to average.
    scored_tasks = [t for t in result["tasks"].values() if t["pairs"]] or list(result["tasks"].values())
    for key in [f"recall@{k}" for k in ks] + [f"popularity_recall@{k}" for k in ks]:
        result[key] = float(np.mean([t[key] for t in scored_tasks]))
    for task, auc in result["dot_auc"].items():
        result[f"dot_auc_{task}"] = auc["auc"]
    return result


def _dot_auc(user_vecs: torch.Tensor, user_ids: np.ndarray, catalogue: torch.Tensor,
             pin_ids: np.ndarray, users: np.ndarray, pins: np.ndarray,
             tasks: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Dict[str, float]]:
    """Collective. ROC-AUC of the user·Pin dot among impressions, per task: each rank scores the
    impressions of its own users (`user_ids`, sorted, rows of `user_vecs`), the scores are
    gathered, and every rank computes the same AUC (torchrec.metrics, one window)."""
    u_row = np.minimum(np.searchsorted(user_ids, users), max(len(user_ids) - 1, 0))
    p_row = np.minimum(np.searchsorted(pin_ids, pins), max(len(pin_ids) - 1, 0))
    mine = np.zeros(len(users), dtype=bool)
    if len(user_ids) and len(pin_ids):
        mine = (user_ids[u_row] == users) & (pin_ids[p_row] == pins)
    rows = np.flatnonzero(mine)
    dot = (user_vecs[torch.from_numpy(u_row[rows]).to(user_vecs.device)]
           * catalogue[torch.from_numpy(p_row[rows]).to(catalogue.device)]).sum(dim=1)
    out = {}
    for task, (use, label) in tasks.items():
        keep = use[rows]
        local = torch.stack([dot[torch.from_numpy(keep).to(dot.device)].double(),
                             torch.from_numpy(label[rows][keep]).to(dot.device).double()], dim=1)
        both = all_gather_rows(local).cpu().numpy()
        if len(both) and 0 < both[:, 1].sum() < len(both):
            m = binary_metrics(1.0 / (1.0 + np.exp(-both[:, 0])), both[:, 1], task)
            out[task] = {"impressions": m["rows"], "positives": m["positives"], "auc": m["auc"]}
        else:
            out[task] = {"impressions": len(both), "positives": int(both[:, 1].sum()), "auc": float("nan")}
    return out
