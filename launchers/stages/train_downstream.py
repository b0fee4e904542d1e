"""`derl train-downstream`: train a CTR/CVR ranker on ad impressions, with or without upstream.

    derl train-downstream --data WORLD --snapshots SNAP --out RUN --upstream snapshot [--nproc N]
    torchrun --nproc_per_node N -m derl.launchers.cli train-downstream --data WORLD ...

`--upstream none` is the baseline, `snapshot` joins each impression with the snapshot version
live on its day (point in time), `coupled` runs the upstream towers of that version's checkpoints
inside the ranker and fine-tunes them. All three train on the split's downstream days and are
scored on its evaluation day, which nothing trained on. Writes RUN/config.json, RUN/checkpoints/
(DCP), RUN/predictions/part-*.parquet (one scored row per evaluation impression),
RUN/metrics.json (torchrec.metrics per task, throughput, snapshot versions used, data repairs)
and RUN/train_ne.json (windowed training NE per step); pins the versions it used in SNAP/pins/.
`build` makes the sharded ranker and its reader, `train_loop` runs the steps, and the report
is `scoring.score_and_report`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

from derl.datapipes.domains import DOMAINS, supported, vector_sets
from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.snapshots import SnapshotJoin, pin
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import read_world_id
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import finite, runs, scoring
from derl.launchers.runtime.settings import TrainDownstreamConfig, settings_of
from derl.models import checkpoint
from derl.models.downstream import TASKS, Ranker, RankerConfig, RankerSettings, dot_pairs
from derl.models.sharding import OptimConfig, describe_plan, shard_model

NE_EVERY = 5  # steps between training-NE points (a collective)


def validate(cfg: TrainDownstreamConfig) -> None:
    """Configuration errors, caught before any worker starts."""
    if cfg.upstream != "none" and cfg.snapshots is None:
        raise ValueError(f"--upstream {cfg.upstream} needs --snapshots")
    sources = SourceTables(cfg.data)
    scoring.require_ad_events(sources)
    if cfg.upstream != "none":
        lacking = sorted({v.split("/")[0] for v in cfg.vector_names} - set(supported(sources)))
        if lacking:
            raise ValueError(f"--vectors {cfg.vectors} takes {', '.join(lacking)} vectors, which {cfg.data} "
                             f"has no domain for: {DOMAINS[lacking[0]].unsupported(sources)}; use --vectors "
                             f"{' or '.join(vector_sets(supported(sources)))}")
    runs.claim(cfg, runs.RANKER)
    if cfg.snapshots is not None and cfg.upstream != "none":
        join = SnapshotJoin(cfg.snapshots, cfg.vector_names, cfg.snapshot_version)
        days, eval_day = _days(cfg, sources)
        used = [d for d in sources.days("ad_events") if days[0] <= d <= days[1]] + [eval_day]
        scoring.require_snapshot_world(join, used, cfg.data)
    sources.units("ad_events")


def ranker_tasks(sources: SourceTables) -> Tuple[str, ...]:
    """CTR and CVR, or CTR alone where no ad impression ever converted (no CVR head)."""
    return TASKS if sources.has_positive("ad_events", "converted") else TASKS[:1]


def _days(cfg: TrainDownstreamConfig, sources: SourceTables) -> Tuple[Tuple[str, str], str]:
    split = default_split(sources.days("engagements"))
    days = (cfg.from_day or split.downstream_days[0], cfg.until or split.downstream_days[1])
    eval_day = cfg.eval_day or split.eval_day
    if eval_day <= days[1]:
        raise ValueError(f"--eval-day {eval_day} is not after the training days {days[0]}..{days[1]}")
    return days, eval_day


def _priors(sources: SourceTables, days: Tuple[str, str]) -> Dict[str, float]:
    """CTR, and CVR given a click, of the training days: where the heads start."""
    t = sources.read("ad_events", days, columns=["clicked", "converted"])
    clicks = float(np.sum(t.column("clicked").to_numpy()))
    conversions = float(np.sum(t.column("converted").to_numpy()))
    clip = lambda x: float(np.clip(x, 1e-4, 1 - 1e-4))  # noqa: E731
    return {"ctr_prior": clip(clicks / max(t.num_rows, 1)), "cvr_prior": clip(conversions / max(clicks, 1))}


def model_config(cfg: TrainDownstreamConfig, vocab: Dict[str, int], join: Optional[SnapshotJoin],
                 days: Tuple[str, str], sources: SourceTables) -> Tuple[RankerConfig, Dict[str, object]]:
    """The ranker config, and for coupled mode the upstream DERM configs and checkpoints."""
    common = dict(num_embeddings=vocab, **settings_of(cfg, RankerSettings), **_priors(sources, days),
                  tasks=ranker_tasks(sources))
    if cfg.upstream == "none":
        return RankerConfig(**common), {}
    vectors = cfg.vector_names
    snap = join.snapshot(join.version_on(days[0]))
    coupled: Dict[str, object] = {}
    if cfg.upstream == "coupled":  # the towers of the checkpoints that made that snapshot
        for domain in sorted({v.split("/")[0] for v in vectors}):
            info = snap.manifest["domains"][domain]
            coupled[domain] = {"config": runs.upstream_model_config(Path(info["run"])),
                               "checkpoint": info["checkpoint"], "version": snap.version}
    temperatures = tuple(snap.dot_temperature(vectors[u].split("/")[0]) for u, _ in dot_pairs(vectors))
    ranker = RankerConfig(vectors=vectors, upstream_dim=snap.dim, dot_temperatures=temperatures, **common)
    return ranker, coupled


def _load_towers(dmp, coupled: Dict[str, dict]) -> None:
    """Collective: load each domain's DERM weights from its upstream DCP checkpoint into the
    coupled ranker (in place, shard by shard: each rank reads what it holds)."""
    state = dmp.state_dict()
    for domain, info in coupled.items():
        prefix = f"towers.models.{domain}."
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        dcp.load({"model": mine}, checkpoint_id=info["checkpoint"])


@dataclass
class RankerTraining:
    """Everything a ranker training run is made of."""

    cfg: TrainDownstreamConfig
    worker: derl_dist.Worker
    sources: SourceTables
    days: Tuple[str, str]
    eval_day: str
    vocab: Dict[str, int]
    join: Optional[SnapshotJoin]
    model_cfg: RankerConfig
    coupled: Dict[str, dict]
    versions: List[str]  # the snapshot versions live on the training days
    reader: ExampleReader
    steps: int
    dmp: Any
    optimizer: Any
    plan: Any


def build(cfg: TrainDownstreamConfig, worker: derl_dist.Worker) -> RankerTraining:
    """Collective: the sharded ranker (coupled: with its upstream towers loaded), its
    optimizers and its reader over the training days."""
    torch.manual_seed(cfg.seed)
    sources = SourceTables(cfg.data)
    days, eval_day = _days(cfg, sources)
    vocab = sources.vocab()
    join = (SnapshotJoin(cfg.snapshots, cfg.vector_names, cfg.snapshot_version)
            if cfg.upstream != "none" else None)
    model_cfg, coupled = model_config(cfg, vocab, join, days, sources)
    train_days = [d for d in sources.days("ad_events") if days[0] <= d <= days[1]]
    versions = sorted({join.version_on(d) for d in train_days}) if join else []
    if join:
        for day in train_days + [eval_day]:
            join.require_after_upstream(day)
    reader = ExampleReader(cfg.data, "ad_events", days, worker.rank, worker.world_size,
                           ReaderConfig(batch_size=cfg.batch_size, seed=cfg.seed, drop_last=True),
                           vocab, [join] if cfg.upstream == "snapshot" else [])
    steps = cfg.max_steps
    if steps is None:
        steps = derl_dist.agreed_steps(cfg.epochs, reader.num_rows / cfg.batch_size, worker.device)
    if steps <= 0:
        raise ValueError(f"{cfg.data}: too few ad events on {days[0]}..{days[1]} for one batch "
                         f"of {cfg.batch_size} per rank")
    model = Ranker(model_cfg, torch.device("meta"), {d: c["config"] for d, c in coupled.items()})
    dmp, optimizer, plan = shard_model(model, worker.device, OptimConfig(cfg.embedding_lr, cfg.dense_lr))
    if coupled:
        _load_towers(dmp, coupled)
    return RankerTraining(cfg, worker, sources, days, eval_day, vocab, join, model_cfg, coupled,
                          versions, reader, steps, dmp, optimizer, plan)


def run(cfg: TrainDownstreamConfig) -> Dict[str, object]:
    """One worker's part of a training run (every rank runs this)."""
    return derl_dist.run_as_worker(_run, cfg)


