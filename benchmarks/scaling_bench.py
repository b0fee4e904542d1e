"""Embedding-table scaling: training steps/s and an export-like pass (entities/s) over one table
of N rows, with peak memory, for N = 10^5, 10^6, 10^7 (this prints the table and writes
DIR/scaling.{json,md,png}).

    python -m derl.benchmarks.scaling_bench --out DIR [--rows 100000 1000000 10000000] [--dim 64]
        [--batch-size 2048] [--ids-per-example 1] [--steps 20] [--warmup 3]
        [--export-batch 8192] [--nproc 1]

What runs, in a fresh process per size (its peak memory is its own), on the device the stages
use (`derl.launchers.runtime.dist.init`: CUDA when present, else CPU and gloo):
- the model: one `EmbeddingBagCollection` table of N rows x --dim (sum pooling, one feature)
  and a linear logit on the pooled vector, BCE against random labels; built on the meta device
  and sharded by `derl.models.sharding.shard_model` exactly as the stages' models are
  (planner, `DistributedModelParallel`, row-wise Adagrad fused into the embedding backward,
  Adam on the dense part);
- training: `--warmup` untimed then `--steps` timed steps of --batch-size examples per rank,
  each with --ids-per-example ids drawn uniformly from the N rows (no cache locality: the
  table-size effect at its plainest); steps_per_s and examples_per_s (global) over the timed
  steps, plain loop (forward, backward with the fused update, dense step);
- export-like pass: every row's pooled vector once, without gradients, in chunks of
  --export-batch ids (each rank its own share, `derl.launchers.runtime.embedding.rank_chunks`), each
  chunk streamed into a Parquet part of the snapshot schema (entity_id, embedding) as `derl
  export` writes; entities_per_s = N / seconds of the slowest rank. The part is deleted after.
- peak_rss_mb: rank 0's peak resident memory after training and after the export pass (it
  holds the table, its Adagrad state, and whatever the planner and DMP allocated).
On CPU, ranks of one host share its cores: --nproc 2 on 2 cores measures the all-to-all cost,
not a speed-up.
"""

from __future__ import annotations

import argparse
import time
import traceback
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional

from derl.benchmarks import report

QUICK_ROWS = (10**5, 10**6)
FULL_ROWS = (10**5, 10**6, 10**7)


def _model(rows: int, dim: int):
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    class TableModel(nn.Module):
        """One big id table and a linear logit: the smallest model whose cost is the table."""

        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                [EmbeddingBagConfig(name="t_ids", embedding_dim=dim, num_embeddings=rows,
                                    feature_names=["ids"], pooling=PoolingType.SUM)],
                device=torch.device("meta"))
            self.head = nn.Linear(dim, 1)

        def embed(self, kjt):
            return self.ebc(kjt)["ids"]

        def forward(self, kjt, labels):
            logit = self.head(self.embed(kjt)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logit, labels)

    return TableModel()


