"""Upstream training throughput: labelled rows and next-Pin positions a second of DERM on 1 and
2 CPU ranks, histories of 32 and 128 events, the plain loop against TorchRec's pipeline, where a
step's time goes, and the transformer against the matmul limit and the reference SASRec
(DIR/upstream.{json,md,png}; what each figure is: docs/results.md, "Upstream training").

    python -m derl.benchmarks.upstream_bench --out DIR [--data WORLD] [--steps N] [--warmup N]
        [--profile-steps N] [--batch-size 256] [--embedding-dim 64] [--seq-layers 2]
        [--threads N] [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from derl.benchmarks import report, upstream_limits
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import WORLD_PRESETS, WORLD_META, generate
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.stages import train_upstream
from derl.launchers.runtime.config import check, default_of, setting
from derl.launchers.runtime.settings import TrainUpstreamConfig

EMBEDDING_MODULES = ("user_ebc", "sequence_ec")
# `upstream_limits` figures in the table (the plain 1-rank rows).
LIMITS = ("transformer_gflop_s", "matmul_gflop_s", "matmul_dtype", "fraction_of_matmul_peak",
          "sasrec_examples_per_s")
SEQ_LENS = (32, 128)
# Train on the last upstream days: the reader goes through days in order (a bounded shuffle),
# so a short run from the first day would see users with no history yet: empty sequences.
BENCH_DAYS = 3


def _build(spec: Dict, worker: derl_dist.Worker):
    """The model, optimizer and batch stream exactly as `train-upstream` builds them."""
    t = train_upstream.build(TrainUpstreamConfig(**spec["config"]), worker)
    return t.dmp, t.optimizer, t.stream


def _bench_days(world: Path) -> Dict[str, str]:
    """The last BENCH_DAYS upstream days of `world`, as from_day / until."""
    days = SourceTables(world).days("engagements")
    first, last = default_split(days).upstream_days
    upstream = [d for d in days if first <= d <= last]
    return {"from_day": upstream[-BENCH_DAYS:][0], "until": last}


def _worker(spec: Dict) -> Dict[str, float]:
    """One rank of one configuration (module level: spawned workers unpickle it)."""
    worker = derl_dist.init()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        dmp, optimizer, stream = _build(spec, worker)
        lengths: List[float] = []
        rows: List[int] = []
        positions: List[int] = []

        def batches_of(it: Iterator) -> Iterator:  # records each batch's rows, targets and context
            for b in it:
                context = b.dense["context_len"]
                lengths.append(float(context.float().mean()))
                rows.append(len(b.meta["pin_id"]))
                positions.append(int((b.sparse["seq_pin_id"].lengths() - context).sum()))
                yield b

        batches = batches_of(stream.iterate())
        dmp.train()
        if spec["loop"] == "pipeline":
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            pipeline = TrainPipelineSparseDist(dmp, optimizer, worker.device)
            step = lambda: pipeline.progress(batches)
        else:
            def step():
                with record_function("derl::data"):
                    batch = next(batches).to(worker.device)
                loss, _ = dmp(batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        for _ in range(spec["warmup"]):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        seconds = time.perf_counter() - t0
        out = {"seconds": seconds, "mean_seq": sum(lengths) / len(lengths),
               "rows_per_step": sum(rows) / len(rows), "positions_per_step": sum(positions) / len(positions),
               "threads": torch.get_num_threads(), "peak_rss_mb": report.peak_rss_mb()}
        if spec["profile_steps"] and spec["loop"] == "plain" and worker.world_size == 1:
            out.update(_breakdown(dmp, step, spec["profile_steps"]))
        if spec.get("limits") and worker.world_size == 1:
            out.update(_limits(dmp.module, step))
        batches.close()
        return out
    finally:
        derl_dist.shutdown()


def _breakdown(dmp, step, steps: int) -> Dict[str, float]:
    """Shares of profiled step time in the embedding modules and the transformer (docstring)."""
    model = dmp.module
    scoped = {f"derl::embedding.{n}": getattr(model, n) for n in EMBEDDING_MODULES}
    scoped["derl::transformer"] = model.towers.user.sequence
    handles, open_scopes = [], {}
    for name, m in scoped.items():
        def pre(mod, inp, name=name):
            open_scopes[name] = record_function(name).__enter__()

        def post(mod, inp, outp, name=name):
            open_scopes.pop(name).__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("derl::step"):
                    step()
    finally:
        for h in handles:
            h.remove()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    kind = lambda name: name.split("::")[1].split(".")[0]  # embedding, transformer
    scopes = [(e.thread, e.time_range.start, e.time_range.end, kind(e.name))
              for e in events if e.name.startswith(("derl::embedding", "derl::transformer"))]
    spent = {"embedding": 0.0, "transformer": 0.0}
    for _, start, end, k in scopes:  # forward
        spent[k] += end - start
    # A forward op carries the sequence nr of the next autograd node; the last op with nr n made
    # node n, so the scope of that op (None: outside both) owns node n's backward.
    owner = {}
    for e in events:
        forward_op = not e.fwd_thread and not e.name.startswith(("autograd::", "derl::"))
        if e.sequence_nr >= 0 and forward_op:
            owner[(e.thread, e.sequence_nr)] = next(
                (k for thread, start, end, k in scopes
                 if thread == e.thread and start <= e.time_range.start <= end), None)
    for e in events:  # backward: each autograd node's whole evaluation
        if e.name.startswith("autograd::engine::evaluate_function"):
            k = owner.get((e.fwd_thread, e.sequence_nr))
            if k:
                spent[k] += e.time_range.end - e.time_range.start
    span = lambda name: sum(e.time_range.end - e.time_range.start for e in events if e.name == name)
    total = span("derl::step")
    shares = {f"{k}_%": 100 * v / total for k, v in {**spent, "data": span("derl::data")}.items()}
    return {**shares, "rest_%": 100 - sum(shares.values()), "profiled_step_ms": total / 1e3 / steps}


def _limits(model, step) -> Dict[str, float]:
    """`upstream_limits.measure` on the next training batch's sequences (one more step, whose
    encoder inputs a hook keeps)."""
    encoder = model.towers.user.sequence
    seen = {}

    def keep(module, args, kwargs):
        seen["events"], seen["lengths"] = args[0].detach(), args[1]

    handle = encoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        step()
    finally:
        handle.remove()
    return upstream_limits.measure(encoder, seen["events"], seen["lengths"], model.cfg.num_embeddings["pin_id"])


def headline_of(rows: List[Dict]) -> Dict[str, float]:
    """One sequence length's figures: examples/s of 1 rank on the pipeline (the way
    `train-upstream` trains), the transformer's fraction of the matmul rate and that examples/s
    over the reference SASRec's (both measured in the plain 1-rank run)."""
    pipeline = next(r for r in rows if r["world_size"] == 1 and r["loop"] == "pipeline")
    plain = next(r for r in rows if r["world_size"] == 1 and r["loop"] == "plain")
    return {"examples_per_s": pipeline["examples_per_s"],
            "fraction_of_matmul_peak": plain["fraction_of_matmul_peak"],
            "upstream_vs_sasrec_ratio": pipeline["examples_per_s"] / plain["sasrec_examples_per_s"]}


