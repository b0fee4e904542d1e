"""`derl train-upstream`: train one domain's entity model (DERM), sharded, resumable, evaluated.

    derl train-upstream --data WORLD --out RUN [--domain engagement|conversion] [--nproc N]
    torchrun --nproc_per_node N -m derl.launchers.cli train-upstream --data WORLD --out RUN ...

Writes RUN/config.json (what export needs to rebuild the model), RUN/checkpoints/step-*/ (DCP),
RUN/metrics.json (recall@K on the day after the training window, per task, and the popularity
baseline; training loss and throughput), RUN/loss_history.json and TensorBoard logs under
RUN/tb (docs/runs.md). `build` makes the sharded model and its batch stream exactly as a
training run does (the benchmarks use it), `train_loop` runs the steps, `report` evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from derl.datapipes.domains import DOMAINS
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.windows import WindowConfig, WindowReader
from derl.datapipes.world import read_world_id
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import faults, finite, runs
from derl.launchers.runtime.settings import TrainUpstreamConfig
from derl.launchers.runtime.upstream_eval import AUC_TASKS, evaluate_recall
from derl.models import checkpoint
from derl.models.sharding import OptimConfig, describe_plan, shard_model
from derl.models.upstream import DERM, UpstreamConfig


def validate(cfg: TrainUpstreamConfig) -> None:
    """Configuration errors, caught before any worker starts."""
    runs.claim(cfg, runs.UPSTREAM, resume=cfg.resume)
    if cfg.resume and runs.latest_checkpoint(cfg.out) is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.out / runs.CHECKPOINTS}")
    sources = SourceTables(cfg.data)
    sources.units("engagements")  # the source exists and is readable
    why = DOMAINS[cfg.domain].unsupported(sources)
    if why:
        raise ValueError(f"--domain {cfg.domain}: {why}")


@dataclass
class Training:
    """Everything a training run is made of, built the same way for the stage and the benchmarks."""

    cfg: TrainUpstreamConfig
    worker: derl_dist.Worker
    sources: SourceTables
    days: Tuple[str, str]
    eval_day: str
    model_cfg: UpstreamConfig
    stream: WindowReader
    steps: int
    dmp: Any
    optimizer: Any
    plan: Any


def table_days(sources: SourceTables, table: str, main_table: str, days: Tuple[str, str]) -> Optional[Tuple[str, str]]:
    """The training days a table contributes: all of `days` for the main table; for another,
    the part of `days` its own days cover (the Taobao logs' impressions span the last 8 of the
    behaviour log's 22 days), None where they do not meet."""
    if table == main_table:
        return days
    have = [d for d in sources.days(table) if days[0] <= d <= days[1]]
    return (have[0], have[-1]) if have else None


def window_stream(cfg: TrainUpstreamConfig, sources: SourceTables, days: Tuple[str, str],
                  worker: derl_dist.Worker, vocab: Dict[str, int]) -> WindowReader:
    """The user windows of the domain's tables that the source holds, each over the training
    days it covers."""
    domain = DOMAINS[cfg.domain]
    tables = [(t, table_days(sources, t, domain.main_table, days)) for t in domain.tables_in(sources)]
    config = WindowConfig(batch_size=cfg.batch_size, seq_len=cfg.seq_len, negatives=cfg.catalogue_negatives,
                          seed=cfg.seed)
    return WindowReader(cfg.data, [(t, d) for t, d in tables if d is not None], worker.rank, worker.world_size,
                        config, vocab, targets_from=cfg.targets_from_day)


def _steps(cfg: TrainUpstreamConfig, stream: WindowReader, device: torch.device) -> int:
    """Steps every rank takes: --max-steps, or --epochs over the windows (`dist.agreed_steps`)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return derl_dist.agreed_steps(cfg.epochs, stream.batches_per_epoch, device)


def _next_day(sources: SourceTables, day: str) -> str:
    later = [d for d in sources.days("engagements") if d > day]
    if not later:
        raise ValueError(f"--until {day}: no later day to evaluate on")
    return later[0]


def build(cfg: TrainUpstreamConfig, worker: derl_dist.Worker) -> Training:
    """Collective: the sharded DERM, its optimizers and its batch stream over the training days."""
    torch.manual_seed(cfg.seed)
    sources = SourceTables(cfg.data)
    split = default_split(sources.days("engagements"))
    days = (cfg.from_day or split.upstream_days[0], cfg.until or split.upstream_days[1])
    eval_day = _next_day(sources, cfg.until) if cfg.until else split.cut_day
    vocab = sources.vocab()
    stream = window_stream(cfg, sources, days, worker, vocab)
    steps = _steps(cfg, stream, worker.device)
    model_cfg = cfg.model_config(vocab)
    model = DERM(model_cfg, table_device=torch.device("meta"))
    gb = cfg.memory_per_rank_gb
    dmp, optimizer, plan = shard_model(model, worker.device, OptimConfig(cfg.embedding_lr, cfg.dense_lr),
                                       memory_per_rank=int(gb * 2**30) if gb else None)
    return Training(cfg, worker, sources, days, eval_day, model_cfg, stream, steps, dmp, optimizer, plan)


def run(cfg: TrainUpstreamConfig) -> Dict[str, object]:
    """One worker's part of a training run (every rank runs this)."""
    return derl_dist.run_as_worker(_run, cfg)


def _run(cfg: TrainUpstreamConfig, worker: derl_dist.Worker) -> Dict[str, object]:
    t = build(cfg, worker)
    if worker.is_main:
        _start_run_folder(t)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(cfg.out / runs.TENSORBOARD)) if worker.is_main else None
    try:  # closed whatever happens: a writer left open prints its own errors at exit (a full disk)
        loop = train_loop(t, checkpoint.latest(cfg.out / runs.CHECKPOINTS) if cfg.resume else None, writer)
        if worker.is_main and cfg.resume:
            _record(t)
        return report(t, loop)
    finally:
        if writer is not None:
            writer.close()


