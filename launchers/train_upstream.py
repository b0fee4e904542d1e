"""`derl train-upstream`: train one domain's entity model (DERM), sharded, resumable, evaluated.

    derl train-upstream --data WORLD --out RUN [--domain engagement|conversion] [--nproc N]
    torchrun --nproc_per_node N -m derl.launchers.train_upstream --data WORLD --out RUN ...

Writes RUN/config.json (what export needs to rebuild the model), RUN/checkpoints/step-*/ (DCP),
RUN/metrics.json (recall@K on the day after the training window, per task, and the popularity
baseline; training loss and throughput), and TensorBoard logs under RUN/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from derl.datapipes.mixing import MixedStream
from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.launchers import dist as derl_dist
from derl.launchers.upstream_eval import AUC_TASKS, evaluate_recall
from derl.models import checkpoint
from derl.models.sharding import OptimConfig, describe_plan, shard_model
from derl.models.upstream import DERM, UpstreamConfig

# Fault injection for the resume tests: the last rank kills itself after this step.
_FAULT_AT_STEP = int(os.environ.get("DERL_FAULT_AT_STEP", "0"))

# Which tables feed each domain, and in what share (None: in proportion to their rows).
DOMAIN_TABLES = {
    "engagement": (("engagements", None), ("ad_events", None)),
    "conversion": (("ad_events", 0.5), ("engagements", 0.5)),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="source folder (derl generate)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--domain", choices=sorted(DOMAIN_TABLES), default="engagement")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes (ranks)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the main table")
    p.add_argument("--resume", action="store_true", help="continue from RUN's newest checkpoint")
    p.add_argument("--from-day", help="first training day (default: the source's first)")
    p.add_argument("--until", help="last training day (default: the day before the snapshot cut)")
    p.add_argument("--batch-size", type=int, default=1024, help="per rank")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=32, help="sequence events the model reads")
    p.add_argument("--seq-layers", type=int, default=2)
    p.add_argument("--seq-dropout", type=float, default=0.1)
    p.add_argument("--tower-dims", default="256,128", help="hidden widths of the towers")
    p.add_argument("--no-contrastive", action="store_true", help="BCE heads only (ablation)")
    p.add_argument("--no-logq", action="store_true", help="no popularity correction (ablation)")
    p.add_argument("--logq-strength", type=float, default=0.0,
                   help="share of the logQ correction in training: 0 (default) leaves popularity "
                        "out of the dot (retrieval adds it back), 1 puts it in")
    p.add_argument("--no-center", action="store_true",
                   help="do not centre the tower outputs over the batch before normalising (ablation)")
    p.add_argument("--contrastive-weight", type=float, default=3.0)
    p.add_argument("--contrastive-positives",
                   help="comma-separated labels whose rows are positives (default: every task but hide)")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--embedding-lr", type=float, default=0.05)
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: end)")
    p.add_argument("--eval-batch-size", type=int, default=2048)
    p.add_argument("--memory-per-rank-gb", type=float, help="planner memory cap (default: host)")
    p.add_argument("--seed", type=int, default=0)


def validate(args: argparse.Namespace) -> None:
    """Configuration errors, caught before any worker starts."""
    if args.seq_len <= 0:
        raise ValueError(f"--seq-len must be at least 1, got {args.seq_len}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.resume and checkpoint.latest(args.out / "checkpoints") is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {args.out / 'checkpoints'}")
    SourceTables(args.data).units("engagements")  # the source exists and is readable


def model_config(args: argparse.Namespace, vocab: Dict[str, int]) -> UpstreamConfig:
    return UpstreamConfig.for_domain(
        args.domain,
        vocab,
        embedding_dim=args.embedding_dim,
        seq_len=args.seq_len,
        seq_layers=args.seq_layers,
        seq_dropout=args.seq_dropout,
        tower_dims=tuple(int(x) for x in args.tower_dims.split(",")),
        interaction_dims=tuple(int(x) for x in args.tower_dims.split(",")),
        contrastive=not args.no_contrastive,
        contrastive_weight=args.contrastive_weight,
        **({"contrastive_positives": tuple(args.contrastive_positives.split(","))}
           if args.contrastive_positives else {}),
        sampling_prob_key=None if args.no_logq else "pin_sampling_prob",
        logq_strength=args.logq_strength,
        center_entities=not args.no_center,
        temperature=args.temperature,
    )


def load_model_config(run: Path) -> UpstreamConfig:
    """The model config a run was trained with (RUN/config.json), to rebuild its model."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an upstream run folder (no config.json)")
    return checkpoint.config_from_json(UpstreamConfig, json.loads(path.read_text())["model"])


