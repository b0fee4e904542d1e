"""Embedding-table scaling: training steps/s and an export-like pass (entities/s) over one sharded
table of N rows, with peak memory, for N = 10^5, 10^6, 10^7, each size in a fresh process on the
device the stages use (this prints the table and writes DIR/scaling.{json,md,png}; the model and
what each figure is: docs/results.md, "What the harnesses measure").

    python -m derl.benchmarks.scaling_bench --out DIR [--rows 100000 1000000 10000000] [--dim 64]
        [--batch-size 2048] [--ids-per-example 1] [--steps 20] [--warmup 3]
        [--export-batch 8192] [--nproc 1]
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from derl.benchmarks import report
from derl.launchers.runtime.config import check, setting

QUICK_ROWS = (10**5, 10**6)
FULL_ROWS = (10**5, 10**6, 10**7)


@dataclass(frozen=True)
class ScalingBenchConfig:
    out: Path = setting(help="folder for scaling.{json,md,png} (and each size's Parquet part, removed after)")
    rows: Tuple[int, ...] = setting(FULL_ROWS, "table sizes, one fresh process each", many=True)
    dim: int = setting(64, "embedding dimension")
    batch_size: int = setting(2048, "per rank")
    ids_per_example: int = setting(1, "ids per example, drawn uniformly from the table")
    steps: int = setting(20, "timed training steps")
    warmup: int = setting(3, "untimed training steps first")
    export_batch: int = setting(8192, "ids per chunk of the export-like pass")
    nproc: int = setting(1, "ranks (on CPU they share the host's cores)")

    def __post_init__(self) -> None:
        check(self, positive=("dim", "batch_size", "ids_per_example", "steps", "export_batch", "nproc"),
              non_negative=("warmup",))


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
    """One table size, in a fresh process (with --nproc ranks): its row of the table (docs/results.md,
    "What the harnesses measure")."""
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
    n = [r["rows"] for r in rows]
    first = rows[0]
    title = (f"{title}: dim {first['dim']}, batch {first['batch_size']}, {first['world_size']} rank(s), "
             f"{first['device']}")
    with report.figure(path, 3, (13, 3.8), title) as axes:
        for ax, key, label in zip(axes, ("train_steps_per_s", "export_entities_per_s", "peak_rss_mb"),
                                  ("training steps/s", "export entities/s", "peak RSS (MB)")):
            ax.plot(n, [r[key] for r in rows], marker="o")
            ax.set(xscale="log", ylim=(0, max(r[key] for r in rows) * 1.15), xlabel="table rows", ylabel=label)
            ax.grid(True, which="both", alpha=0.3)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    config = report.parse_config(ScalingBenchConfig, argv, __doc__)
    rows = []
    for n in config.rows:
        print(f"scaling: {n:,} rows x {config.dim} ...", flush=True)
        rows.append(measure(n, config.out, config.dim, config.batch_size, config.ids_per_example,
                            config.steps, config.warmup, config.export_batch, config.nproc))
    meta = {**report.machine(threads=False, cores=True),
            "batch_size": config.batch_size, "ids_per_example": config.ids_per_example,
            "steps": config.steps, "warmup": config.warmup, "export_batch": config.export_batch}
    return report.publish(config.out, "scaling", rows, meta, plot, columns=TABLE_COLUMNS)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