def _run(cfg: TrainDownstreamConfig, worker: derl_dist.Worker) -> Dict[str, object]:
    t = build(cfg, worker)
    if worker.is_main:
        _start_run_folder(t)
    history, seconds = train_loop(t)
    return report(t, history, seconds)


def _start_run_folder(t: RankerTraining) -> None:
    """config.json, and pins on the snapshot versions this ranker is trained with, before
    training starts, so that `snapshots gc` never takes them away."""
    cfg, out = t.cfg, t.cfg.out
    runs.start(cfg, runs.RANKER, {
        "upstream": cfg.upstream, "vectors": cfg.vectors, "model": dataclasses.asdict(t.model_cfg),
        "days": t.days, "eval_day": t.eval_day, "data": str(cfg.data),
        "world": read_world_id(cfg.data),
        "snapshots": str(cfg.snapshots) if cfg.snapshots else None, "snapshot_versions": t.versions,
        "coupled_checkpoints": {d: c["checkpoint"] for d, c in t.coupled.items()},
        "world_size": t.worker.world_size})
    print(f"train-downstream ({cfg.upstream}{', ' + cfg.vectors if cfg.upstream != 'none' else ''}): "
          f"heads {', '.join(t.model_cfg.tasks)}"
          f"{'' if 'cvr' in t.model_cfg.tasks else ' (no conversions in ad_events: no CVR head)'}; "
          f"days {t.days[0]}..{t.days[1]}, {t.steps} steps of {cfg.batch_size} x "
          f"{t.worker.world_size} rank(s), evaluation on {t.eval_day}")
    print("sharding plan:\n  " + "\n  ".join(describe_plan(t.plan)))
    for v in t.versions:
        pin(cfg.snapshots, v, str(out.resolve()))


