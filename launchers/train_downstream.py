"""`derl train-downstream`: train a CTR/CVR ranker on ad impressions, with or without upstream.

    derl train-downstream --data WORLD --snapshots SNAP --out RUN --upstream snapshot [--nproc N]
    torchrun --nproc_per_node N -m derl.launchers.train_downstream --data WORLD ...

`--upstream none` is the baseline, `snapshot` joins each impression with the snapshot version
live on its day (point in time), `coupled` runs the upstream towers of that version's checkpoints
inside the ranker and fine-tunes them. All three train on the split's downstream days and are
scored on its evaluation day, which nothing trained on. Writes RUN/config.json, RUN/checkpoints/
(DCP), RUN/predictions/part-*.parquet (one scored row per evaluation impression),
RUN/metrics.json (torchrec.metrics per task, throughput, snapshot versions used, data repairs)
and RUN/train_ne.json (windowed training NE per step); pins the versions it used in SNAP/pins/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.snapshots import VECTOR_SETS, SnapshotJoin, pin
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.launchers import dist as derl_dist
from derl.launchers.train_upstream import load_model_config
from derl.models import checkpoint
from derl.models.downstream import UPSTREAM_MODES, Ranker, RankerConfig, dot_pairs
from derl.models.metrics import ranker_metrics
from derl.models.sharding import OptimConfig, describe_plan, shard_model

PREDICTIONS = "predictions"
NE_EVERY = 5  # steps between training-NE points (a collective)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="source folder (derl generate)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--upstream", choices=UPSTREAM_MODES, default="snapshot",
                   help="where the upstream vectors come from (none: the baseline)")
    p.add_argument("--snapshots", type=Path, help="snapshot root (derl export --out)")
    p.add_argument("--vectors", choices=sorted(VECTOR_SETS), default="all",
                   help="which upstream vectors: engagement user; + its Pin; all four")
    p.add_argument("--snapshot-version",
                   help="join every row with this version instead of the one live on its day")
    p.add_argument("--projection-dim", type=int, help="project the upstream vectors to this width")
    p.add_argument("--interaction", choices=["dcn", "dot"], default="dcn")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--dense-arch", default="64", help="hidden widths of the dense arch")
    p.add_argument("--over-arch", default="128,64", help="hidden widths of each head")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes (ranks)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: --epochs)")
    p.add_argument("--batch-size", type=int, default=512, help="per rank")
    p.add_argument("--embedding-lr", type=float, default=0.05)
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--from-day", help="first training day (default: the split's downstream days)")
    p.add_argument("--until", help="last training day")
    p.add_argument("--eval-day", help="evaluation day (default: the split's last day)")
    p.add_argument("--ne-window", type=int, default=20, help="batches in the training-NE window")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end)")
    p.add_argument("--seed", type=int, default=0)


def validate(args: argparse.Namespace) -> None:
    """Configuration errors, caught before any worker starts."""
    if args.upstream != "none" and args.snapshots is None:
        raise ValueError(f"--upstream {args.upstream} needs --snapshots")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.projection_dim is not None and args.projection_dim <= 0:
        raise ValueError(f"--projection-dim must be positive, got {args.projection_dim}")
    if args.snapshots is not None and args.upstream != "none":
        SnapshotJoin(args.snapshots, VECTOR_SETS[args.vectors], args.snapshot_version)
    SourceTables(args.data).units("ad_events")


def _days(args: argparse.Namespace, sources: SourceTables) -> Tuple[Tuple[str, str], str]:
    split = default_split(sources.days("engagements"))
    days = (args.from_day or split.downstream_days[0], args.until or split.downstream_days[1])
    eval_day = args.eval_day or split.eval_day
    if eval_day <= days[1]:
        raise ValueError(f"--eval-day {eval_day} is not after the training days {days[0]}..{days[1]}")
    return days, eval_day


def _dims(args: argparse.Namespace) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(dense arch, over arch) hidden widths from their comma-separated flags."""
    return tuple(int(x) for x in args.dense_arch.split(",") if x), \
        tuple(int(x) for x in args.over_arch.split(",") if x)


