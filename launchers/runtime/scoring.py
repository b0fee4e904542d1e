"""Scoring with a ranker: a day, shared by `derl train-downstream` (after training) and
`derl score` (a trained ranker reloaded), predictions per rank, then metrics on rank 0; and the
reload itself, shared by `derl score` and `derl serve`.

A sharded model's forward is collective, so every rank makes the same number of calls: ranks
with fewer batches repeat their last one, flagged not real (`_lockstep`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel

from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.snapshots import Snapshot, SnapshotJoin
from derl.datapipes.sources import SourceTables
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import finite, runs
from derl.models import checkpoint
from derl.models.downstream import Ranker, RankerConfig
from derl.models.metrics import ranker_metrics
from derl.models.sharding import OptimConfig, shard_model

SCORE_BATCH = 4096


def require_ad_events(sources: SourceTables) -> None:
    """The rankers train and score on ad impressions: an upstream-only world is refused."""
    if not sources.has("ad_events"):
        raise ValueError(f"{sources.root} has no ad_events: it is an upstream-only world (no ad impressions), "
                         f"for train-upstream, export and retrieve; the rankers need ad impressions")


def require_snapshot_world(join: SnapshotJoin, days: List[str], data: Path) -> None:
    """Every snapshot version a ranker joins on `days` comes from the world of `data` (its
    manifest's `world`, recorded by export): vectors of another world's ids are refused."""
    for version in sorted({join.version_on(d) for d in days}):
        manifest = Snapshot(join.root, version, check=False).manifest
        runs.require_world(f"snapshot {version} of {join.root}", manifest.get("world"), manifest.get("data"),
                           data)


def load_ranker(run: Path, device: torch.device) -> Tuple[DistributedModelParallel, RankerConfig]:
    """Collective. A trained ranker run's newest checkpoint, loaded into its model sharded over
    the process group (DCP reshards to any number of ranks), and the model's config. A coupled
    ranker's towers are rebuilt from the upstream runs that own its checkpoints
    (RUN/checkpoints/step-N -> RUN)."""
    meta = runs.read_config(run)
    model_cfg = runs.ranker_model_config(run)
    upstream = {d: runs.upstream_model_config(Path(c).parent.parent)
                for d, c in meta["coupled_checkpoints"].items()}
    dmp, optimizer, _ = shard_model(Ranker(model_cfg, torch.device("meta"), upstream), device, OptimConfig())
    checkpoint.load(runs.latest_checkpoint(run), dmp, optimizer)
    return dmp, model_cfg


def gathered(obj) -> list:
    """Every rank's `obj`, in rank order (collective)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summed(counts: Dict[str, int]) -> Dict[str, int]:
    """Every rank's counts, added up (collective)."""
    total: Dict[str, int] = {}
    for c in gathered(counts):
        for k, n in c.items():
            total[k] = total.get(k, 0) + n
    return total


def _lockstep(reader: ExampleReader, device: torch.device):
    """(batch, is_real), as many on every rank. (The reader does not drop the last partial
    batch, so a rank has ceil(rows / batch size) of them.)"""
    mine = -(-reader.num_rows // reader.config.batch_size)
    most = torch.tensor(mine, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    last = None
    for last in reader.batches(0):
        yield last, True
    for _ in range(int(most) - mine):
        yield last, False


@torch.no_grad()
def score(dmp, reader: ExampleReader, device: torch.device) -> Dict[str, np.ndarray]:
    """Collective. This rank's evaluation rows, scored: ids, labels, pCTR, pCVR (with a CVR
    head), flags."""
    cols: Dict[str, List[np.ndarray]] = {}
    for batch, real in _lockstep(reader, device):
        _, out = dmp(batch.to(device))
        if not real:
            continue
        row = {"request_id": batch.meta["request_id"], "user_id": batch.meta["user_id"],
               "pin_id": batch.meta["pin_id"], "clicked": batch.labels["clicked"],
               "converted": batch.labels["converted"], "p_ctr": out["ctr"]}
        if "cvr" in out:  # a ranker without a CVR head scores CTR only
            row["p_cvr"] = out["cvr"]
        if "upstream_missing" in batch.dense:
            row["missing"] = batch.dense["upstream_missing"]
        for k, v in row.items():
            cols.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def score_and_report(dmp, worker: derl_dist.Worker, data: Path, eval_day: str, vocab: Dict[str, int],
                     make_join: Optional[Callable[[], SnapshotJoin]], out: Path,
                     summary: Dict[str, object]) -> Dict[str, object]:
    """Collective. Score `eval_day` with the (trained or loaded) ranker, each rank writing its
    part of OUT/predictions; rank 0 computes the metrics and writes OUT/metrics.json."""
    dmp.eval()
    join = make_join() if make_join else None
    reader = ExampleReader(data, "ad_events", (eval_day, eval_day), worker.rank, worker.world_size,
                           ReaderConfig(batch_size=SCORE_BATCH, shuffle_buffer=0), vocab,
                           [join] if join else [])
    t0 = time.perf_counter()
    rows = score(dmp, reader, worker.device)
    for column in ("p_ctr", "p_cvr"):  # every rank checks both: the check is collective
        finite.require_finite(f"{out}: the ranker's {column} on {eval_day}",
                              rows.get(column, np.zeros(0)), worker.device)
    seconds = derl_dist.reduced(time.perf_counter() - t0, "max", worker.device)
    runs.write_predictions(out, worker.rank, rows)
    eval_versions = summed(dict(join.rows_by_version) if join else {})
    eval_stats = gathered(reader.stats.as_dict())
    dist.barrier()
    if not worker.is_main:
        return {}
    preds = runs.read_predictions(out)
    metrics = {**summary, "eval_versions": eval_versions,
               "score_examples_per_s": len(preds["p_ctr"]) / seconds,
               "eval": ranker_metrics(preds), "data_repairs_eval": eval_stats}
    runs.write_json(out / runs.METRICS, metrics)
    e = metrics["eval"]
    cvr = f"CVR NE {e['cvr'].get('ne', float('nan')):.4f}" if "cvr" in e else "no CVR head (no conversions)"
    print(f"{summary['upstream']}: CTR NE {e['ctr']['ne']:.4f} AUC {e['ctr']['auc']:.4f}, {cvr} on {eval_day}"
          f"{' with ' + ', '.join(eval_versions) if eval_versions else ''}; metrics in {out / runs.METRICS}")
    return metrics
