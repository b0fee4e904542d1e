"""`derl bench`: every stage's throughput and peak memory in one run (datapipe, upstream, export,
downstream, ann, sharding, scaling), each measured command a process of its own, into
DIR/bench.json, DIR/bench.md and DIR/bench-*.png. The suites, the stages and what each figure
is: docs/results.md, "The suite (`derl bench`)".

    derl bench [--suite quick|full] --out DIR [--data WORLD] [--snapshots SNAP]
        [--stages datapipe,upstream,export,downstream,ann,sharding,scaling]
        [--upstream-steps N] [--downstream-steps N] [--scaling-rows N ...] [--ann-ads N ...]
        [--vectors all|user_pin|user] [--env KEY=VALUE ...]
    derl bench --suite seqrec --help   (a runner of its own: docs/seqrec.md)
    derl bench --suite serve --help    (a runner of its own: `derl serve` under load, docs/serving.md)
    python -m derl.benchmarks.bench ...   (the same)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from derl.benchmarks import report
from derl.benchmarks.scaling_bench import in_fresh_process
from derl.datapipes.domains import DOMAINS
from derl.launchers.runtime.config import setting, to_flags
from derl.launchers.runtime.presets import SMALL_RANKER, SMALL_UPSTREAM
from derl.launchers.runtime.processes import StageFailed, run_derl
from derl.launchers.runtime.settings import TrainDownstreamConfig, TrainUpstreamConfig

BENCH_STAGES = ("datapipe", "upstream", "export", "downstream", "ann", "sharding", "scaling")

SUITES: Dict[str, Dict[str, object]] = {
    "quick": {
        "preset": "tiny",
        "timeout_s": 300,  # per measured command: a hung one is killed, its stage fails
        "datapipe_batch": 1024,
        "upstream": SMALL_UPSTREAM,  # TrainUpstreamConfig overrides
        "upstream_steps": 10,
        "upstream_limits": {"steps": 3, "warmup": 1},  # upstream_bench.measure: timed, untimed steps
        "downstream": SMALL_RANKER,  # TrainDownstreamConfig overrides
        "downstream_steps": 40,
        "ann": ["--queries", "500", "--min-time", "0.2"],
        "ann_ads": [100_000],
        "scaling_rows": [10**5, 10**6],
        "scaling": {"dim": 64, "batch_size": 2048, "steps": 20, "warmup": 3, "export_batch": 8192},
    },
    "full": {
        "preset": "demo",
        "timeout_s": 1800,
        "datapipe_batch": 2048,
        "upstream": {"embedding_dim": 64, "seq_layers": 2, "batch_size": 1024},
        "upstream_steps": 40,
        "upstream_limits": {"steps": 8, "warmup": 2},
        "downstream": {"embedding_dim": 16, "batch_size": 1024},
        "downstream_steps": 200,
        "ann": ["--queries", "2000", "--min-time", "1.0"],
        "ann_ads": [1_000_000],
        "scaling_rows": [10**5, 10**6, 10**7],
        "scaling": {"dim": 64, "batch_size": 4096, "steps": 50, "warmup": 5, "export_batch": 16384},
    },
}


# Suites with a runner of their own (own flags and outputs): `--suite NAME` hands the whole
# command line to that module's run(argv).
OWN_RUNNERS = {"seqrec": "derl.benchmarks.studies.seqrec.suite", "serve": "derl.benchmarks.serve_bench",
               "freshness": "derl.benchmarks.studies.freshness"}


@dataclass(frozen=True)
class BenchConfig:
    out: Path = setting(help="folder for the results (and the work)")
    suite: str = setting("quick", "the suite's settings (SUITES); seqrec: a runner of its own",
                         choices=sorted(SUITES) + sorted(OWN_RUNNERS))
    data: Optional[Path] = setting(None, "source folder (default: the suite's world, made under --out)")
    snapshots: Optional[Path] = setting(None, "snapshot root the downstream, ann and sharding stages read "
                                              "(default: the export stage's DIR/snapshots)")
    stages: str = setting(",".join(BENCH_STAGES), "the stages to run, comma-separated; they run in the "
                                                  "default's order")
    upstream_steps: Optional[int] = setting(None, "train-upstream --max-steps (suite default)")
    downstream_steps: Optional[int] = setting(None, "train-downstream --max-steps (suite default)")
    scaling_rows: Optional[Tuple[int, ...]] = setting(None, "table sizes (suite default)", many=True)
    ann_ads: Optional[Tuple[int, ...]] = setting(None, "synthetic catalogue sizes; 0: none", many=True)
    vectors: str = setting("all", "train-downstream --vectors for snapshot and coupled")
    # Optional, not an empty tuple: argparse appends a repeated flag's values to its default.
    env: Optional[Tuple[str, ...]] = setting(None, "set in the environment of every measured process (repeat), "
                                                   "e.g. OMP_WAIT_POLICY=PASSIVE on a CPU host shared with "
                                                   "other work", repeat=True, metavar="KEY=VALUE")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stage_list) - set(BENCH_STAGES))
        if unknown:
            raise ValueError(f"--stages: unknown {', '.join(unknown)} (known: {', '.join(BENCH_STAGES)})")
        if any("=" not in kv for kv in self.env or ()):
            raise ValueError(f"--env: expected KEY=VALUE, got {list(self.env)}")

    @property
    def stage_list(self) -> List[str]:
        """The stages asked for, in the order given (`Bench` runs them in BENCH_STAGES' order)."""
        return [s.strip() for s in self.stages.split(",") if s.strip()]


class Bench:
    """The suite's state: settings, what the stages produced, their results and errors."""

    def __init__(self, config: BenchConfig, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.suite = dict(SUITES[config.suite])
        for key in ("upstream_steps", "downstream_steps", "scaling_rows", "ann_ads"):
            if getattr(config, key) is not None:
                self.suite[key] = getattr(config, key)
        self.upstream_flags = to_flags(TrainUpstreamConfig, self.suite["upstream"])
        self.downstream_flags = to_flags(TrainDownstreamConfig, self.suite["downstream"])
        self.out: Path = config.out
        self.logs = self.out / "logs"
        self.data: Optional[Path] = config.data
        self.snapshots: Optional[Path] = config.snapshots
        self.upstream_runs: Dict[str, Path] = {}
        self.stages: Dict[str, Dict[str, object]] = {}
        self.table: List[Dict[str, object]] = []
        self.errors: Dict[str, str] = {}
        self.headline: Dict[str, object] = {}

    # -- helpers ----------------------------------------------------------------------------

    def row(self, stage: str, what: str, ranks: object, throughput: float, unit: str,
            peak_rss_mb: Optional[float], wall_s: Optional[float], load_1m: Optional[float]) -> None:
        self.table.append({"stage": stage, "what": what, "ranks": ranks,
                           "throughput": round(float(throughput), 1), "unit": unit,
                           "peak_rss_mb": peak_rss_mb, "wall_s": wall_s, "load_1m": load_1m})

    def world(self) -> Path:
        """The source folder: --data, or the suite's preset generated once under DIR."""
        if self.data is None:
            from derl.datapipes.world import WORLD_PRESETS, WORLD_META, generate

            preset = str(self.suite["preset"])
            self.data = self.out / f"world-{preset}"
            if not (self.data / WORLD_META).is_file():
                print(f"generating the {preset} world into {self.data} ...", flush=True)
                generate(self.data, WORLD_PRESETS[preset], seed=0, overwrite=True)
        return self.data

    def snapshot_root(self) -> Path:
        if self.snapshots is None:
            raise RuntimeError("needs a snapshot: run the upstream and export stages, or pass --snapshots")
        return self.snapshots

    def upstream_out(self, domain: str, nproc: int) -> Path:
        return self.out / "runs" / f"upstream-{domain}-ws{nproc}"

    def upstream_run(self, stage: str, domain: str, nproc: int) -> Dict[str, object]:
        """One `derl train-upstream` from scratch into `upstream_out`: its row (and its line in
        `stage`'s part of the table)."""
        out = self.upstream_out(domain, nproc)
        shutil.rmtree(out, ignore_errors=True)
        argv = ["train-upstream", "--data", self.world(), "--out", out, "--domain", domain,
                "--max-steps", self.suite["upstream_steps"], "--checkpoint-every", 10**9,
                "--nproc", nproc, *self.upstream_flags]
        proc = run_derl(argv, log=self.logs / f"{out.name}.log", timeout=self.suite["timeout_s"]).figures()
        m = json.loads((out / "metrics.json").read_text())
        self.row(stage, f"train-upstream {domain}, {m['steps']} steps", m["world_size"],
                 m["train_examples_per_s"], "examples/s", proc["peak_rss_mb"], proc["wall_s"],
                 proc["load_1m"])
        return {"domain": domain, "world_size": m["world_size"], "steps": m["steps"],
                "train_examples_per_s": round(m["train_examples_per_s"], 1), **proc}

    def downstream(self, mode: str, nproc: int) -> Dict[str, object]:
        from derl.benchmarks import downstream_bench

        return downstream_bench.measure(
            self.world(), self.snapshots if mode != "none" else None,
            self.out / "runs" / f"downstream-{mode}-ws{nproc}", mode, nproc,
            int(self.suite["downstream_steps"]), self.config.vectors, self.downstream_flags, self.logs,
            self.suite["timeout_s"])

    @contextlib.contextmanager
    def quiet(self, name: str) -> Iterator[None]:
        """Send fds 1 and 2 (so every process spawned meanwhile) into DIR/logs/NAME.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        with open(self.logs / f"{name}.log", "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)

    # -- stages -----------------------------------------------------------------------------

    def datapipe(self) -> str:
        data, batch = self.world(), int(self.suite["datapipe_batch"])
        rows, load = [], _load()
        with self.quiet("datapipe"):
            for side in ("upstream", "downstream"):
                rows += in_fresh_process(_datapipe_side, data, side, batch, (4, 0),
                                         timeout=self.suite["timeout_s"])
        for r in rows:
            self.row("datapipe", f"{r['reader']} reader ({r['table']}), prefetch {r['prefetch']}, "
                     f"batch {r['batch_size']}", 1, r["examples_per_s"], "examples/s", r["peak_rss_mb"], None, load)
        self.stages["datapipe"] = {"rows": rows}
        return ", ".join(f"{r['reader']}/prefetch {r['prefetch']} {r['examples_per_s']:,.0f}" for r in rows) \
            + " examples/s"

    def upstream(self) -> str:
        rows = []
        for domain in DOMAINS:
            rows.append(self.upstream_run("upstream", domain, 1))
            self.upstream_runs[domain] = self.upstream_out(domain, 1)
        self.stages["upstream"] = {"rows": rows, "flags": self.upstream_flags, "limits": self.upstream_limits()}
        return (", ".join(f"{r['domain']} {r['train_examples_per_s']:,.0f}" for r in rows) + " examples/s; "
                f"transformer at {self.headline['upstream']['fraction_of_matmul_peak']:.2f} of the matmul rate, "
                f"{self.headline['upstream_vs_sasrec_ratio']:.2f}x the reference SASRec")

    def upstream_limits(self) -> List[Dict[str, object]]:
        """The upstream benchmark's two 1-rank rows (pipeline; plain loop with the transformer's
        FLOP rate and the reference SASRec beside it) at the world's stored sequence length;
        their headline goes into bench.json (`upstream`, `upstream_vs_sasrec_ratio`)."""
        from derl.benchmarks import upstream_bench

        world, limits = self.world(), self.suite["upstream_limits"]
        config = {**self.suite["upstream"], "out": self.out / "runs" / "upstream-limits"}
        seq_len = upstream_bench.stored_seq_len(world)
        with self.quiet("upstream-limits"):
            rows = [upstream_bench.measure(world, config, seq_len, 1, loop, limits["steps"], limits["warmup"])
                    for loop in ("pipeline", "plain")]
        headline = upstream_bench.headline_of(rows)
        self.headline["upstream"] = {"seq_len": seq_len, "examples_per_s": round(headline["examples_per_s"], 1),
                                     "fraction_of_matmul_peak": round(headline["fraction_of_matmul_peak"], 4)}
        self.headline["upstream_vs_sasrec_ratio"] = round(headline["upstream_vs_sasrec_ratio"], 3)
        return rows

    def export(self) -> str:
        missing = [d for d in DOMAINS if d not in self.upstream_runs]
        if missing:
            raise RuntimeError(f"needs the upstream stage's runs ({', '.join(missing)} missing)")
        root = self.out / "snapshots"
        argv = ["export", "--data", self.world(), "--out", root, "--overwrite",
                *[a for d in DOMAINS for a in ("--upstream", f"{d}={self.upstream_runs[d]}")]]
        proc = run_derl(argv, log=self.logs / "export.log", timeout=self.suite["timeout_s"]).figures()
        manifest = json.loads((root / (root / "LATEST").read_text().strip() / "manifest.json").read_text())
        rows = []
        for domain, info in manifest["domains"].items():
            rows.append({"domain": domain, **info["rows"], "entities_per_s": round(info["entities_per_s"], 1)})
            self.row("export", f"export {domain} ({info['rows']['users']:,} users + "
                     f"{info['rows']['pins']:,} pins)", manifest["world_size"], info["entities_per_s"],
                     "entities/s", proc["peak_rss_mb"], proc["wall_s"], proc["load_1m"])
        if self.snapshots is None:
            self.snapshots = root
        self.stages["export"] = {"rows": rows, "version": manifest["version"], "dim": manifest["dim"],
                                 "manifest_wall_s": manifest.get("wall_s"), **proc}
        return ", ".join(f"{r['domain']} {r['entities_per_s']:,.0f}" for r in rows) + " entities/s"

    def downstream_stage(self) -> str:
        from derl.benchmarks import downstream_bench

        self.snapshot_root()
        rows, failed = [], []
        for mode in downstream_bench.MODES:  # a mode that fails leaves the others measured
            try:
                rows.append(self.downstream(mode, 1))
            except StageFailed as e:
                self.errors[f"downstream/{mode}"] = str(e)
                failed.append(mode)
        for r in rows:
            self._downstream_rows("downstream", r)
        ratios = downstream_bench.ratios(rows)
        self.headline.update(ratios)
        self.stages["downstream"] = {"rows": rows, "flags": self.downstream_flags, **ratios}
        return (", ".join([f"{r['mode']} {r['train_examples_per_s']:,.0f}" for r in rows]
                          + [f"{m} FAILED" for m in failed])
                + f" train examples/s; decoupled_vs_coupled_ratio {ratios['decoupled_vs_coupled_ratio']}"
                + f" (scoring {ratios['decoupled_vs_coupled_scoring_ratio']})")

    def _downstream_rows(self, stage: str, r: Dict[str, object]) -> None:
        vectors = f", {r['vectors']} vectors" if r["mode"] != "none" else ""
        for key, what in (("train_examples_per_s", "train"), ("score_examples_per_s", "score")):
            self.row(stage, f"{what}-downstream {r['mode']}{vectors}"
                     + (f", {r['steps']} steps" if what == "train" else ""),
                     r["world_size"], r[key], "examples/s", r["peak_rss_mb"], r["wall_s"], r["load_1m"])

    def ann(self) -> str:
        from derl.benchmarks import ann_bench

        argv = ["--out", str(self.out / "ann"), "--ads", *map(str, self.suite["ann_ads"] or [0]),
                *self.suite["ann"]]
        if self.snapshots is not None:
            argv += ["--snapshots", str(self.snapshots)]
        load = _load()
        with self.quiet("ann"):
            result = in_fresh_process(ann_bench.run, argv, timeout=self.suite["timeout_s"])
        meta, rows = result["meta"], result["rows"]
        summary = []
        for ds in dict.fromkeys(r["dataset"] for r in rows):
            mine = [r for r in rows if r["dataset"] == ds]
            picks = [mine[0]]  # flat_ip: exact
            for kind in dict.fromkeys(r["index"] for r in mine[1:]):
                cands = [r for r in mine if r["index"] == kind]
                good = [r for r in cands if r["recall@10_%"] >= 95.0]
                picks.append(max(good, key=lambda r: r["qps_k10"]) if good
                             else max(cands, key=lambda r: r["recall@10_%"]))
            for r in picks:
                summary.append(r)
                self.row("ann", f"faiss {ds}: {r['index']} {r['param']}, recall@10 {r['recall@10_%']:.1f}%",
                         1, r["qps_k10"], "queries/s (k=10)", meta["peak_rss_mb"], meta["wall_s"], load)
        if (self.out / "ann" / "ann.png").is_file():
            shutil.copyfile(self.out / "ann" / "ann.png", self.out / "bench-ann.png")
        self.stages["ann"] = {"summary": summary, "rows": rows, "meta": meta,
                              "note": "summary: exact search, and per index the fastest setting with "
                                      "recall@10 >= 95% (else its best recall)"}
        return "; ".join(f"{r['dataset']} {r['index']} {r['qps_k10']:,.0f} q/s @ {r['recall@10_%']:.0f}%"
                         for r in summary)

    def sharding(self) -> str:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < 2:
            self.stages["sharding"] = {"skipped": "needs 2 GPUs for 2 ranks"}
            return "skipped: needs 2 GPUs"
        pairs = {}
        # upstream, engagement: 1 rank from the upstream stage (or now), 2 ranks now
        up = {nproc: self._measured("upstream", "domain", "engagement", nproc)
              or self.upstream_run("sharding", "engagement", nproc) for nproc in (1, 2)}
        pairs["upstream engagement, train"] = (up[1]["train_examples_per_s"], up[2]["train_examples_per_s"])
        # downstream, snapshot mode: likewise from the downstream stage
        self.snapshot_root()
        down: Dict[int, Dict[str, object]] = {}
        for nproc in (1, 2):
            down[nproc] = self._measured("downstream", "mode", "snapshot", nproc)
            if down[nproc] is None:
                down[nproc] = self.downstream("snapshot", nproc)
                self._downstream_rows("sharding", down[nproc])
        pairs["downstream snapshot, train"] = (down[1]["train_examples_per_s"], down[2]["train_examples_per_s"])
        pairs["downstream snapshot, score"] = (down[1]["score_examples_per_s"], down[2]["score_examples_per_s"])
        rows = [{"work": k, "ws1_examples_per_s": a, "ws2_examples_per_s": b,
                 "ws2_vs_ws1": round(b / a, 3) if a else None} for k, (a, b) in pairs.items()]
        self.headline["sharding_ws2_vs_ws1"] = {r["work"]: r["ws2_vs_ws1"] for r in rows}
        self.stages["sharding"] = {
            "rows": rows, "upstream": up, "downstream": down,
            "note": "global examples/s on 2 ranks / on 1 rank, same per-rank batch and steps; on a "
                    "CPU host both ranks share its cores"}
        return ", ".join(f"{r['work']} x{r['ws2_vs_ws1']}" for r in rows) + " (2 ranks vs 1)"

    def _measured(self, stage: str, key: str, value: str, nproc: int) -> Optional[Dict[str, object]]:
        """The row of an earlier `stage` of this run whose `key` is `value`, on `nproc` ranks."""
        return next((r for r in self.stages.get(stage, {}).get("rows", [])
                     if r[key] == value and r["world_size"] == nproc), None)

    def scaling(self) -> str:
        from derl.benchmarks import scaling_bench

        settings = dict(self.suite["scaling"])
        rows = []
        with self.quiet("scaling"):
            for n in self.suite["scaling_rows"]:
                load = _load()
                rows.append({"load_1m": load, **scaling_bench.measure(n, self.out / "scaling", **settings,
                                                  timeout=self.suite["timeout_s"])})
        for r in rows:
            self.row("scaling", f"train, table {r['rows']:,} x {r['dim']}, batch {r['batch_size']}",
                     r["world_size"], r["train_steps_per_s"], "steps/s", r["train_peak_rss_mb"], r["wall_s"],
                     r["load_1m"])
            self.row("scaling", f"export pass, table {r['rows']:,} x {r['dim']}", r["world_size"],
                     r["export_entities_per_s"], "entities/s", r["peak_rss_mb"], r["wall_s"], r["load_1m"])
        self.stages["scaling"] = {"rows": rows, "settings": settings}
        return ", ".join(f"{r['rows']:,} rows: {r['train_steps_per_s']:,.1f} steps/s, "
                         f"{r['export_entities_per_s']:,.0f} entities/s, {r['peak_rss_mb']:,.0f} MB"
                         for r in rows)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Dict[str, object]:
        env = dict(kv.split("=", 1) for kv in self.config.env or ())
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # inherited by every command and spawned worker from here on
        try:
            return self._run(env)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _run(self, env: Dict[str, str]) -> Dict[str, object]:
        todo = [s for s in BENCH_STAGES if s in self.config.stage_list]
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("bench-*.png"):  # an earlier run's
            stale.unlink()
        machine = report.machine(cores=True)
        load0 = os.getloadavg()[0]
        t_start = time.perf_counter()
        print(f"derl bench {self.config.suite}: {', '.join(todo)} on {machine['device']} -> {self.out}", flush=True)
        if set(todo) - {"ann", "scaling"}:
            self.world()  # before the first stage's line
        steps: Dict[str, Callable[[], str]] = {
            "datapipe": self.datapipe, "upstream": self.upstream, "export": self.export,
            "downstream": self.downstream_stage, "ann": self.ann, "sharding": self.sharding,
            "scaling": self.scaling}
        walls = {}
        for i, name in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {name} ...", end="", flush=True)
            t0 = time.perf_counter()
            try:
                line = steps[name]()
            except Exception as e:  # recorded; the stages that do not need this one go on
                self.errors[name] = f"{type(e).__name__}: {e}"
                line = "FAILED: " + _gist(self.errors[name])
            walls[name] = round(time.perf_counter() - t0, 1)
            self.stages.setdefault(name, {})["wall_s"] = walls[name]
            print(f" {line} ({walls[name]:.0f} s)", flush=True)
        result = {
            "suite": self.config.suite,
            "command": " ".join(["derl bench", *self.argv]),
            "device": machine["device"],
            "decoupled_vs_coupled_ratio": self.headline.get("decoupled_vs_coupled_ratio"),
            "decoupled_vs_coupled_scoring_ratio": self.headline.get("decoupled_vs_coupled_scoring_ratio"),
            "sharding_ws2_vs_ws1": self.headline.get("sharding_ws2_vs_ws1"),
            "upstream": self.headline.get("upstream"),
            "upstream_vs_sasrec_ratio": self.headline.get("upstream_vs_sasrec_ratio"),
            "machine": machine,
            "loadavg_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
            "env": env,
            "wall_s": round(time.perf_counter() - t_start, 1),
            "data": str(self.data) if self.data else None,
            "snapshots": str(self.snapshots) if self.snapshots else None,
            "settings": self.suite,
            "table": self.table,
            "stages": self.stages,
            "errors": self.errors,
        }
        result["plots"] = self._plots(result)
        (self.out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
        (self.out / "bench.md").write_text(markdown(result))
        print(f"bench: {result['wall_s']:.0f} s; decoupled_vs_coupled_ratio "
              f"{result['decoupled_vs_coupled_ratio']}; {self.out / 'bench.md'}"
              + (f"; FAILED: {', '.join(self.errors)}" if self.errors else ""), flush=True)
        return result

    def _plots(self, result: Dict[str, object]) -> List[str]:
        """Write the PNGs there is data for; return their names."""
        from derl.benchmarks import downstream_bench, scaling_bench

        if self.table:
            plot_throughput(self.table, self.out / "bench-throughput.png", result)
        down = [*self.stages.get("downstream", {}).get("rows", []),
                *[r for n, r in self.stages.get("sharding", {}).get("downstream", {}).items() if n == 2]]
        if down:
            downstream_bench.plot(down, self.out / "bench-downstream.png",
                                  f"downstream ranker ({result['suite']} suite, {result['device']})")
        if self.stages.get("scaling", {}).get("rows"):
            scaling_bench.plot(self.stages["scaling"]["rows"], self.out / "bench-scaling.png")
        return [p.name for p in sorted(self.out.glob("bench-*.png"))]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _gist(error: str) -> str:
    """An error's first line, and the last line of its log tail that names an error."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    last = next((line for line in reversed(lines[1:]) if "Error" in line), "")
    return lines[0] + (f" ... {last[:300]}" if last else "") if lines else "?"


def _datapipe_side(data: Path, side: str, batch_size: int, prefetches: Sequence[int]) -> List[Dict]:
    from derl.benchmarks.datapipe_bench import measure

    return [measure(data, side, batch_size, prefetch) for prefetch in prefetches]


def plot_throughput(table: List[Dict[str, object]], path: Path, result: Dict[str, object]) -> None:
    from matplotlib.patches import Rectangle

    rows = [r for r in table if r["throughput"] > 0]
    colours = {s: f"C{i}" for i, s in enumerate(BENCH_STAGES)}
    labels = [f"{r['what']} [{r['ranks']} rank(s)]" for r in rows]
    y = list(range(len(rows)))[::-1]
    values = [r["throughput"] for r in rows]
    with report.figure(path, 1, (11, 0.32 * len(rows) + 1.6)) as (ax,):
        ax.barh(y, values, color=[colours[r["stage"]] for r in rows])
        for yi, r in zip(y, rows):
            ax.annotate(f"{r['throughput']:,.0f} {r['unit']}", (r["throughput"], yi), fontsize=7,
                        textcoords="offset points", xytext=(3, -3))
        ax.set_yticks(y, labels, fontsize=7)
        ax.set(xscale="log", xlim=(min(values) / 2, max(values) * 40),  # room for the labels
               xlabel="throughput (log scale; unit per bar)")
        ax.set_title(f"derl bench {result['suite']}: {result['device']}, {result['machine']['cores']} cores",
                     fontsize=10)
        stages = list(dict.fromkeys(r["stage"] for r in rows))
        ax.legend([Rectangle((0, 0), 1, 1, color=colours[s]) for s in stages], stages, fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(rows: List[Dict[str, object]], cols: Sequence[str], heads: Optional[Sequence[str]] = None) -> List[str]:
    heads = heads or cols
    return ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in cols) + "|",
            *("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows)]


def _upstream_headline(result: Dict[str, object]) -> List[str]:
    up = result.get("upstream")
    if not up:
        return []
    return [f"**Upstream at sequence length {up['seq_len']}: {up['examples_per_s']:,.0f} examples/s** (1 rank, "
            f"the training pipeline); the sequence transformer runs at {_fmt(up['fraction_of_matmul_peak'])} "
            f"of this machine's matrix-multiply rate, and upstream_vs_sasrec_ratio = "
            f"{_fmt(result['upstream_vs_sasrec_ratio'])} (examples/s over the reference SASRec's at the same "
            f"width, depth and history lengths; `upstream_bench`).", ""]


def markdown(result: Dict[str, object]) -> str:
    m, load = result["machine"], result["loadavg_1m"]
    lines = [
        f"# derl bench ({result['suite']} suite)",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"{result['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, python {m['python']}), "
        f"{m['date']}; "
        + (f"environment {', '.join(f'{k}={v}' for k, v in result['env'].items())}; " if result.get("env") else "")
        + f"wall {result['wall_s'] / 60:.1f} min; 1-minute load average {load['start']} at "
        f"start, {load['end']} at the end"
        + (f" — above {m['cores']}: other processes shared the cores, so every figure is a lower "
           f"bound on throughput (an upper bound on time)." if max(load.values()) > m["cores"] else "."),
        "",
        f"**decoupled_vs_coupled_ratio = {_fmt(result['decoupled_vs_coupled_ratio'])}**: the ranker "
        f"trains this many times faster on snapshot vectors than with the upstream towers inside it "
        f"(coupled); scoring: {_fmt(result['decoupled_vs_coupled_scoring_ratio'])}x.",
        "",
        *_upstream_headline(result),
        "## Every stage",
        "",
        *_table(result["table"], ("stage", "what", "ranks", "throughput", "unit", "peak_rss_mb", "wall_s", "load_1m"),
                ("stage", "what", "ranks", "throughput", "unit", "peak RSS (MB)", "wall (s)", "load")),
        "",
        "Peak RSS: the largest process of the measured command (a rank or its launcher); wall: the "
        "whole command (start-up, evaluation and checkpoints included), shared by its rows; load: the "
        "host's 1-minute load average when it started (it decays over a minute, so the suite's previous "
        "command counts too; well above the core count, other processes were running and the figure is "
        "a lower bound on throughput). Upstream "
        "and downstream examples/s are those the commands write into RUN/metrics.json: the whole "
        "training loop from its first step, so short runs include the pipeline's and readers' warm-up. "
        "Datapipe: one process per reader, one epoch with the prefetch thread, then one without; the "
        "second row's peak RSS covers both.",
    ]
    sharding = result["stages"].get("sharding", {})
    if sharding.get("rows"):
        lines += ["", "## Sharding: 2 ranks against 1", "",
                  *_table(sharding["rows"], ("work", "ws1_examples_per_s", "ws2_examples_per_s", "ws2_vs_ws1"),
                          ("work", "1 rank (examples/s)", "2 ranks (examples/s)", "2 vs 1")),
                  "", "Global examples/s, same per-rank batch and steps. On a CPU host the two ranks share "
                      "its cores (each with cores / 2 threads): below 1.0 is what sharding costs "
                      "(all-to-alls, lockstep), not a missing speed-up. On a loaded host (load above the "
                      "core count) one rank's intra-op threads wait on each other whenever another "
                      "process holds a core, which can make 1 rank several times slower than 2 "
                      "single-threaded ranks: a figure above 1.0 then says more about the load than "
                      "about sharding."]
    elif sharding.get("skipped"):
        lines += ["", f"Sharding: skipped ({sharding['skipped']})."]
    scaling = result["stages"].get("scaling", {})
    if scaling.get("rows"):
        lines += ["", "## Scaling: one sharded table of N rows", "",
                  *_table(scaling["rows"], ("rows", "dim", "world_size", "train_steps_per_s",
                                            "train_examples_per_s", "train_peak_rss_mb",
                                            "export_entities_per_s", "export_part_mb", "peak_rss_mb", "setup_s"),
                          ("rows", "dim", "ranks", "train steps/s", "train examples/s", "peak RSS after train (MB)",
                           "export entities/s", "Parquet (MB)", "peak RSS (MB)", "shard + init (s)")),
                  "", "EmbeddingBagCollection under DistributedModelParallel (planner, fused row-wise "
                      "Adagrad), uniformly random ids; export pass: every row once, no grad, streamed "
                      f"to Parquet. Settings: {json.dumps(scaling.get('settings', {}))}."]
    ann = result["stages"].get("ann", {})
    if ann.get("summary"):
        lines += ["", "## faiss (summary; every setting in ann/ann.md)", "",
                  *_table(ann["summary"], ("dataset", "ads", "index", "param", "build_s", "qps_k10",
                                           "recall@10_%", "qps_k100", "recall@100_%", "index_mb")),
                  "", ann["note"] + "."]
    if result["errors"]:
        lines += ["", "## Failed stages", ""]
        lines += [f"- {k}: {_gist(v)}" for k, v in result["errors"].items()]
        lines += ["", "Their whole messages are in bench.json (`errors`), the commands' output in logs/."]
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"]) + "."]
    return "\n".join(lines) + "\n"


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only --suite is read here, to hand a suite with a runner of its own the whole command line.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite")
    own = OWN_RUNNERS.get(pre.parse_known_args(argv)[0].suite)
    if own:
        import importlib

        return importlib.import_module(own).run(argv)
    return Bench(report.parse_config(BenchConfig, argv, __doc__, prog="derl bench"), argv).run()


def main(argv: Optional[Sequence[str]] = None) -> None:
    report.exit_on_errors(run(argv))


if __name__ == "__main__":
    main()
