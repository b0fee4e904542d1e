"""Downstream throughput: training and scoring examples/s of the ranker in its three upstream
modes, each a real `derl train-downstream` process, and decoupled_vs_coupled_ratio, the paper's
scalability argument as one number (this prints the table and writes DIR/downstream.{json,md,png};
what each figure is: docs/results.md, "What the harnesses measure").

    python -m derl.benchmarks.downstream_bench --data WORLD --snapshots SNAP --out DIR
        [--modes none snapshot coupled] [--nproc 1 [2]] [--max-steps 60] [--vectors all]
        [-- more train-downstream flags]
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from derl.benchmarks import report
from derl.launchers.runtime.config import check, setting
from derl.launchers.runtime.processes import run_derl

MODES = ("none", "snapshot", "coupled")


@dataclass(frozen=True)
class DownstreamBenchConfig:
    data: Path = setting(help="source folder")
    out: Path = setting(help="folder for the runs and downstream.{json,md,png}")
    snapshots: Optional[Path] = setting(None, "snapshot root (needed by snapshot and coupled)")
    modes: Tuple[str, ...] = setting(MODES, "upstream modes to measure", choices=MODES, many=True)
    nproc: Tuple[int, ...] = setting((1,), "world sizes to measure", many=True)
    max_steps: int = setting(60, "train-downstream --max-steps")
    vectors: str = setting("all", "train-downstream --vectors")

    def __post_init__(self) -> None:
        check(self, positive=("max_steps",))


def measure(data: Path, snapshots: Optional[Path], out: Path, mode: str, nproc: int = 1,
            max_steps: int = 60, vectors: str = "all", extra: Sequence[str] = (),
            logs: Optional[Path] = None, timeout: Optional[float] = None) -> Dict[str, object]:
    """One `derl train-downstream` run from scratch into `out`; its row of the table."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["train-downstream", "--data", data, "--out", out, "--upstream", mode,
            "--max-steps", max_steps, "--nproc", nproc, *extra]
    if mode != "none":
        argv += ["--snapshots", snapshots, "--vectors", vectors]
    proc = run_derl(argv, log=(logs or out.parent) / f"{out.name}.log", timeout=timeout).figures()
    m = json.loads((out / "metrics.json").read_text())
    return {
        "mode": mode,
        "vectors": m.get("vectors") or "-",
        "world_size": m["world_size"],
        "steps": m["steps"],
        "train_examples_per_s": round(m["train_examples_per_s"], 1),
        "score_examples_per_s": round(m["score_examples_per_s"], 1),
        "ctr_auc": round(m["eval"]["ctr"]["auc"], 4),
        "peak_rss_mb": proc["peak_rss_mb"],
        "wall_s": proc["wall_s"],
        "load_1m": proc["load_1m"],
    }


def ratios(rows: List[Dict[str, object]], world_size: int = 1) -> Dict[str, Optional[float]]:
    """decoupled_vs_coupled_ratio (training) and decoupled_vs_coupled_scoring_ratio: snapshot
    examples/s over coupled examples/s at `world_size`; None where a mode is missing."""
    by = {r["mode"]: r for r in rows if r["world_size"] == world_size}
    out: Dict[str, Optional[float]] = {}
    for name, key in (("decoupled_vs_coupled_ratio", "train_examples_per_s"),
                      ("decoupled_vs_coupled_scoring_ratio", "score_examples_per_s")):
        snap, coupled = by.get("snapshot"), by.get("coupled")
        out[name] = round(snap[key] / coupled[key], 3) if snap and coupled and coupled[key] else None
    return out


def plot(rows: List[Dict[str, object]], path: Path, title: str = "downstream ranker") -> None:
    labels = [f"{r['mode']}\n{r['world_size']} rank(s)" for r in rows]
    colours = [f"C{MODES.index(r['mode'])}" for r in rows]
    with report.figure(path, 2, (2.2 * len(rows) + 3, 3.8), title) as axes:
        for ax, key, name in zip(axes, ("train_examples_per_s", "score_examples_per_s"), ("training", "scoring")):
            ax.bar(labels, [r[key] for r in rows], color=colours)
            ax.set_ylabel(f"{name} examples/s (global)")
            ax.set_title(name, fontsize=10)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The flags after `--` go to every train-downstream unparsed: no config field can hold them.
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    config = report.parse_config(DownstreamBenchConfig, argv, __doc__)
    rows = []
    for nproc in config.nproc:
        for mode in config.modes:
            print(f"downstream {mode}, {nproc} rank(s) ...", flush=True)
            rows.append(measure(config.data, config.snapshots, config.out / "runs" / f"{mode}-ws{nproc}",
                                mode, nproc, config.max_steps, config.vectors, extra))
    meta = {**report.machine(threads=False, cores=True),
            "data": str(config.data), "snapshots": str(config.snapshots), "max_steps": config.max_steps,
            "train_downstream_flags": " ".join(extra), **ratios(rows)}
    return report.publish(config.out, "downstream", rows, meta, plot)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