def example_stream(args: argparse.Namespace, days, worker: derl_dist.Worker, vocab) -> MixedStream:
    config = ReaderConfig(batch_size=args.batch_size, seed=args.seed, drop_last=True)
    readers, shares = [], []
    for table, share in DOMAIN_TABLES[args.domain]:
        r = ExampleReader(args.data, table, days, worker.rank, worker.world_size, config, vocab)
        readers.append(r)
        shares.append(share)
    if None in shares:  # in proportion to rows, over all ranks
        rows = [r.num_rows for r in readers]
        shares = [n / sum(rows) for n in rows]
    return MixedStream(readers, shares)


def _steps(args: argparse.Namespace, stream: MixedStream, device: torch.device) -> int:
    """Steps every rank takes: --max-steps, or --epochs over the main table on the rank that has
    the fewest batches of it (sharded steps are collective, so all ranks take the same number)."""
    if args.max_steps is not None:
        return args.max_steps
    steps = torch.tensor(int(args.epochs * stream.per_epoch[0] / stream.shares[0]), device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    return int(steps.item())


def train(args: argparse.Namespace) -> Dict[str, object]:
    """One worker's part of a training run (every rank runs this)."""
    return derl_dist.run_as_worker(_train, args)


def _train(args: argparse.Namespace, worker: derl_dist.Worker) -> Dict[str, object]:
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    out: Path = args.out
    ckpt_root = out / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if args.resume else None

    sources = SourceTables(args.data)
    split = default_split(sources.days("engagements"))
    days = (args.from_day or split.upstream_days[0], args.until or split.upstream_days[1])
    eval_day = args.until and _next_day(sources, args.until) or split.cut_day
    vocab = sources.vocab()
    cfg = model_config(args, vocab)
    stream = example_stream(args, days, worker, vocab)
    steps = _steps(args, stream, worker.device)

    model = DERM(cfg, table_device=torch.device("meta"))
    gb = args.memory_per_rank_gb
    dmp, optimizer, plan = shard_model(
        model, worker.device, OptimConfig(args.embedding_lr, args.dense_lr),
        memory_per_rank=int(gb * 2**30) if gb else None,
    )
    if worker.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"train-upstream {args.domain}: days {days[0]}..{days[1]}, {steps} steps of "
              f"{args.batch_size} x {worker.world_size} rank(s), evaluation on {eval_day}")
        print("sharding plan:\n  " + "\n  ".join(describe_plan(plan)))
        (out / "config.json").write_text(json.dumps(
            {"domain": args.domain, "model": dataclasses.asdict(cfg), "days": days,
             "eval_day": eval_day, "data": str(args.data), "world_size": worker.world_size},
            indent=2, default=list))

    # `offset`: steps taken on earlier day ranges. Resuming on new days (an incremental run,
    # `--resume --until DAY`) keeps counting, so its checkpoints are the newest.
    step = offset = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, dmp, optimizer)
        step = state["step"]
        offset = state.get("offset", 0) if tuple(state["days"]) == days else step
        steps += offset
        if worker.is_main:
            print(f"resumed from {resume_from} at step {step}"
                  f"{'' if offset != step else ' (new days: an incremental run)'}")

    pipeline = TrainPipelineSparseDist(dmp, optimizer, worker.device)
    batches = stream.iterate(start_step=step - offset)
    writer = SummaryWriter(str(out / "tb")) if worker.is_main else None
    history: List[Dict[str, float]] = []
    evals: List[Dict[str, object]] = []
    bar = tqdm(total=steps, initial=step, desc=f"upstream {args.domain}", disable=not worker.is_main)
    dmp.train()
    t_start, examples, losses = time.perf_counter(), 0, {}
    while step < steps:
        output = pipeline.progress(batches)
        step += 1
        examples += args.batch_size * worker.world_size
        losses = {k: float(v) for k, v in output["losses"].items()}
        if worker.is_main:
            rate = examples / (time.perf_counter() - t_start)
            bar.set_postfix(loss=f"{sum(losses.values()):.3f}", ex_s=f"{rate:,.0f}")
            bar.update(1)
            for k, v in losses.items():
                writer.add_scalar(f"loss/{k}", v, step)
            writer.add_scalar("throughput/examples_per_s", rate, step)
            history.append({"step": step, **losses})
        if step == _FAULT_AT_STEP and worker.rank == worker.world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dies mid-run
        if step % args.checkpoint_every == 0 or step == steps:
            checkpoint.save(ckpt_root, step, dmp, optimizer,
                            {"days": days, "domain": args.domain, "offset": offset})
        if args.eval_every and step % args.eval_every == 0 and step < steps:
            evals.append(_evaluate(pipeline, dmp, stream, sources, eval_day, days, worker, args, step, writer))
            dmp.train()
    bar.close()
    batches.close()  # stops the readers' prefetch threads
    seconds = time.perf_counter() - t_start
    final = _evaluate(pipeline, dmp, stream, sources, eval_day, days, worker, args, step, writer)
    metrics = {
        "domain": args.domain,
        "steps": step,
        "world_size": worker.world_size,
        "train_examples": examples,
        "train_examples_per_s": examples / seconds if seconds else 0.0,
        "final_losses": losses,
        **{k: v for k, v in final.items() if k.startswith(("recall@", "popularity_recall@", "dot_auc_"))},
        "eval": final,
        "eval_history": evals,
        "reader_stats": {r.table: r.stats.as_dict() for r in stream.readers},
        "plan": describe_plan(plan),
    }
    if worker.is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "loss_history.json").write_text(json.dumps(history))
        writer.close()
        print(f"recall@50 {metrics['recall@50']:.4f} vs popularity {metrics['popularity_recall@50']:.4f}"
              f" on {eval_day}; dot AUC among impressions: " + ", ".join(
                  f"{t} {metrics['dot_auc_' + t]:.3f}" for t in AUC_TASKS) + f"; metrics in {out / 'metrics.json'}")
    return metrics