def _record(t: Training) -> None:
    """config.json: the run's model, days and world. A resumed run rewrites it only once its
    steps are done, so that one which fails leaves the run it continued as it was (its newer
    checkpoints carry their days: `runs.checkpoint_days`)."""
    cfg = t.cfg
    runs.start(cfg, runs.UPSTREAM, {
        "domain": cfg.domain, "model": dataclasses.asdict(t.model_cfg), "days": t.days,
        "eval_day": t.eval_day, "data": str(cfg.data), "world": read_world_id(cfg.data),
        "world_size": t.worker.world_size})


def _start_run_folder(t: Training) -> None:
    cfg = t.cfg
    if not cfg.resume:
        _record(t)
    print(f"train-upstream {cfg.domain}: days {t.days[0]}..{t.days[1]}, {t.steps} steps of "
          f"{cfg.batch_size} x {t.worker.world_size} rank(s), evaluation on {t.eval_day}")
    print("sharding plan:\n  " + "\n  ".join(describe_plan(t.plan)))


@dataclass
class Loop:
    """What the training loop leaves for the report."""

    step: int
    rows: int  # this rank's labelled rows
    positions: int  # this rank's next-Pin targets
    seconds: float
    losses: Dict[str, float]
    history: List[Dict[str, float]]
    evals: List[Dict[str, object]]
    pipeline: TrainPipelineSparseDist
    writer: Any