def _kjt(ids, per_example: int, device):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    lengths = torch.full((len(ids) // per_example,), per_example, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=["ids"], values=ids, lengths=lengths).to(device)


def _worker(spec: Dict) -> Dict[str, float]:
    """One rank: shard, train, export (module level: spawned workers unpickle it)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from derl.datapipes.snapshots import PartWriter, part_name
    from derl.launchers.runtime import dist as derl_dist
    from derl.launchers.runtime.embedding import rank_chunks
    from derl.models.sharding import OptimConfig, describe_plan, shard_model

    worker = derl_dist.init()
    try:
        rows, dim, batch, per = spec["rows"], spec["dim"], spec["batch_size"], spec["ids_per_example"]
        torch.manual_seed(spec.get("seed", 0) + worker.rank)
        t0 = time.perf_counter()
        dmp, optimizer, plan = shard_model(_model(rows, dim), worker.device, OptimConfig())
        setup_s = time.perf_counter() - t0
        sync = torch.cuda.synchronize if worker.device.type == "cuda" else (lambda: None)

        def step() -> None:
            ids = torch.randint(rows, (batch * per,), dtype=torch.int64)
            labels = torch.randint(2, (batch,), dtype=torch.float32, device=worker.device)
            loss = dmp(_kjt(ids, per, worker.device), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        dmp.train()
        for _ in range(spec["warmup"]):
            step()
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync()
        train_s = _slowest(time.perf_counter() - t0, worker.device)
        train_rss = report.peak_rss_mb()

        dmp.eval()
        chunks = rank_chunks(np.arange(rows, dtype=np.int64), worker.rank, worker.world_size,
                             spec["export_batch"])
        part = Path(spec["out"]) / f"scaling-{rows}" / part_name(worker.rank)
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad(), PartWriter(part, dim) as writer:
            for ids, real in chunks:
                vectors = dmp.module.embed(_kjt(torch.from_numpy(ids), 1, worker.device))
                writer.write(ids[:real], vectors[:real].float().cpu().numpy())
        export_s = _slowest(time.perf_counter() - t0, worker.device)
        total = derl_dist.reduced(writer.rows, "sum", worker.device)
        part_mb = part.stat().st_size / 2**20
        part.unlink()
        return {
            "rows": rows, "dim": dim, "world_size": worker.world_size,
            "device": str(worker.device), "threads": torch.get_num_threads(),
            "plan": "; ".join(describe_plan(plan)),
            "setup_s": setup_s,
            "train_steps_per_s": spec["steps"] / train_s,
            "train_examples_per_s": spec["steps"] * batch * worker.world_size / train_s,
            "train_peak_rss_mb": train_rss,
            "exported": int(total),
            "export_entities_per_s": int(total) / export_s,
            "export_part_mb": part_mb,
            "peak_rss_mb": report.peak_rss_mb(),
        }
    finally:
        derl_dist.shutdown()


def _slowest(seconds: float, device) -> float:
    from derl.launchers.runtime import dist as derl_dist

    return max(derl_dist.reduced(seconds, "max", device), 1e-9)


def _call(conn, fn, args) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn: Callable, *args, timeout: Optional[float] = None):
    """fn(*args) in a new spawned process (its peak memory and threads are its own); its
    result, or RuntimeError with its traceback; killed past `timeout` seconds."""
    ctx = get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call, args=(send, fn, args))
    proc.start()
    send.close()
    ready = False
    try:
        ready = receive.poll(timeout)  # a result, or the end of the pipe (the process died)
        if not ready:
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout:.0f} s; killed")
        try:
            ok, value = receive.recv()
        except EOFError:
            ok, value = False, "the process died without a result"
    finally:
        if not ready:
            proc.kill()
        proc.join()
        receive.close()
    if not ok:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its process:\n{value}")
    return value


def measure(rows: int, out: Path, dim: int = 64, batch_size: int = 2048, ids_per_example: int = 1,
            steps: int = 20, warmup: int = 3, export_batch: int = 8192, nproc: int = 1,
            seed: int = 0, timeout: Optional[float] = None) -> Dict[str, object]:
    """One table size, in a fresh process (with --nproc ranks): the table row of the docstring."""
    from derl.launchers.runtime import dist as derl_dist

    spec = {"rows": rows, "dim": dim, "batch_size": batch_size, "ids_per_example": ids_per_example,
            "steps": steps, "warmup": warmup, "export_batch": export_batch, "out": str(out),
            "seed": seed}
    t0 = time.perf_counter()
    r = in_fresh_process(derl_dist.launch, _worker, nproc, spec, timeout=timeout)
    r = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
    return {**r, "batch_size": batch_size, "ids_per_example": ids_per_example, "steps": steps,
            "wall_s": round(time.perf_counter() - t0, 1)}


TABLE_COLUMNS = ("rows", "dim", "world_size", "train_steps_per_s", "train_examples_per_s",
                 "train_peak_rss_mb", "export_entities_per_s", "export_part_mb", "peak_rss_mb",
                 "setup_s", "wall_s")


def plot(rows: List[Dict[str, object]], path: Path, title: str = "embedding-table scaling") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["rows"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "train_steps_per_s", "training steps/s"),
                           (axes[1], "export_entities_per_s", "export entities/s"),
                           (axes[2], "peak_rss_mb", "peak RSS (MB)")):
        ax.plot(n, [r[key] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_ylim(0, max(r[key] for r in rows) * 1.15)
        ax.set_xlabel("table rows")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: dim {rows[0]['dim']}, batch {rows[0]['batch_size']}, "
                 f"{rows[0]['world_size']} rank(s), {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", type=int, nargs="+", default=list(FULL_ROWS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2048, help="per rank")
    p.add_argument("--ids-per-example", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--export-batch", type=int, default=8192)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args(argv)
    rows = []
    for n in args.rows:
        print(f"scaling: {n:,} rows x {args.dim} ...", flush=True)
        rows.append(measure(n, args.out, args.dim, args.batch_size, args.ids_per_example,
                            args.steps, args.warmup, args.export_batch, args.nproc))
    meta = {**report.machine(threads=False, cores=True),
            "batch_size": args.batch_size, "ids_per_example": args.ids_per_example,
            "steps": args.steps, "warmup": args.warmup, "export_batch": args.export_batch}
    return report.publish(args.out, "scaling", rows, meta, plot, columns=TABLE_COLUMNS)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
