"""Downstream throughput: training and scoring examples/s of the ranker in its three upstream
modes, and the paper's scalability argument as one number (this prints the table and writes
DIR/downstream.{json,md,png}).

    python -m derl.benchmarks.downstream_bench --data WORLD --snapshots SNAP --out DIR
        [--modes none snapshot coupled] [--nproc 1 [2]] [--max-steps 60] [--vectors all]
        [-- more train-downstream flags]

Each (mode, ranks) is one real `derl train-downstream --upstream MODE --snapshots SNAP
--max-steps N --nproc R` process (with `--nproc 1`, the ranks run inline); the figures are the
ones it writes into RUN/metrics.json:
- train_examples_per_s: steps x batch x ranks / the slowest rank's seconds in the training
  loop (TorchRec's TrainPipelineSparseDist; the first batches' reader and snapshot start-up
  included, so give enough --max-steps for them to amortise);
- score_examples_per_s: the evaluation day's rows / seconds, scored in batches of 4096.
peak_rss_mb is the largest process of the run (rank or launcher), from the kernel's rusage of
the finished process tree; wall_s the whole command, start-up, evaluation and checkpoint included.

`snapshot` reads the four vectors from the snapshot (a lookup per row), `coupled` computes them
with the upstream towers of the checkpoints that made the snapshot, trained with the ranker.
decoupled_vs_coupled_ratio = snapshot train examples/s / coupled train examples/s (and
decoupled_vs_coupled_scoring_ratio the same for scoring): how much cheaper the ranker is when
the entity vectors are precomputed and refreshed instead of computed in its own step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from derl.benchmarks import report
from derl.launchers.runtime.processes import run_derl

MODES = ("none", "snapshot", "coupled")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mode']}\n{r['world_size']} rank(s)" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * len(rows) + 3, 3.8))
    for ax, key, name in ((axes[0], "train_examples_per_s", "training"),
                          (axes[1], "score_examples_per_s", "scoring")):
        colours = [f"C{MODES.index(r['mode'])}" for r in rows]
        ax.bar(labels, [r[key] for r in rows], color=colours)
        ax.set_ylabel(f"{name} examples/s (global)")
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="source folder")
    p.add_argument("--snapshots", type=Path, help="snapshot root (needed by snapshot and coupled)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--nproc", type=int, nargs="+", default=[1], help="world sizes to measure")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--vectors", default="all", help="train-downstream --vectors")
    args = p.parse_args(argv)
    rows = []
    for nproc in args.nproc:
        for mode in args.modes:
            print(f"downstream {mode}, {nproc} rank(s) ...", flush=True)
            rows.append(measure(args.data, args.snapshots, args.out / "runs" / f"{mode}-ws{nproc}",
                                mode, nproc, args.max_steps, args.vectors, extra))
    meta = {**report.machine(threads=False, cores=True),
            "data": str(args.data), "snapshots": str(args.snapshots), "max_steps": args.max_steps,
            "train_downstream_flags": " ".join(extra), **ratios(rows)}
    return report.publish(args.out, "downstream", rows, meta, plot)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