def train_loop(t: Training, resume_from: Optional[Path], writer: Any) -> Loop:
    """Collective: the training steps, with checkpoints, progress and (optional) evaluations.
    Resuming on other days than the checkpoint's (an incremental run, `--resume --until DAY`)
    keeps counting steps (`offset`: steps taken on earlier day ranges), so that its checkpoints
    are the newest."""
    from tqdm import tqdm

    cfg, worker, dmp, optimizer = t.cfg, t.worker, t.dmp, t.optimizer
    ckpt_root = cfg.out / runs.CHECKPOINTS
    step = offset = 0
    steps = t.steps
    if resume_from is not None:
        state = checkpoint.load(resume_from, dmp, optimizer)
        step = state["step"]
        offset = state.get("offset", 0) if tuple(state["days"]) == t.days else step
        steps += offset
        if worker.is_main:
            print(f"resumed from {resume_from} at step {step}"
                  f"{'' if offset != step else ' (new days: an incremental run)'}")
    pipeline = TrainPipelineSparseDist(dmp, optimizer, worker.device)
    batches = t.stream.iterate(start_step=step - offset)
    history: List[Dict[str, float]] = []
    evals: List[Dict[str, object]] = []
    bar = tqdm(total=steps, initial=step, desc=f"upstream {cfg.domain}", disable=not worker.is_main)
    dmp.train()
    t_start, rows, positions, losses = time.perf_counter(), 0, 0, {}
    while step < steps:
        step += 1
        with derl_dist.collectives(worker, f"step {step}"):
            output = pipeline.progress(batches)
            rows += output["user_emb"].shape[0]
            positions += 0 if output["next_pins"] is None else output["next_pins"].targets.numel()
            losses = {k: float(v) for k, v in output["losses"].items()}
            finite.check_losses(step, losses, worker.device)
            if worker.is_main:
                rate = rows * worker.world_size / (time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{sum(losses.values()):.3f}", ex_s=f"{rate:,.0f}")
                bar.update(1)
                for k, v in losses.items():
                    writer.add_scalar(f"loss/{k}", v, step)
                writer.add_scalar("throughput/examples_per_s", rate, step)
                history.append({"step": step, **losses})
            faults.reached("upstream-step", worker.rank, worker.world_size)
            if step % cfg.checkpoint_every == 0 or step == steps:
                checkpoint.save(ckpt_root, step, dmp, optimizer,
                                {"days": t.days, "domain": cfg.domain, "offset": offset})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
                evals.append(_evaluate(t, pipeline, step, writer))
                dmp.train()
    bar.close()
    batches.close()  # stops the reader's prefetch thread
    return Loop(step, rows, positions, time.perf_counter() - t_start, losses, history, evals, pipeline, writer)


def _pin_log_prior(model_cfg: UpstreamConfig, stream: WindowReader) -> Optional[np.ndarray]:
    """The retrieval prior (`UpstreamConfig.retrieval_prior_weight` x log q) per Pin row, with
    q the organic impression share; a Pin never shown in the window counts as half an
    impression of the rarest one."""
    weight = model_cfg.retrieval_prior_weight
    if not weight:
        return None
    q = stream.engagements.pin_prob
    return weight * np.log(np.maximum(q, q[q > 0].min() / 2))


def _evaluate(t: Training, pipeline: TrainPipelineSparseDist, step: int, writer) -> Dict[str, object]:
    pipeline.detach()  # the sharded modules answer plain calls again; progress() re-attaches
    t.dmp.eval()
    result = evaluate_recall(t.dmp.module, t.stream.joiner, t.sources, t.eval_day, t.days,
                             t.worker, batch_size=t.cfg.eval_batch_size, temperature=t.model_cfg.temperature,
                             pin_log_prior=_pin_log_prior(t.model_cfg, t.stream))
    if writer is not None:
        for task, r in result["tasks"].items():
            writer.add_scalar(f"recall@50/{task}", r["recall@50"], step)
    return {"step": step, **result}


def report(t: Training, loop: Loop) -> Dict[str, object]:
    """Collective: the final evaluation; rank 0 writes RUN/metrics.json and the loss history."""
    final = _evaluate(t, loop.pipeline, loop.step, loop.writer)
    device = t.worker.device
    rows, positions = (int(derl_dist.reduced(n, "sum", device)) for n in (loop.rows, loop.positions))
    seconds = derl_dist.reduced(loop.seconds, "max", device)
    metrics = {
        "domain": t.cfg.domain,
        "steps": loop.step,
        "world_size": t.worker.world_size,
        "train_examples": rows,
        "train_examples_per_s": rows / seconds if seconds else 0.0,
        "train_positions": positions,
        "train_positions_per_s": positions / seconds if seconds else 0.0,
        "final_losses": loop.losses,
        **runs.headline(final),
        "eval": final,
        "eval_history": loop.evals,
        "tables": [r.table for r in t.stream.readers],
        "reader_stats": t.stream.stats.as_dict(),
        "plan": describe_plan(t.plan),
    }
    if t.worker.is_main:
        out = t.cfg.out
        runs.write_json(out / runs.METRICS, metrics)
        runs.write_json(out / runs.LOSS_HISTORY, loop.history)
        print(f"recall@50 {metrics['recall@50']:.4f} vs popularity {metrics['popularity_recall@50']:.4f}"
              f" on {t.eval_day}; dot AUC among impressions: " + ", ".join(
                  f"{task} {metrics['dot_auc_' + task]:.3f}" for task in AUC_TASKS)
              + f"; metrics in {out / runs.METRICS}")
    return metrics
