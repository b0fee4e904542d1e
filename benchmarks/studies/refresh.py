"""Daily refresh, measured downstream: smoothing strategies (the paper's
E(t) = w·E(t−1) + (1−w)·E_daily(t)), each its own chain of daily versions with a snapshot ranker,
and version skew, a ranker scored with a retrained upstream's next version raw and aligned (the
plan step by step: docs/results.md, "Refresh"). Every step is a `derl` command run through the
pipeline's stage runner (stamps under DIR, so a crashed run continues). Writes
DIR/refresh.json, DIR/refresh.md and DIR/refresh.png.

    python -m derl.benchmarks.studies.refresh --out DIR [--preset tiny|demo] [--seed 0] [--nproc N]
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from derl.benchmarks import report
from derl.datapipes.snapshots import MANIFEST
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.domains import DOMAINS
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import check, setting, to_flags
from derl.launchers.stages.pipeline import Runner, Stage, incremental_upstream, upstream_specs
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.launchers.runtime.settings import (ExportConfig, PipelineConfig, ScoreConfig, TrainDownstreamConfig,
                                     TrainUpstreamConfig)

STRATEGIES = {"latest": None, "w=0.2": 0.2, "w=0.5": 0.5, "w=0.8": 0.8}


@dataclass(frozen=True)
class RefreshConfig:
    out: Path = setting(help="work folder (world, runs, snapshots, stamps) and refresh.{json,md,png}")
    preset: str = setting("tiny", "the pipeline preset: world, upstream and ranker settings",
                          choices=sorted(STAGE_PRESETS))
    seed: int = setting(0, "seed of the generated world")
    nproc: int = setting(1, "ranks of each training and export")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",), non_negative=("seed",))


def upstream_plan(config: RefreshConfig) -> List[Stage]:
    """Both domains trained up to the cut, twice: seed 0 (the chain) and seed 1 (the retrain)."""
    preset = STAGE_PRESETS[config.preset]
    stages = []
    for seed, root in ((0, config.out / "upstream"), (1, config.out / "retrained")):
        for d in DOMAINS:
            stages.append(Stage(f"upstream-{root.name}-{d}", "train-upstream",
                                to_flags(TrainUpstreamConfig, {
                                    "data": config.out / "world", "out": root / d, "domain": d, "seed": seed,
                                    "epochs": preset.upstream_epochs[d], **preset.upstream}),
                                done=root / d / runs.METRICS, inputs=("generate",), resumable=True,
                                output=root / d))
    return stages


def smoothing_plan(config: RefreshConfig, cuts: List[str]) -> List[Stage]:
    """A version per day from the cut on, per strategy (incremental upstream in between), then
    a snapshot ranker per strategy."""
    world, preset = config.out / "world", STAGE_PRESETS[config.preset]
    stages: List[Stage] = []
    after = ("upstream-upstream-engagement", "upstream-upstream-conversion")
    for i, cut in enumerate(cuts):
        if i:  # one more day of upstream training, from the checkpoint
            trained = []
            for d in DOMAINS:
                trained.append(Stage(f"incremental-{d}-{cuts[i - 1]}", "train-upstream",
                                     to_flags(TrainUpstreamConfig, {
                                         "data": world, "out": config.out / "upstream" / d, "domain": d,
                                         "resume": True, "from_day": cuts[i - 1], "until": cuts[i - 1],
                                         "epochs": 1, **incremental_upstream(preset)}),
                                     done=config.out / "upstream" / d / runs.METRICS, inputs=after))
            stages += trained
            after = tuple(s.name for s in trained)
        exports = []
        for name, weight in STRATEGIES.items():
            smooth = {"previous": "latest", "weight": weight} if weight and i else {}
            root = config.out / "snapshots" / name
            exports.append(Stage(f"export-{name}-{cut}", "export",
                                 to_flags(ExportConfig, {
                                     "data": world, "out": root, "cut": cut, "overwrite": True, **smooth,
                                     "upstream": upstream_specs(config.out, tuple(DOMAINS))}),
                                 done=root / cut / MANIFEST, inputs=after))
        stages += exports
        after = tuple(s.name for s in exports)
    for name in STRATEGIES:
        run = config.out / "rankers" / name
        stages.append(Stage(f"ranker-{name}", "train-downstream",
                            to_flags(TrainDownstreamConfig, {
                                "data": world, "snapshots": config.out / "snapshots" / name, "out": run,
                                "upstream": "snapshot", **preset.downstream}),
                            done=run / runs.METRICS, inputs=after, output=run))
    return stages


def skew_plan(config: RefreshConfig, first: str, after: str) -> List[Stage]:
    """A ranker trained on version N alone, scored with a retrained model's N+1, raw and
    aligned onto N. The skew root holds a copy of N (made by `main`) and the two N+1s."""
    world, preset, skew = config.out / "world", STAGE_PRESETS[config.preset], config.out / "skew"
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
                                "upstream": tuple(f"{d}={config.out / 'retrained' / d}" for d in DOMAINS)}),
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
    names = list(result["smoothing"])
    ne = [result["smoothing"][n]["ne"] for n in names]
    skew = result["version_skew"]
    kinds = [k for k in skew if k != "drift"]
    with report.figure(path, 2, (10, 4), dpi=120) as (a, b):
        a.bar(names, ne, color="tab:blue")
        a.set(ylabel="CTR NE on the held-out day (lower is better)", title="Smoothing strategy of the daily snapshots",
              ylim=(min(ne) - 0.002, max(ne) + 0.002))  # the differences are in the third decimal
        b.bar(["N (trained)", "N+1 raw", "N+1 aligned"], [skew[k]["auc"] for k in kinds], color="tab:orange")
        b.set(ylabel="CTR ROC-AUC", title="Ranker trained on N, scored with a retrained N+1", ylim=(0.45, None))


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = report.parse_config(RefreshConfig, argv, __doc__)
    runner = Runner(PipelineConfig(workdir=config.out, preset=config.preset, seed=config.seed, nproc=config.nproc))
    runner.run(Stage("generate", "generate", ["--out", str(config.out / "world"),
                                              "--preset", STAGE_PRESETS[config.preset].world,
                                              "--seed", str(config.seed), "--overwrite"],
                     done=config.out / "world" / "_world.json"))
    days = SourceTables(config.out / "world").days("engagements")
    cuts = days[days.index(default_split(days).cut_day):]  # a version for every day from the cut on
    for stage in upstream_plan(config) + smoothing_plan(config, cuts):
        runner.run(stage)
    skew_root = config.out / "skew" / "snapshots"
    if not (skew_root / cuts[0]).exists():  # N, as the skew ranker's snapshot root holds it
        shutil.copytree(config.out / "snapshots" / "latest" / cuts[0], skew_root / cuts[0])
    for stage in skew_plan(config, cuts[0], cuts[1]):
        runner.run(stage)
    result = summarise(config.out, cuts)
    def cells(r: Dict[str, object]) -> Dict[str, str]:  # 4 decimals: the differences are small
        return {k: f"{r[k]:.4f}" for k in ("ne", "auc", "pr_auc")}

    rows = [{"experiment": f"smoothing {n}", **cells(r)} for n, r in result["smoothing"].items()]
    rows += [{"experiment": k.replace("_", " "), **cells(r)}
             for k, r in result["version_skew"].items() if k != "drift"]
    meta = {**report.machine(), "preset": config.preset,
            "command": report.command("derl.benchmarks.studies.refresh", config),
            "drift": result["version_skew"]["drift"]}
    md = report.write(config.out, "refresh", rows, meta)
    (config.out / "refresh_full.json").write_text(json.dumps(result, indent=2))
    plot(result, config.out / "refresh.png")
    print(md.read_text())


if __name__ == "__main__":
    main()