def train_loop(t: RankerTraining) -> Tuple[List[Dict[str, float]], float]:
    """Collective: the training steps, with a windowed training NE over every rank's batches
    (for the NE-over-steps plot; its compute() syncs over the process group) and checkpoints.
    Returns the NE history and the steady-state seconds (the steps after the first)."""
    from tqdm import tqdm

    cfg, worker, dmp, optimizer = t.cfg, t.worker, t.dmp, t.optimizer
    train_state = {"days": t.days, "snapshot_versions": t.versions}
    ne = NEMetric(world_size=worker.world_size, my_rank=worker.rank, batch_size=cfg.batch_size,
                  window_size=cfg.ne_window * cfg.batch_size * worker.world_size,
                  tasks=[RecTaskInfo(name="ctr", label_name="clicked", prediction_name="ctr")])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, worker.device)
    batches = (b for epoch in range(10**9) for b in t.reader.batches(epoch))
    history: List[Dict[str, float]] = []
    bar = tqdm(total=t.steps, desc=f"downstream {cfg.upstream}", disable=not worker.is_main)
    dmp.train()
    t0 = time.perf_counter()
    for step in range(1, t.steps + 1):
        with derl_dist.collectives(worker, f"step {step}"):
            output = pipeline.progress(batches)
            if step == 1 and t.steps > 1:  # the first step traces the model and fills the pipeline
                t0 = time.perf_counter()
            losses = {k: float(v) for k, v in output["losses"].items()}
            finite.check_losses(step, losses, worker.device)
            clicked = output["clicked"]
            ne.update(predictions={"ctr": output["ctr"]}, labels={"ctr": clicked},
                      weights={"ctr": torch.ones_like(clicked)})
            if step % NE_EVERY == 0 or step == t.steps:
                values = ne.compute()  # collective; the result lands on rank 0
                if worker.is_main:
                    window_ne = float(values["ne-ctr|window_ne"])
                    history.append({"step": step, "ctr_window_ne": window_ne, **losses})
                    bar.set_postfix(loss=f"{sum(losses.values()):.4f}", ne=f"{window_ne:.3f}")
            bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < t.steps:
                checkpoint.save(cfg.out / runs.CHECKPOINTS, step, dmp, optimizer, train_state)
    seconds = time.perf_counter() - t0
    bar.close()
    batches.close()
    with derl_dist.collectives(worker, f"step {t.steps}'s checkpoint"):
        checkpoint.save(cfg.out / runs.CHECKPOINTS, t.steps, dmp, optimizer, train_state)
    pipeline.detach()
    return history, seconds


def report(t: RankerTraining, history: List[Dict[str, float]], seconds: float) -> Dict[str, object]:
    """Collective: the training summary, then the evaluation day scored (`scoring`)."""
    cfg = t.cfg
    summary = {
        "upstream": cfg.upstream,
        "vectors": cfg.vectors if cfg.upstream != "none" else None,
        "projection_dim": cfg.projection_dim,
        "steps": t.steps,
        "world_size": t.worker.world_size,
        "train_days": t.days,
        "eval_day": t.eval_day,
        # Steady state: the steps after the first (all of them in a one-step run).
        "train_examples_per_s": max(t.steps - 1, 1) * cfg.batch_size * t.worker.world_size
        / derl_dist.reduced(seconds, "max", t.worker.device),
        "snapshot_dim": t.model_cfg.upstream_dim or None,
        "coupled_checkpoints": {d: c["checkpoint"] for d, c in t.coupled.items()},
    }
    train_versions = scoring.summed(dict(t.join.rows_by_version) if t.join else {})
    train_stats = scoring.gathered(t.reader.stats.as_dict())
    if t.worker.is_main:
        runs.write_json(cfg.out / runs.TRAIN_NE, history)
        summary["snapshot_versions"] = train_versions  # rows joined with each (read-ahead included)
        summary["data_repairs_train"] = train_stats
    make_join = (lambda: SnapshotJoin(cfg.snapshots, t.model_cfg.vectors, cfg.snapshot_version,
                                      t.model_cfg.upstream_dim)) if cfg.upstream == "snapshot" else None
    return scoring.score_and_report(t.dmp, t.worker, cfg.data, t.eval_day, t.vocab, make_join,
                                    cfg.out, summary)
