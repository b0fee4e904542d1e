"""`derl pipeline`: every stage in order into one work folder, resumable, then one report.

    derl pipeline --workdir W [--preset tiny|demo] [--data WORLD] [--nproc N] [--launcher local|torchx]
        [--refresh] [--coupled]

generate -> train-upstream (engagement, conversion) -> export -> train-downstream (none,
snapshot with each vector set and with a projection; coupled on the tiny preset or with
--coupled) -> evaluate, then W/report.json (evaluate's report plus `upstream`, `snapshot`,
`data` and `stages` sections) and W/report.md, which ends with each stage's time (also printed).

`--data WORLD` runs the stack on an existing world (`derl import`, or one generated before)
instead of generating one, with the preset's model sizes. Only what the world supports runs:
the domains it can train (no conversion domain without conversions), and no rankers at all
without ad impressions; the report's `data` section says what the world lacks.

Each stage runs as its own `derl` process (`local`: N local ranks through --nproc; `torchx`: the
components of launchers/components.py on the local_cwd scheduler) and leaves a stamp in
W/stamps/<stage>.json: its command line, the stamps of the stages it reads, and whether it
finished. A stage whose stamp matches and says finished is skipped; one that crashed is run
again — a training stage with checkpoints of the same command resumes from them (--resume) —
and a stage whose command or inputs changed is redone from scratch, with everything after it.

`--refresh` adds one day, as the paper's daily refresh does: each upstream model trains on the
cut day from its last checkpoint, a new snapshot is exported for the next day, aligned onto
the previous one and smoothed (w = 0.8), and the snapshot ranker trained on the old version
is scored with the new one (and, to show what alignment does, with the new vectors raw and
aligned-only); the report gains a `refresh` section.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from derl.datapipes.domains import DOMAINS, supported, vector_sets
from derl.datapipes.snapshots import LATEST, MANIFEST, Snapshot, unpin, versions
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import WORLD_META
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import to_flags
from derl.launchers.runtime.presets import STAGE_PRESETS, Preset
from derl.launchers.runtime.processes import StageFailed, run_derl
from derl.launchers.registry import REGISTRY
from derl.launchers.runtime.settings import (EvaluateConfig, ExportConfig, PipelineConfig, ScoreConfig,
                                     TrainDownstreamConfig, TrainUpstreamConfig)

REFRESH_ROOT = Path("refresh") / "snapshots"  # under W: the refresh's raw and aligned-only versions


@dataclass(frozen=True)
class PipelinePlan:
    """What the pipeline runs on its world: its folder, the domains it trains, and whether it
    has ad impressions for the rankers."""

    world: Path
    domains: Tuple[str, ...]
    has_ads: bool
    lacks: Tuple[str, ...]  # one sentence per thing left out, for the report


def plan(cfg: PipelineConfig) -> PipelinePlan:
    if cfg.data is None:  # the world the pipeline generates has everything
        return PipelinePlan(cfg.workdir / "world", tuple(DOMAINS), True, ())
    sources = SourceTables(cfg.data)
    domains = tuple(supported(sources))
    lacks = tuple(DOMAINS[d].unsupported(sources) for d in DOMAINS if d not in domains)
    if not sources.has("ad_events"):
        lacks += (f"{cfg.data} has no ad impressions: no rankers, no downstream evaluation",)
    return PipelinePlan(cfg.data, domains, sources.has("ad_events"), lacks)


def rankers(preset: Preset, domains: Tuple[str, ...] = tuple(DOMAINS),
            coupled: bool = False) -> Dict[str, Dict[str, Any]]:
    """The downstream runs the report compares (name -> TrainDownstreamConfig overrides): none,
    snapshot, the paper's vector ablation, the learned projection and, where the preset or
    `coupled` asks, the coupled ranker; each with the largest vector set the domains give (all
    four vectors; user and Pin without conversions)."""
    sets = vector_sets(list(domains))
    best = sets[-1]  # VECTOR_SETS grow: user, user_pin, all
    out = {
        "none": {"upstream": "none"},
        "snapshot": {"upstream": "snapshot", "vectors": best},
        **{f"snapshot-{v}": {"upstream": "snapshot", "vectors": v} for v in sets if v != best},
        "snapshot-projected": {"upstream": "snapshot", "vectors": best,
                               "projection_dim": preset.projection_dim},
    }
    if preset.coupled or coupled:
        out["coupled"] = {"upstream": "coupled", "vectors": best}
    return out


@dataclass
class Stage:
    """One step of a pipeline: a registered stage (`subcommand`) run with `args`."""

    name: str
    subcommand: str
    args: List[str]
    done: Path  # exists once the stage has finished
    inputs: Tuple[str, ...] = ()
    resumable: bool = False  # train-upstream: --resume from its own checkpoints
    output: Optional[Path] = None  # replaced (--overwrite) when the stage is redone
    # (snapshot root, ranker runs): the pins these rankers hold there, dropped before the stage
    # runs (export: a pinned version is never replaced, and the rankers are redone after it).
    releases: Optional[Tuple[Path, Tuple[Path, ...]]] = None

    @property
    def distributed(self) -> bool:
        return REGISTRY[self.subcommand].distributed


def upstream_specs(w: Path, domains: Tuple[str, ...]) -> Tuple[str, ...]:
    """export's --upstream DOMAIN=RUN of every domain's run under W."""
    return tuple(f"{d}={w / 'upstream' / d}" for d in domains)


def upstream_overrides(cfg: PipelineConfig, preset: Preset) -> Mapping[str, Any]:
    """The preset's upstream overrides; on a world of one's own, without the preset world's
    days (`from_day`): the time split of that world decides."""
    return {k: v for k, v in preset.upstream.items() if cfg.data is None or k != "from_day"}


def stages(cfg: PipelineConfig, p: PipelinePlan) -> List[Stage]:
    w, preset = cfg.workdir, STAGE_PRESETS[cfg.preset]
    world, snaps = p.world, w / "snapshots"
    out = []
    if cfg.data is None:
        out.append(Stage("generate", "generate", ["--out", str(world), "--preset", preset.world,
                                                  "--seed", str(cfg.seed), "--overwrite"],
                         done=world / "_world.json"))
    for d in p.domains:
        run = w / "upstream" / d
        flags = to_flags(TrainUpstreamConfig, {"data": world, "out": run, "domain": d, "seed": cfg.seed,
                                               "epochs": preset.upstream_epochs[d],
                                               **upstream_overrides(cfg, preset)})
        out.append(Stage(f"upstream-{d}", "train-upstream", flags, done=run / runs.METRICS,
                         inputs=("generate",), resumable=True, output=run))
    ranker_runs = rankers(preset, p.domains, cfg.coupled) if p.has_ads else {}
    out.append(Stage("export", "export",
                     to_flags(ExportConfig, {"data": world, "out": snaps, "overwrite": True,
                                             "upstream": upstream_specs(w, p.domains)}),
                     done=snaps / LATEST, inputs=tuple(f"upstream-{d}" for d in p.domains),
                     releases=(snaps, tuple(w / "downstream" / n for n in ranker_runs))))
    if not ranker_runs:
        return out
    for name, overrides in ranker_runs.items():
        run = w / "downstream" / name
        flags = to_flags(TrainDownstreamConfig, {"data": world, "snapshots": snaps, "out": run,
                                                 "seed": cfg.seed, **overrides, **preset.downstream})
        out.append(Stage(f"downstream-{name}", "train-downstream", flags, done=run / runs.METRICS,
                         inputs=("export",), output=run))
    out.append(Stage("evaluate", "evaluate",
                     to_flags(EvaluateConfig, {"runs": tuple(f"{n}={w / 'downstream' / n}" for n in ranker_runs),
                                               "data": world, "snapshots": snaps, "out": w / "evaluate"}),
                     done=w / "evaluate" / "report.json",
                     inputs=tuple(f"downstream-{n}" for n in ranker_runs)))
    return out


def incremental_upstream(preset: Preset) -> Mapping[str, Any]:
    """The preset's upstream overrides for a run on one more day (its own day range instead)."""
    return {k: v for k, v in preset.upstream.items() if k != "from_day"}