def _priors(sources: SourceTables, days: Tuple[str, str]) -> Dict[str, float]:
    """CTR, and CVR given a click, of the training days: where the heads start."""
    t = sources.read("ad_events", days, columns=["clicked", "converted"])
    clicks = float(np.sum(t.column("clicked").to_numpy()))
    conversions = float(np.sum(t.column("converted").to_numpy()))
    clip = lambda x: float(np.clip(x, 1e-4, 1 - 1e-4))  # noqa: E731
    return {"ctr_prior": clip(clicks / max(t.num_rows, 1)), "cvr_prior": clip(conversions / max(clicks, 1))}


def build(args: argparse.Namespace, vocab: Dict[str, int], join: Optional[SnapshotJoin],
          days: Tuple[str, str], sources: SourceTables) -> Tuple[RankerConfig, Dict[str, object]]:
    """The ranker config, and for coupled mode the upstream DERM configs and checkpoints."""
    first_day = days[0]
    dense_arch, over_arch = _dims(args)
    common = dict(num_embeddings=vocab, projection_dim=args.projection_dim, **_priors(sources, days),
                  embedding_dim=args.embedding_dim, dense_arch=dense_arch, over_arch=over_arch,
                  interaction=args.interaction)
    if args.upstream == "none":
        return RankerConfig(upstream="none", **common), {}
    vectors = VECTOR_SETS[args.vectors]
    snap = join.snapshot(join.version_on(first_day))
    coupled: Dict[str, object] = {}
    if args.upstream == "coupled":  # the towers of the checkpoints that made that snapshot
        for domain in sorted({v.split("/")[0] for v in vectors}):
            info = snap.manifest["domains"][domain]
            coupled[domain] = {"config": load_model_config(Path(info["run"])),
                               "checkpoint": info["checkpoint"], "version": snap.version}
    temperatures = tuple(snap.dot_temperature(vectors[u].split("/")[0]) for u, _ in dot_pairs(vectors))
    return RankerConfig(upstream=args.upstream, vectors=vectors, upstream_dim=snap.dim,
                        dot_temperatures=temperatures, **common), coupled


def _load_towers(dmp, coupled: Dict[str, dict]) -> None:
    """Collective: load each domain's DERM weights from its upstream DCP checkpoint into the
    coupled ranker (in place, shard by shard: each rank reads what it holds)."""
    state = dmp.state_dict()
    for domain, info in coupled.items():
        prefix = f"towers.models.{domain}."
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        dcp.load({"model": mine}, checkpoint_id=info["checkpoint"])


def _lockstep(reader: ExampleReader, device: torch.device):
    """(batch, is_real) so that every rank makes the same number of sharded forwards: ranks
    with fewer batches repeat their last one, flagged not real. (The reader does not drop the
    last partial batch, so a rank has ceil(rows / batch size) of them.)"""
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
    """Collective. This rank's evaluation rows, scored: ids, labels, pCTR, pCVR, flags."""
    cols: Dict[str, List[np.ndarray]] = {}
    for batch, real in _lockstep(reader, device):
        _, out = dmp(batch.to(device))
        if not real:
            continue
        row = {"request_id": batch.meta["request_id"], "user_id": batch.meta["user_id"],
               "pin_id": batch.meta["pin_id"], "clicked": batch.labels["clicked"],
               "converted": batch.labels["converted"], "p_ctr": out["ctr"], "p_cvr": out["cvr"]}
        if "upstream_missing" in batch.dense:
            row["missing"] = batch.dense["upstream_missing"]
        for k, v in row.items():
            cols.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}


