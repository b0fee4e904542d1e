"""Daily refresh, measured downstream: smoothing strategies, and what alignment recovers.

    python -m derl.benchmarks.studies.refresh --out DIR [--preset tiny|demo] [--nproc N]

1. Smoothing (the paper's E(t) = w·E(t−1) + (1−w)·E_daily(t)). Upstream trains up to the cut;
   then, day by day, each model trains one more day from its checkpoint and a new version is
   exported for the next day. Each strategy — latest only (w = 0) and w ∈ {0.2, 0.5, 0.8} —
   keeps its own chain of versions (aligned before averaging). A snapshot ranker per strategy
   trains on the downstream days, each row joined with the version live on its day, and is
   scored on the held-out day with the version live then.
2. Version skew. A ranker trained on version N is scored with version N+1 of an upstream model
   retrained from scratch (another seed: another space), raw and Procrustes-aligned onto N.

Every step is a `derl` command run through the pipeline's stage runner (stamps under DIR, so a
crashed run continues). Writes DIR/refresh.json, DIR/refresh.md and DIR/refresh.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List

from derl.benchmarks import report
from derl.datapipes.snapshots import MANIFEST
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.domains import DOMAINS
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import to_flags
from derl.launchers.stages.pipeline import Runner, Stage, incremental_upstream, upstream_specs
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.launchers.runtime.settings import (ExportConfig, PipelineConfig, ScoreConfig, TrainDownstreamConfig,
                                     TrainUpstreamConfig)

STRATEGIES = {"latest": None, "w=0.2": 0.2, "w=0.5": 0.5, "w=0.8": 0.8}


def upstream_plan(args: argparse.Namespace) -> List[Stage]:
    """Both domains trained up to the cut, twice: seed 0 (the chain) and seed 1 (the retrain)."""
    preset = STAGE_PRESETS[args.preset]
    stages = []
    for seed, root in ((0, args.out / "upstream"), (1, args.out / "retrained")):
        for d in DOMAINS:
            stages.append(Stage(f"upstream-{root.name}-{d}", "train-upstream",
                                to_flags(TrainUpstreamConfig, {
                                    "data": args.out / "world", "out": root / d, "domain": d, "seed": seed,
                                    "epochs": preset.upstream_epochs[d], **preset.upstream}),
                                done=root / d / runs.METRICS, inputs=("generate",), resumable=True,
                                output=root / d))
    return stages


def smoothing_plan(args: argparse.Namespace, cuts: List[str]) -> List[Stage]:
    """A version per day from the cut on, per strategy (incremental upstream in between), then
    a snapshot ranker per strategy."""
    world, preset = args.out / "world", STAGE_PRESETS[args.preset]
    stages: List[Stage] = []
    after = ("upstream-upstream-engagement", "upstream-upstream-conversion")
    for i, cut in enumerate(cuts):
        if i:  # one more day of upstream training, from the checkpoint
            trained = []
            for d in DOMAINS:
                trained.append(Stage(f"incremental-{d}-{cuts[i - 1]}", "train-upstream",
                                     to_flags(TrainUpstreamConfig, {
                                         "data": world, "out": args.out / "upstream" / d, "domain": d,
                                         "resume": True, "from_day": cuts[i - 1], "until": cuts[i - 1],
                                         "epochs": 1, **incremental_upstream(preset)}),
                                     done=args.out / "upstream" / d / runs.METRICS, inputs=after))
            stages += trained
            after = tuple(s.name for s in trained)
        exports = []
        for name, weight in STRATEGIES.items():
            smooth = {"previous": "latest", "weight": weight} if weight and i else {}
            root = args.out / "snapshots" / name
            exports.append(Stage(f"export-{name}-{cut}", "export",
                                 to_flags(ExportConfig, {
                                     "data": world, "out": root, "cut": cut, "overwrite": True, **smooth,
                                     "upstream": upstream_specs(args.out, tuple(DOMAINS))}),
                                 done=root / cut / MANIFEST, inputs=after))
        stages += exports
        after = tuple(s.name for s in exports)
    for name in STRATEGIES:
        run = args.out / "rankers" / name
        stages.append(Stage(f"ranker-{name}", "train-downstream",
                            to_flags(TrainDownstreamConfig, {
                                "data": world, "snapshots": args.out / "snapshots" / name, "out": run,
                                "upstream": "snapshot", **preset.downstream}),
                            done=run / runs.METRICS, inputs=after, output=run))
    return stages


def skew_plan(args: argparse.Namespace, first: str, after: str) -> List[Stage]:
    """A ranker trained on version N alone, scored with a retrained model's N+1, raw and
    aligned onto N. The skew root holds a copy of N (made by `main`) and the two N+1s."""
    world, preset, skew = args.out / "world", STAGE_PRESETS[args.preset], args.out / "skew"
    stages = [Stage("skew-ranker", "train-downstream",
                    to_flags(TrainDownstreamConfig, {
                        "data": world, "snapshots": skew / "snapshots", "snapshot_version": first,
                        "out": skew / "ranker", "upstream": "snapshot", **preset.downstream}),
                    done=skew / "ranker" / runs.METRICS, inputs=(f"export-latest-{first}",),
                    output=skew / "ranker")]
    for kind, overrides in (("raw", {}), ("aligned", {"previous": first, "weight": 0})):
        version = f"retrained-{kind}"
        stages.append(Stage(f"skew-export-{kind}", "export",
                            to_flags(ExportConfig, {
                                "data": world, "out": skew / "snapshots", "cut": after, "version": version,
                                "overwrite": True, **overrides,
                                "upstream": tuple(f"{d}={args.out / 'retrained' / d}" for d in DOMAINS)}),
                            done=skew / "snapshots" / version / MANIFEST,
                            inputs=("skew-ranker", "upstream-retrained-engagement",
                                    "upstream-retrained-conversion")))
        stages.append(Stage(f"skew-score-{kind}", "score",
                            to_flags(ScoreConfig, {"ranker": skew / "ranker", "snapshot_version": version,
                                                   "out": skew / kind}),
                            done=skew / kind / runs.METRICS, inputs=(f"skew-export-{kind}",),
                            output=skew / kind))
    return stages


def summarise(out_dir: Path, cuts: List[str]) -> Dict[str, object]:
    def ctr(path: Path) -> Dict[str, float]:
        m = runs.read_metrics(path)["eval"]["ctr"]
        return {"ne": m["ne"], "auc": m["auc"], "pr_auc": m["pr_auc"]}

    smoothing = {name: ctr(out_dir / "rankers" / name) for name in STRATEGIES}
    for name in STRATEGIES:
        manifests = [json.loads((out_dir / "snapshots" / name / c / MANIFEST).read_text()) for c in cuts]
        drift = [m["domains"]["engagement"].get("refresh", {}) for m in manifests]
        smoothing[name]["mean_cosine_to_previous"] = [d.get("mean_cosine_after_alignment") for d in drift if d]
    aligned = json.loads((out_dir / "skew" / "snapshots" / "retrained-aligned" / MANIFEST).read_text())
    skew = {"trained_and_scored_with_N": ctr(out_dir / "skew" / "ranker"),
            "scored_with_retrained_N+1_raw": ctr(out_dir / "skew" / "raw"),
            "scored_with_retrained_N+1_aligned": ctr(out_dir / "skew" / "aligned"),
            "drift": {d: {k: v for k, v in i["refresh"].items() if k.startswith("mean_cosine")}
                      for d, i in aligned["domains"].items()}}
    return {"smoothing": smoothing, "version_skew": skew}


def plot(result: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["smoothing"])
    a.bar(names, [result["smoothing"][n]["ne"] for n in names], color="tab:blue")
    a.set_ylabel("CTR NE on the held-out day (lower is better)")
    a.set_title("Smoothing strategy of the daily snapshots")
    ne = [result["smoothing"][n]["ne"] for n in names]
    a.set_ylim(min(ne) - 0.002, max(ne) + 0.002)  # the differences are in the third decimal
    skew = result["version_skew"]
    kinds = [k for k in skew if k != "drift"]
    b.bar(["N (trained)", "N+1 raw", "N+1 aligned"], [skew[k]["auc"] for k in kinds], color="tab:orange")
    b.set_ylabel("CTR ROC-AUC")
    b.set_title("Ranker trained on N, scored with a retrained N+1")
    b.set_ylim(0.45, None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(STAGE_PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()
    runner = Runner(PipelineConfig(workdir=args.out, preset=args.preset, seed=args.seed, nproc=args.nproc))
    runner.run(Stage("generate", "generate", ["--out", str(args.out / "world"),
                                              "--preset", STAGE_PRESETS[args.preset].world,
                                              "--seed", str(args.seed), "--overwrite"],
                     done=args.out / "world" / "_world.json"))
    days = SourceTables(args.out / "world").days("engagements")
    cuts = days[days.index(default_split(days).cut_day):]  # a version for every day from the cut on
    for stage in upstream_plan(args) + smoothing_plan(args, cuts):
        runner.run(stage)
    skew_root = args.out / "skew" / "snapshots"
    if not (skew_root / cuts[0]).exists():  # N, as the skew ranker's snapshot root holds it
        shutil.copytree(args.out / "snapshots" / "latest" / cuts[0], skew_root / cuts[0])
    for stage in skew_plan(args, cuts[0], cuts[1]):
        runner.run(stage)
    result = summarise(args.out, cuts)
    def cells(r: Dict[str, object]) -> Dict[str, str]:  # 4 decimals: the differences are small
        return {k: f"{r[k]:.4f}" for k in ("ne", "auc", "pr_auc")}

    rows = [{"experiment": f"smoothing {n}", **cells(r)} for n, r in result["smoothing"].items()]
    rows += [{"experiment": k.replace("_", " "), **cells(r)}
             for k, r in result["version_skew"].items() if k != "drift"]
    meta = {**report.machine(), "preset": args.preset,
            "command": f"python -m derl.benchmarks.studies.refresh --out {args.out} --preset {args.preset}",
            "drift": result["version_skew"]["drift"]}
    md = report.write(args.out, "refresh", rows, meta)
    (args.out / "refresh_full.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "refresh.png")
    print(md.read_text())


if __name__ == "__main__":
    main()