def refresh_stages(cfg: PipelineConfig, p: PipelinePlan) -> List[Stage]:
    """One more day: incremental upstream on the cut day, a new version for the next day
    (smoothed and aligned; raw and aligned-only beside it), the old ranker scored with each."""
    w = cfg.workdir
    world, snaps = p.world, w / "snapshots"
    days = SourceTables(world).days("engagements")
    cut = default_split(days).cut_day
    new_cut = days[days.index(cut) + 1]
    out = []
    for d in p.domains:
        run = w / "upstream" / d
        flags = to_flags(TrainUpstreamConfig, {
            "data": world, "out": run, "domain": d, "seed": cfg.seed, "resume": True, "from_day": cut,
            "until": cut, "epochs": 1, **incremental_upstream(STAGE_PRESETS[cfg.preset])})
        out.append(Stage(f"refresh-upstream-{d}", "train-upstream", flags, done=run / runs.METRICS,
                         inputs=("evaluate",)))
    # The real refresh (smoothed) goes into the snapshot root and becomes LATEST; the two
    # comparisons go into REFRESH_ROOT beside a copy of the previous version (see `pipeline`),
    # so that no point-in-time join ever takes them for the live version of a day.
    versions = {"raw": {}, "aligned": {"previous": cut, "weight": 0},
                "smoothed": {"previous": cut, "weight": 0.8}}
    for kind, overrides in versions.items():
        root = snaps if kind == "smoothed" else w / REFRESH_ROOT
        version = new_cut if kind == "smoothed" else f"{new_cut}-{kind}"
        out.append(Stage(f"refresh-export-{kind}", "export",
                         to_flags(ExportConfig, {"data": world, "out": root, "cut": new_cut,
                                                 "version": version, "overwrite": True, **overrides,
                                                 "upstream": upstream_specs(w, p.domains)}),
                         done=root / version / MANIFEST,
                         inputs=tuple(f"refresh-upstream-{d}" for d in p.domains)))
        out.append(Stage(f"refresh-score-{kind}", "score",
                         to_flags(ScoreConfig, {"ranker": w / "downstream" / "snapshot", "snapshots": root,
                                                "snapshot_version": version, "out": w / "refresh" / kind}),
                         done=w / "refresh" / kind / runs.METRICS, inputs=(f"refresh-export-{kind}",),
                         output=w / "refresh" / kind))
    return out


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Runner:
    """Runs stages in order, skipping finished ones, with stamps under W/stamps."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.stamps = cfg.workdir / "stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.digests: Dict[str, str] = {}
        self.timings: Dict[str, object] = {}

    def _stamp_path(self, stage: Stage) -> Path:
        return self.stamps / f"{stage.name}.json"

    def run(self, stage: Stage) -> None:
        want = {"subcommand": stage.subcommand, "args": stage.args,
                "inputs": {i: self.digests[i] for i in stage.inputs}}
        digest = _digest(want)
        self.digests[stage.name] = digest
        path = self._stamp_path(stage)
        old = json.loads(path.read_text()) if path.is_file() else None
        same = old is not None and old["digest"] == digest
        if same and old["finished"] and stage.done.exists():
            print(f"[pipeline] {stage.name}: up to date, skipped")
            self.timings[stage.name] = {"skipped": True, "seconds": old.get("seconds")}
            return
        args = list(stage.args)
        if same and stage.resumable and runs.latest_checkpoint(stage.output) is not None:
            args.append("--resume")
            print(f"[pipeline] {stage.name}: resuming from its last checkpoint")
        elif stage.output is not None and stage.output.exists():
            args.append("--overwrite")  # the stage replaces its earlier run, and only that
        if stage.releases and not same:  # a changed stage: everything after it is redone
            root, owners = stage.releases
            for owner in owners:
                unpin(root, str(owner.resolve()))
        path.write_text(json.dumps({"digest": digest, **want, "finished": False}, indent=2))
        print(f"[pipeline] {stage.name}: derl {stage.subcommand} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        self._launch(stage, args)
        seconds = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps({"digest": digest, **want, "finished": True, "seconds": seconds}, indent=2))
        self.timings[stage.name] = {"skipped": False, "seconds": seconds}

    def _launch(self, stage: Stage, args: List[str]) -> None:
        nproc = ["--nproc", str(self.cfg.nproc)] if stage.distributed else []
        if self.cfg.launcher == "local":  # in our process group: a Ctrl-C stops the stage too
            done = run_derl([stage.subcommand, *args, *nproc], own_group=False, check=False)
            if done.returncode != 0:
                raise StageFailed(f"pipeline stage {stage.name} failed (exit {done.returncode}); "
                                  f"re-run the same command to continue from it")
            return
        # local_cwd starts `torchrun` / `python` from PATH: this interpreter's first.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        from torchx.runner import get_runner
        from torchx.specs import AppState

        from derl.launchers.components import stage_app

        app = stage_app(stage.subcommand, args,
                        nproc_per_node=self.cfg.nproc if stage.distributed else 1)
        with get_runner() as runner:
            handle = runner.run(app, scheduler="local_cwd",
                                cfg={"log_dir": str(self.cfg.workdir / "torchx")})
            status = runner.wait(handle, wait_interval=2)
        if status is None or status.state != AppState.SUCCEEDED:
            raise StageFailed(f"pipeline stage {stage.name} failed under TorchX ({status}); logs in "
                               f"{self.cfg.workdir / 'torchx'}; re-run the same command to continue")


def validate(cfg: PipelineConfig) -> None:
    if cfg.workdir.exists() and not cfg.workdir.is_dir():
        raise FileExistsError(f"--workdir {cfg.workdir}: a file, not a folder")
    if cfg.data is not None:
        p = plan(cfg)
        if cfg.refresh and not p.has_ads:
            raise ValueError(f"--refresh scores the snapshot ranker with the new version; {p.lacks[-1]}")


def run(cfg: PipelineConfig) -> Dict[str, object]:
    t0 = time.perf_counter()
    runner = Runner(cfg)
    p = plan(cfg)
    if cfg.data is not None:  # the world stands in for the generate stage: a changed world redoes all
        runner.digests["generate"] = _digest((cfg.data / WORLD_META).read_text()
                                             if (cfg.data / WORLD_META).is_file() else str(cfg.data.resolve()))
        for line in p.lacks:
            print(f"[pipeline] {line}")
    for stage in stages(cfg, p):
        runner.run(stage)
    if cfg.refresh:
        first = _first_version(cfg.workdir / "snapshots")
        copy = cfg.workdir / REFRESH_ROOT / first
        if not copy.exists():  # the previous version, for the comparisons to align onto
            shutil.copytree(cfg.workdir / "snapshots" / first, copy)
        for stage in refresh_stages(cfg, p):
            runner.run(stage)
    report = combined_report(cfg, p, runner.timings, time.perf_counter() - t0)
    print(_timings_md(report), end="")
    print(f"[pipeline] done in {report['wall_s']:.0f} s: {cfg.workdir / 'report.md'} and report.json")
    return report


def combined_report(cfg: PipelineConfig, p: PipelinePlan, timings: Dict[str, object], wall: float) -> Dict[str, object]:
    w = cfg.workdir
    evaluated = p.has_ads
    report = json.loads((w / "evaluate" / "report.json").read_text()) if evaluated else {}
    meta = p.world / WORLD_META
    report["data"] = {"world": str(p.world), "domains": list(p.domains), "lacks": list(p.lacks),
                      "source": json.loads(meta.read_text()).get("format", "generated") if meta.is_file() else None}
    report["upstream"] = {}
    for d in p.domains:
        m = runs.read_metrics(w / "upstream" / d)
        report["upstream"][d] = runs.headline(m)
        report["upstream"][d].update(steps=m["steps"], train_examples_per_s=m["train_examples_per_s"],
                                     eval_day=m["eval"]["day"])
    snap = Snapshot(w / "snapshots", _first_version(w / "snapshots"))
    report["snapshot"] = {k: v for k, v in snap.manifest.items() if k != "files"}
    if cfg.refresh:
        report["refresh"] = {kind: runs.read_metrics(w / "refresh" / kind)["eval"]["ctr"]
                             for kind in ("raw", "aligned", "smoothed")}
        report["refresh"]["trained_with"] = report["runs"]["snapshot"]["ctr"]
    report["stages"] = timings
    report["wall_s"] = wall  # this invocation's; a re-run skips what is done
    report["stages_s"] = round(sum(t["seconds"] or 0.0 for t in timings.values()), 1)  # all of it
    report["preset"] = cfg.preset
    runs.write_json(w / "report.json", report)
    md = ""
    if evaluated:
        md = (w / "evaluate" / "report.md").read_text().replace("](ne_over_steps.png)", "](evaluate/ne_over_steps.png)")
        md = md.replace("# Downstream evaluation", "## Downstream evaluation", 1)  # a section of this report
    (w / "report.md").write_text(_upstream_md(report) + md + _refresh_md(report) + _timings_md(report))
    return report


def _first_version(root: Path) -> str:
    """The version the rankers trained with: the one the evaluate stage saw (the first cut)."""
    return versions(root)[0]  # oldest first, by cut day, never a hidden half-written folder


def _upstream_md(report: Dict[str, object]) -> str:
    data = report["data"]
    lines = [f"# derl pipeline report ({report['preset']} preset, stages {report['stages_s'] / 60:.1f} min)", "",
             f"World {data['world']} ({data['source'] or 'no _world.json'}); domains: {', '.join(data['domains'])}.",
             *[f"- Left out: {line}." for line in data["lacks"]], "",
             "## Upstream", "", "| domain | steps | train ex/s | eval day | recall@50 | popularity@50 |",
             "|---|---|---|---|---|---|"]
    for d, m in report["upstream"].items():
        lines.append(f"| {d} | {m['steps']} | {m['train_examples_per_s']:,.0f} | {m['eval_day']} "
                     f"| {m['recall@50']:.4f} | {m['popularity_recall@50']:.4f} |")
    s = report["snapshot"]
    lines += ["", f"## Snapshot {s['version']} (cut {s['cut_day']}, dim {s['dim']})", "",
              "| domain | users | pins | ads | entities/s |", "|---|---|---|---|---|"]
    for d, i in s["domains"].items():
        lines.append(f"| {d} | {i['rows']['users']:,} | {i['rows']['pins']:,} | {i['rows']['ads']:,} "
                     f"| {i['entities_per_s']:,.0f} |")
    return "\n".join(lines) + "\n\n"


def _timings_md(report: Dict[str, object]) -> str:
    """Each stage's seconds (a skipped one: what its finished run took), for the report's end."""
    lines = ["", "## Stage timings", "", "| stage | seconds | |", "|---|---|---|"]
    for name, t in report["stages"].items():
        seconds = "-" if t["seconds"] is None else f"{t['seconds']:,.1f}"
        lines.append(f"| {name} | {seconds} | {'skipped: done earlier' if t['skipped'] else ''} |")
    lines.append(f"| all stages | {report['stages_s']:,.1f} | this invocation: {report['wall_s']:,.0f} s |")
    return "\n".join(lines) + "\n"


def _refresh_md(report: Dict[str, object]) -> str:
    r = report.get("refresh")
    if not r:
        return ""
    lines = ["", "## Refresh: the snapshot ranker, trained on the first version, scored with the next", "",
             "| vectors | CTR NE | CTR AUC |", "|---|---|---|"]
    for kind in ("trained_with", "raw", "aligned", "smoothed"):
        lines.append(f"| {kind} | {r[kind]['ne']:.4f} | {r[kind]['auc']:.4f} |")
    return "\n".join(lines) + "\n"