def _next_day(sources: SourceTables, day: str) -> str:
    later = [d for d in sources.days("engagements") if d > day]
    if not later:
        raise ValueError(f"--until {day}: no later day to evaluate on")
    return later[0]


def _pin_log_prior(cfg: UpstreamConfig, stream: MixedStream) -> Optional[np.ndarray]:
    """The retrieval prior (`UpstreamConfig.retrieval_prior_weight` x log q) per Pin row, with
    q the organic impression share the logQ correction uses; a Pin never shown in the window
    counts as half an impression of the rarest one."""
    weight = cfg.retrieval_prior_weight
    if not weight:
        return None
    q = next(r for r in stream.readers if r.table == "engagements").pin_prob
    return weight * np.log(np.maximum(q, q[q > 0].min() / 2))


def _evaluate(pipeline, dmp, stream, sources, day, days, worker, args, step, writer):
    pipeline.detach()  # the sharded modules answer plain calls again; progress() re-attaches
    dmp.eval()
    cfg = dmp.module.cfg
    result = evaluate_recall(dmp.module, stream.readers[0].joiner, sources, day, days, worker,
                             batch_size=args.eval_batch_size, temperature=cfg.temperature,
                             pin_log_prior=_pin_log_prior(cfg, stream))
    if writer is not None:
        for task, r in result["tasks"].items():
            writer.add_scalar(f"recall@50/{task}", r["recall@50"], step)
    return {"step": step, **result}


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m` / `torchrun -m` entry: the same as `derl train-upstream`."""
    from derl.launchers import cli

    cli.main(["train-upstream", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