def measure(world: Path, config: Dict, seq_len: int, world_size: int, loop: str, steps: int,
            warmup: int, profile_steps: int = 0, threads: Optional[int] = None) -> Dict:
    """One configuration's table row, measured in fresh processes (so its peak memory and
    threads are its own): `config` holds TrainUpstreamConfig overrides with `out` and
    `batch_size`; the plain loop also measures `upstream_limits` (one rank)."""
    config = {**config, "data": world, "seq_len": seq_len, "max_steps": warmup + steps,
              **_bench_days(world)}
    spec = {"config": config, "seq_len": seq_len, "loop": loop, "steps": steps, "warmup": warmup,
            "profile_steps": profile_steps, "threads": threads, "limits": loop == "plain"}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        r = pool.submit(derl_dist.launch, _worker, world_size, spec).result()
    return {
        "seq_len": seq_len, "world_size": world_size, "loop": loop,
        "threads": r["threads"], "mean_seq": r["mean_seq"],
        "examples_per_s": world_size * r["rows_per_step"] * steps / r["seconds"],
        "positions_per_s": world_size * r["positions_per_step"] * steps / r["seconds"],
        "step_ms": 1e3 * r["seconds"] / steps,
        **{k: r.get(k, "-") for k in ("embedding_%", "transformer_%", "data_%", "rest_%",
                                      "profiled_step_ms", *LIMITS)},
        "peak_rss_mb": r["peak_rss_mb"],
    }