def write_predictions(folder: Path, rank: int, rows: Dict[str, np.ndarray]) -> None:
    """This rank's part, written beside and renamed: a reader never sees half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    table = {k: pa.array(v) for k, v in rows.items() if k != "missing"}
    if "missing" in rows:
        m = rows["missing"].astype(np.int8)
        table["missing"] = pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), m.shape[1])
    tmp = folder / f".part-{rank:05d}.tmp"
    pq.write_table(pa.table(table), tmp)
    tmp.rename(folder / f"part-{rank:05d}.parquet")


def read_predictions(folder: Path) -> Dict[str, np.ndarray]:
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder}: no predictions")
    t = pa.concat_tables([pq.read_table(p) for p in parts])
    out = {c: t.column(c).to_numpy() for c in t.column_names if c != "missing"}
    if "missing" in t.column_names:
        m = t.column("missing").combine_chunks()
        out["missing"] = m.values.to_numpy().reshape(len(m), -1)
    return out


def train(args: argparse.Namespace) -> Dict[str, object]:
    """One worker's part of a training run (every rank runs this)."""
    return derl_dist.run_as_worker(_train, args)


def _train(args: argparse.Namespace, worker: derl_dist.Worker) -> Dict[str, object]:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    sources = SourceTables(args.data)
    days, eval_day = _days(args, sources)
    vocab = sources.vocab()
    join = (SnapshotJoin(args.snapshots, VECTOR_SETS[args.vectors], args.snapshot_version)
            if args.upstream != "none" else None)
    cfg, coupled = build(args, vocab, join, days, sources)
    # The versions this ranker is trained with: stored with its checkpoints and config, and
    # pinned before training starts, so that `snapshots gc` never takes them away.
    live = sorted({join.version_on(d) for d in sources.days("ad_events") if days[0] <= d <= days[1]}) \
        if join else []
    joins = [join] if args.upstream == "snapshot" else []
    config = ReaderConfig(batch_size=args.batch_size, seed=args.seed, drop_last=True)
    reader = ExampleReader(args.data, "ad_events", days, worker.rank, worker.world_size, config,
                           vocab, joins)
    steps = args.max_steps
    if steps is None:
        steps_t = torch.tensor(int(args.epochs * (reader.num_rows // args.batch_size)))
        dist.all_reduce(steps_t, op=dist.ReduceOp.MIN)
        steps = int(steps_t)
    if steps <= 0:
        raise ValueError(f"{args.data}: too few ad events on {days[0]}..{days[1]} for one batch "
                         f"of {args.batch_size} per rank")

    model = Ranker(cfg, torch.device("meta"), {d: c["config"] for d, c in coupled.items()})
    dmp, optimizer, plan = shard_model(model, worker.device,
                                       OptimConfig(args.embedding_lr, args.dense_lr))
    if coupled:
        _load_towers(dmp, coupled)
    out: Path = args.out
    if worker.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"train-downstream ({args.upstream}"
              f"{', ' + args.vectors if args.upstream != 'none' else ''}): days {days[0]}..{days[1]}, "
              f"{steps} steps of {args.batch_size} x {worker.world_size} rank(s), evaluation on {eval_day}")
        print("sharding plan:\n  " + "\n  ".join(describe_plan(plan)))
        (out / "config.json").write_text(json.dumps(
            {"upstream": args.upstream, "vectors": args.vectors, "model": dataclasses.asdict(cfg),
             "days": days, "eval_day": eval_day, "data": str(args.data),
             "snapshots": str(args.snapshots) if args.snapshots else None,
             "snapshot_versions": live,
             "coupled_checkpoints": {d: c["checkpoint"] for d, c in coupled.items()},
             "world_size": worker.world_size}, indent=2, default=list))
        for v in live:
            pin(args.snapshots, v, str(out.resolve()))

    # Windowed training NE over every rank's batches, for the NE-over-steps plot. Its compute()
    # is collective (torchmetrics syncs over the process group): every rank calls it.
    ne = NEMetric(world_size=worker.world_size, my_rank=worker.rank, batch_size=args.batch_size,
                  window_size=args.ne_window * args.batch_size * worker.world_size,
                  tasks=[RecTaskInfo(name="ctr", label_name="clicked", prediction_name="ctr")])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, worker.device)
    batches = (b for epoch in range(10**9) for b in reader.batches(epoch))
    history: List[Dict[str, float]] = []
    bar = tqdm(total=steps, desc=f"downstream {args.upstream}", disable=not worker.is_main)
    dmp.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        output = pipeline.progress(batches)
        if step == 1 and steps > 1:  # the first step traces the model and fills the pipeline
            t0 = time.perf_counter()
        losses = {k: float(v) for k, v in output["losses"].items()}
        clicked = output["clicked"]
        ne.update(predictions={"ctr": output["ctr"]}, labels={"ctr": clicked},
                  weights={"ctr": torch.ones_like(clicked)})
        if step % NE_EVERY == 0 or step == steps:
            values = ne.compute()  # collective; the result lands on rank 0
            if worker.is_main:
                window_ne = float(values["ne-ctr|window_ne"])
                history.append({"step": step, "ctr_window_ne": window_ne, **losses})
                bar.set_postfix(loss=f"{sum(losses.values()):.4f}", ne=f"{window_ne:.3f}")
        bar.update(1)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < steps:
            checkpoint.save(out / "checkpoints", step, dmp, optimizer, {"days": days, "snapshot_versions": live})
    seconds = time.perf_counter() - t0
    bar.close()
    batches.close()
    checkpoint.save(out / "checkpoints", steps, dmp, optimizer, {"days": days, "snapshot_versions": live})

    pipeline.detach()
    summary = {
        "upstream": args.upstream,
        "vectors": args.vectors if args.upstream != "none" else None,
        "projection_dim": args.projection_dim,
        "steps": steps,
        "world_size": worker.world_size,
        "train_days": days,
        "eval_day": eval_day,
        # Steady state: the steps after the first (all of them in a one-step run).
        "train_examples_per_s": max(steps - 1, 1) * args.batch_size * worker.world_size / _slowest(seconds),
        "snapshot_dim": cfg.upstream_dim or None,
        "coupled_checkpoints": {d: c["checkpoint"] for d, c in coupled.items()},
    }
    train_versions = _summed(dict(join.rows_by_version) if join else {})
    train_stats = _gathered(reader.stats.as_dict())
    if worker.is_main:
        (out / "train_ne.json").write_text(json.dumps(history))
        summary["snapshot_versions"] = train_versions  # rows joined with each (read-ahead included)
        summary["data_repairs_train"] = train_stats
    make_join = (lambda: SnapshotJoin(args.snapshots, cfg.vectors, args.snapshot_version, cfg.upstream_dim)) \
        if args.upstream == "snapshot" else None
    return score_and_report(dmp, worker, args.data, eval_day, vocab, make_join, out, summary)


def _slowest(seconds: float) -> float:
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _gathered(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _summed(counts: Dict[str, int]) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for c in _gathered(counts):
        for k, n in c.items():
            total[k] = total.get(k, 0) + n
    return total


def score_and_report(dmp, worker: derl_dist.Worker, data: Path, eval_day: str, vocab: Dict[str, int],
                     make_join, out: Path, summary: Dict[str, object]) -> Dict[str, object]:
    """Collective. Score `eval_day` with the (trained or loaded) ranker, each rank writing its
    part of OUT/predictions; rank 0 computes the metrics and writes OUT/metrics.json."""
    dmp.eval()
    join = make_join() if make_join else None
    reader = ExampleReader(data, "ad_events", (eval_day, eval_day), worker.rank, worker.world_size,
                           ReaderConfig(batch_size=4096, shuffle_buffer=0), vocab,
                           [join] if join else [])
    t0 = time.perf_counter()
    rows = score(dmp, reader, worker.device)
    seconds = _slowest(time.perf_counter() - t0)
    write_predictions(out / PREDICTIONS, worker.rank, rows)
    eval_versions = _summed(dict(join.rows_by_version) if join else {})
    eval_stats = _gathered(reader.stats.as_dict())
    dist.barrier()
    if not worker.is_main:
        return {}
    preds = read_predictions(out / PREDICTIONS)
    metrics = {**summary, "eval_versions": eval_versions,
               "score_examples_per_s": len(preds["p_ctr"]) / seconds,
               "eval": ranker_metrics(preds), "data_repairs_eval": eval_stats}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    e = metrics["eval"]
    print(f"{summary['upstream']}: CTR NE {e['ctr']['ne']:.4f} AUC {e['ctr']['auc']:.4f}, "
          f"CVR NE {e['cvr'].get('ne', float('nan')):.4f} on {eval_day}"
          f"{' with ' + ', '.join(eval_versions) if eval_versions else ''}; metrics in {out / 'metrics.json'}")
    return metrics


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    # dest "ranker": `args.run` is the CLI's handler
    p.add_argument("--run", dest="ranker", type=Path, required=True,
                   help="a ranker run (derl train-downstream --out)")
    p.add_argument("--out", type=Path, required=True, help="folder for its predictions and metrics")
    p.add_argument("--snapshots", type=Path, help="snapshot root (default: the run's)")
    p.add_argument("--snapshot-version",
                   help="join every row with this version (default: the one live on its day)")
    p.add_argument("--data", type=Path, help="source folder (default: the run's)")
    p.add_argument("--eval-day", help="day to score (default: the run's evaluation day)")
    p.add_argument("--nproc", type=int, default=1)


def validate_score(args: argparse.Namespace) -> None:
    if not (args.ranker / "config.json").is_file() or checkpoint.latest(args.ranker / "checkpoints") is None:
        raise FileNotFoundError(f"--run {args.ranker}: not a finished ranker run (config.json, checkpoints)")


def rescore(args: argparse.Namespace) -> Dict[str, object]:
    """`derl score`: a trained ranker, reloaded (on any number of ranks: DCP reshards), scores
    a day with the snapshot version of your choice — e.g. a ranker trained on version N scored
    with N+1, raw or aligned. Writes what a training run writes: predictions and metrics."""
    return derl_dist.run_as_worker(_rescore, args)


def _rescore(args: argparse.Namespace, worker: derl_dist.Worker) -> Dict[str, object]:
    meta = json.loads((args.ranker / "config.json").read_text())
    cfg = checkpoint.config_from_json(RankerConfig, meta["model"])
    upstream = {d: load_model_config(Path(c).parent.parent) for d, c in meta["coupled_checkpoints"].items()}
    dmp, optimizer, _ = shard_model(Ranker(cfg, torch.device("meta"), upstream), worker.device, OptimConfig())
    checkpoint.load(checkpoint.latest(args.ranker / "checkpoints"), dmp, optimizer)
    snapshots = args.snapshots or (Path(meta["snapshots"]) if meta["snapshots"] else None)
    trained = json.loads((args.ranker / "metrics.json").read_text())
    summary = {k: trained[k] for k in ("upstream", "vectors", "projection_dim", "steps", "train_days",
                                        "train_examples_per_s", "snapshot_dim", "coupled_checkpoints",
                                        "snapshot_versions")}
    summary.update(world_size=worker.world_size, eval_day=args.eval_day or meta["eval_day"],
                   rescored_from=str(args.ranker))
    if worker.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
    make_join = (lambda: SnapshotJoin(snapshots, cfg.vectors, args.snapshot_version, cfg.upstream_dim)) \
        if cfg.upstream == "snapshot" else None
    return score_and_report(dmp, worker, Path(args.data or meta["data"]), summary["eval_day"],
                            SourceTables(Path(args.data or meta["data"])).vocab(), make_join,
                            args.out, summary)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m` / `torchrun -m` entry: the same as `derl train-downstream`."""
    from derl.launchers import cli

    cli.main(["train-downstream", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
