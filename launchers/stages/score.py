"""`derl score`: a trained ranker, reloaded, scores a day with the snapshot version of your choice.

    derl score --run RANKER_RUN --out DIR [--snapshot-version V] [--eval-day DAY] [--nproc N]

E.g. a ranker trained on version N scored with N+1, raw or aligned. The checkpoint loads on
any number of ranks (DCP reshards). Writes what a training run's report writes: DIR/predictions
and DIR/metrics.json (with `rescored_from`), through `scoring.score_and_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from derl.datapipes.snapshots import SnapshotJoin
from derl.datapipes.sources import SourceTables
from derl.datapipes.world import read_world_id
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import runs, scoring
from derl.launchers.runtime.settings import ScoreConfig

# What a rescored run keeps of its training run's metrics.
TRAINING_SUMMARY = ("upstream", "vectors", "projection_dim", "steps", "train_days", "train_examples_per_s",
                    "snapshot_dim", "coupled_checkpoints", "snapshot_versions")


def validate(cfg: ScoreConfig) -> None:
    """Before any worker: a finished ranker run, and data and snapshot versions of its world."""
    if not (cfg.ranker / runs.CONFIG).is_file() or runs.latest_checkpoint(cfg.ranker) is None:
        raise FileNotFoundError(f"--run {cfg.ranker}: not a finished ranker run (config.json, checkpoints)")
    meta = runs.kind_of(cfg.ranker, runs.RANKER, f"--run {cfg.ranker}")
    data = Path(cfg.data or meta["data"])
    if cfg.data is not None:  # the run's own data had ad impressions to train on
        scoring.require_ad_events(SourceTables(data))
        runs.require_world(f"--run {cfg.ranker}", meta.get("world"), meta["data"], data)
    runs.claim(cfg, runs.SCORES)
    snapshots = cfg.snapshots or meta["snapshots"]
    if meta["upstream"] == "snapshot" and snapshots:
        join = SnapshotJoin(Path(snapshots), meta["model"]["vectors"], cfg.snapshot_version)
        scoring.require_snapshot_world(join, [cfg.eval_day or meta["eval_day"]], data)


def run(cfg: ScoreConfig) -> Dict[str, object]:
    """One worker's part of the scoring (every rank runs this)."""
    return derl_dist.run_as_worker(_run, cfg)


def _run(cfg: ScoreConfig, worker: derl_dist.Worker) -> Dict[str, object]:
    meta = runs.read_config(cfg.ranker)
    dmp, model_cfg = scoring.load_ranker(cfg.ranker, worker.device)
    snapshots = cfg.snapshots or (Path(meta["snapshots"]) if meta["snapshots"] else None)
    trained = runs.read_metrics(cfg.ranker)
    summary = {k: trained[k] for k in TRAINING_SUMMARY}
    eval_day = cfg.eval_day or meta["eval_day"]
    summary.update(world_size=worker.world_size, eval_day=eval_day, rescored_from=str(cfg.ranker))
    data = Path(cfg.data or meta["data"])
    if worker.is_main:
        runs.start(cfg, runs.SCORES, {"ranker": str(cfg.ranker), "eval_day": eval_day, "data": str(data),
                                      "world": read_world_id(data)})
    join = None
    if model_cfg.upstream == "snapshot":  # opened (and verified) once, for the check and the scoring
        join = SnapshotJoin(snapshots, model_cfg.vectors, cfg.snapshot_version, model_cfg.upstream_dim)
        join.require_after_upstream(eval_day)
    make_join = (lambda: join) if join else None
    # The model's own table sizes: ids the scoring day adds beyond them are hashed and counted.
    return scoring.score_and_report(dmp, worker, data, eval_day, dict(model_cfg.num_embeddings), make_join,
                                    cfg.out, summary)