def _worlds(cfg: "UpstreamBenchConfig") -> Dict[int, Path]:
    if cfg.data:
        return {n: cfg.data for n in SEQ_LENS}
    base = WORLD_PRESETS["tiny" if cfg.quick else "demo"]
    worlds = {n: cfg.out / f"world-{'tiny' if cfg.quick else 'demo'}-seq{n}" for n in SEQ_LENS}
    for n, path in worlds.items():
        if not path.exists():
            print(f"generating {path}")
            generate(path, dataclasses.replace(base, sequence_length=n), seed=0)
    return worlds


def stored_seq_len(world: Path) -> int:
    return json.loads((world / WORLD_META).read_text())["config"]["sequence_length"]


def _plot(rows: List[Dict], path: Path) -> None:
    with report.figure(path, figsize=(1.6 * len(rows) + 1, 4), title="DERM upstream training, CPU") as (ax,):
        ax.bar([f"seq {r['seq_len']}\n{r['world_size']} rank(s)\n{r['loop']}" for r in rows],
               [r["examples_per_s"] for r in rows],
               color=["C0" if r["loop"] == "pipeline" else "C1" for r in rows])
        ax.set_ylabel("training examples/s (global)")


@dataclass(frozen=True)
class UpstreamBenchConfig:
    out: Path = setting(help="folder for the worlds, the runs and upstream.{json,md,png}")
    data: Optional[Path] = setting(None, "source folder (default: worlds made under --out)")
    steps: Optional[int] = setting(None, "timed steps (default 20; --quick 3)")
    warmup: Optional[int] = setting(None, "untimed steps first (default 4: the first steps run slow; --quick 1)")
    profile_steps: Optional[int] = setting(None, "steps profiled for the breakdown (default 3; --quick 2)")
    batch_size: Optional[int] = setting(None, "user windows a step, per rank (default 256; --quick 64)")
    embedding_dim: int = setting(default_of(TrainUpstreamConfig, "embedding_dim"), "width of the model")
    seq_layers: int = setting(default_of(TrainUpstreamConfig, "seq_layers"), "transformer layers")
    threads: Optional[int] = setting(None, "intra-op threads per rank (default: cores / ranks)")
    quick: bool = setting(False, "tiny world, few steps: a smoke test")

    def __post_init__(self) -> None:
        check(self, positive=("steps", "profile_steps", "batch_size", "embedding_dim", "seq_layers", "threads"),
              non_negative=("warmup",))

    def pick(self, name: str, quick: int, full: int) -> int:
        """The flag's value, or its default for a quick or a full run."""
        given = getattr(self, name)
        return given if given is not None else quick if self.quick else full


def main(argv: Optional[List[str]] = None) -> None:
    cfg = report.parse_config(UpstreamBenchConfig, argv, __doc__)
    steps, warmup = cfg.pick("steps", 3, 20), cfg.pick("warmup", 1, 4)
    profile_steps, batch_size = cfg.pick("profile_steps", 2, 3), cfg.pick("batch_size", 64, 256)
    worlds = _worlds(cfg)
    config = {"out": cfg.out / "run", "batch_size": batch_size, "embedding_dim": cfg.embedding_dim,
              "seq_layers": cfg.seq_layers}

    rows = []
    for seq_len in SEQ_LENS:
        for world_size, loop in ((1, "pipeline"), (1, "plain"), (2, "pipeline")):
            print(f"seq {seq_len}, {world_size} rank(s), {loop} ...", flush=True)
            rows.append(measure(worlds[seq_len], config, seq_len, world_size, loop, steps, warmup,
                                profile_steps, cfg.threads))
    headline = {n: headline_of([r for r in rows if r["seq_len"] == n]) for n in SEQ_LENS}
    meta = {**report.machine(threads=False, cores=True), "batch_size": batch_size,  # threads: per row
            "embedding_dim": cfg.embedding_dim, "seq_layers": cfg.seq_layers, "steps": steps,
            "warmup": warmup, "profile_steps": profile_steps,
            "worlds": {n: f"{w} (stored seq {stored_seq_len(w)})" for n, w in worlds.items()},
            "headline": headline}
    report.publish(cfg.out, "upstream", rows, meta, _plot)


if __name__ == "__main__":
    main()
