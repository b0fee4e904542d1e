"""Freshness: what decoupling costs downstream against the age of the vectors and of the upstream
model, and the refresh cadence that pays (the plan and the findings: docs/freshness.md).

On a world with ad events (generated from the preset, or --data), with E its evaluation day and
the rankers trained on the two days before it, as in `derl pipeline`:
- vector age: one upstream model, a version exported for every day from E-K-2 to E; (a) the
  ranker trained with the version of each row's day, scored on E with the version k days old;
  (b) a ranker trained and scored with versions k days old (its first training day's rows get
  the version one day younger: a point-in-time join takes the newest it has); each scored
  version's impressions covered (user and ad both have a vector) and its ad retrieval recall;
- model age: the upstream retrained (one pass over the days since its last training, from its
  checkpoint) every 1, 3, 7 days, against the fixed model, vectors exported daily; the gain
  against the upstream's CPU-seconds a day; and each cadence's vectors smoothed, w = 0.5, 0.8;
- the world: generated worlds whose daily drift and new-entity share are the preset's times
  DRIFTxNEW (--worlds; the first runs everything, the others the age curve (a));
- the honesty checks: the age-0 gain against `derl pipeline`'s snapshot ranker on the same
  world (one version at the split's cut), and, on a world of drift 0 without new entities,
  no age whose NE differs from age 0's beyond its interval.
Every gain is `derl evaluate`'s, over `none` (and over age 0), with its paired interval. Every
step is a `derl` command run through the pipeline's stage runner (stamps under DIR, so a
crashed run continues). Writes DIR/freshness.json, DIR/freshness.md, DIR/freshness.png.

    derl bench --suite freshness --out DIR [--preset freshness|freshness-tiny] [--data WORLD]
        [--max-age 5] [--cadences 1,3,7] [--weights 0.5,0.8] [--worlds 1x1,0x1,3x1,0x0]
        [--parts age,cadence,worlds] [--nproc 1]
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from derl import models
from derl.benchmarks import report
from derl.datapipes.snapshots import MANIFEST
from derl.datapipes.snapshots.writer import exchange
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import WORLD_PRESETS
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import check, setting, to_flags
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.launchers.runtime.settings import (EvaluateConfig, ExportConfig, PipelineConfig, ScoreConfig,
                                             TrainDownstreamConfig, TrainUpstreamConfig)
from derl.launchers.stages.evaluate import ad_retrieval, cold_masks
from derl.launchers.stages.pipeline import Runner, Stage, incremental_upstream, plan, rankers

PARTS = ("age", "cadence", "worlds")
FIXED = 0  # the cadence of the model never retrained


@dataclass(frozen=True)
class FreshnessConfig:
    out: Path = setting(help="work folder (worlds, runs, snapshots, stamps) and freshness.{json,md,png}")
    suite: str = setting("freshness", "derl bench's suite", choices=("freshness",))
    preset: str = setting("freshness", "the world and the stages' settings", choices=sorted(STAGE_PRESETS))
    data: Optional[Path] = setting(None, "a world with ad events (derl import, or generated before) instead of "
                                         "generating the preset's; the preset gives the model sizes")
    max_age: int = setting(5, "K: vectors 0..K days old")
    upstream_days: int = setting(4, "days the first upstream model trains on, before the oldest version")
    cadences: Tuple[int, ...] = setting((1, 3, 7), "retrain the upstream every N days")
    weights: Tuple[float, ...] = setting((0.5, 0.8), "smoothing w in w*E(t-1) + (1-w)*E(t) (0 is always run)")
    worlds: Optional[Tuple[str, ...]] = setting(
        None, "generated worlds DRIFTxNEW, the preset's daily drift and new-entity share times these; the "
              "first runs every part, the others the age curve (default 1x1,0x1,3x1,0x0)")
    parts: str = setting(",".join(PARTS), "what to run, comma-separated: age (vector age and the pipeline "
                                          "check), cadence (model age and smoothing), worlds (the other worlds)")
    seed: int = setting(0, "seed of the worlds and of every stage")
    nproc: int = setting(1, "ranks of each distributed stage")
    resamples: int = setting(1000, "derl evaluate's bootstrap resamples")

    def __post_init__(self) -> None:
        check(self, positive=("max_age", "upstream_days", "nproc", "resamples"), non_negative=("seed",))
        if not self.cadences or min(self.cadences) < 1:
            raise ValueError(f"--cadences must be whole numbers of days, 1 or more, got {self.cadences}")
        if any(not 0 < w < 1 for w in self.weights):
            raise ValueError(f"--weights must lie strictly between 0 and 1 (0 is always run), got {self.weights}")
        unknown = set(self.part_list) - set(PARTS)
        if unknown or not self.part_list:
            raise ValueError(f"--parts {self.parts!r}: expected some of {', '.join(PARTS)}")
        if self.data is not None and self.worlds is not None:
            raise ValueError("--worlds generates worlds of the preset; --data names one of its own: pass one")
        for spec in self.worlds or ():
            scales(spec)

    @property
    def part_list(self) -> Tuple[str, ...]:
        return tuple(p.strip() for p in self.parts.split(",") if p.strip())

    @property
    def world_specs(self) -> Tuple[str, ...]:
        if self.data is not None:
            return ("data",)
        return self.worlds or ("1x1", "0x1", "3x1", "0x0")


def scales(spec: str) -> Tuple[float, float]:
    """DRIFTxNEW -> (drift factor, new-entity factor), refused naming --worlds."""
    drift, sep, new = spec.partition("x")
    try:
        out = (float(drift), float(new))
    except ValueError:
        out = None
    if not sep or out is None or min(out) < 0:
        raise ValueError(f"--worlds {spec!r}: expected DRIFTxNEW, two factors of 0 or more, e.g. 3x1")
    return out


@dataclass(frozen=True)
class Timeline:
    """The days the study works on, by index into the world's days: E the evaluation day, the
    rankers' training days E-2, E-1 (`default_split`), and `first`, the oldest version's cut."""

    days: Tuple[str, ...]
    first: int
    upstream_from: int

    @property
    def eval(self) -> int:
        return len(self.days) - 1

    @property
    def train(self) -> Tuple[int, int]:
        split = default_split(list(self.days))
        return self.days.index(split.downstream_days[0]), self.days.index(split.downstream_days[1])


def timeline(config: FreshnessConfig, days: Sequence[str]) -> Timeline:
    """The study's days on a world of `days`, or the flag that asks for more days than it has."""
    days = tuple(days)
    last = len(days) - 1
    span = {"--max-age": config.max_age + 2}  # (b) trains on E-2 with a version K days older
    if "cadence" in config.part_list:
        span["--cadences"] = max(config.cadences)
    flag, need = max(span.items(), key=lambda kv: kv[1])
    first = last - need
    if first < 1:  # the oldest version needs a day of upstream training before it
        allowed = last - 3
        if flag == "--max-age":
            raise ValueError(f"--max-age {config.max_age} is more than the world's {len(days)} days allow "
                             f"(at most {allowed}: the rankers train on the two days before the evaluation "
                             f"day, and the upstream on at least one day before the oldest version)")
        raise ValueError(f"--cadences {max(config.cadences)} leaves no upstream day: the world's {len(days)} days "
                         f"hold at most {last - 1} days between the first upstream day and the evaluation day")
    return Timeline(days, first, max(0, first - config.upstream_days))


def world_days(config: FreshnessConfig) -> List[str]:
    """The world's days, before any work; --data must hold ad events."""
    if config.data is None:
        cfg = WORLD_PRESETS[STAGE_PRESETS[config.preset].world]
        day0 = dt.date.fromisoformat(cfg.start_day)
        return [(day0 + dt.timedelta(days=i)).isoformat() for i in range(cfg.num_days)]
    if not config.data.is_dir():
        raise FileNotFoundError(f"--data {config.data}: no such world folder")
    if not plan(PipelineConfig(workdir=config.out, data=config.data)).has_ads:
        raise ValueError(f"--data {config.data} has no ad events (ad_events): the study measures rankers on them")
    return SourceTables(config.data).days("engagements")


@dataclass(frozen=True)
class Copy:
    """A plan step that is no derl command: a snapshot version copied to another root (again
    when its manifest changed), or an upstream run to continue elsewhere (once: it goes on
    training there)."""

    source: Path
    target: Path
    marker: Optional[str] = MANIFEST

    def do(self) -> None:
        if self.marker is None and self.target.exists():
            return
        mark = self.target / str(self.marker)
        if mark.is_file() and mark.read_bytes() == (self.source / str(self.marker)).read_bytes():
            return
        fresh = self.target.with_name(f".{self.target.name}.copying")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(self.source, fresh)
        if self.target.exists():  # the new copy in place before the old one goes
            exchange(fresh, self.target)
            shutil.rmtree(fresh)
        else:
            fresh.rename(self.target)


Step = Union[Stage, Copy]


class World:
    """One world's plan: its folders, its stages and, once run, its results."""

    def __init__(self, config: FreshnessConfig, spec: str, t: Timeline, main: bool):
        self.config, self.spec, self.t, self.main = config, spec, t, main
        self.dir = config.out / (spec if spec == "data" else f"world-{spec}")
        self.data = config.data or self.dir / "world"
        self.preset = STAGE_PRESETS[config.preset]
        self.parts = config.part_list if main else ("age",)
        self.domains: Tuple[str, ...] = ()  # known once the world exists
        self.ranker: Dict[str, object] = {}  # the snapshot ranker's overrides, as the pipeline's
        self.cpu_path = self.dir / "cpu_seconds.json"

    def day(self, i: int) -> str:
        return self.t.days[i]

    # --- the pieces every plan is made of -----------------------------------------------------

    def upstream(self, name: str, run: Path, domain: str, first: int, last: int, after: Tuple[str, ...],
                 resume: bool = False) -> Stage:
        """Train-upstream of `domain` on days first..last: from scratch, or one pass from the
        run's checkpoint (`resume`: an incremental retrain)."""
        values = {"data": self.data, "out": run, "domain": domain, "seed": self.config.seed,
                  **incremental_upstream(self.preset), "from_day": self.day(first), "until": self.day(last),
                  "resume": resume, "epochs": 1 if resume else self.preset.upstream_epochs[domain]}
        return Stage(name, "train-upstream", to_flags(TrainUpstreamConfig, values), done=run / runs.METRICS,
                     inputs=after, resumable=not resume, output=None if resume else run)

    def export(self, name: str, models: Path, root: Path, cut: int, after: Tuple[str, ...],
               weight: float = 0.0) -> Stage:
        smooth = {"previous": "latest", "weight": weight} if weight else {}
        return Stage(name, "export", to_flags(ExportConfig, {
            "data": self.data, "out": root, "cut": self.day(cut), "overwrite": True, **smooth,
            "upstream": tuple(f"{d}={models / d}" for d in self.domains)}),
            done=root / self.day(cut) / MANIFEST, inputs=after)

    def train_ranker(self, name: str, snapshots: Optional[Path], after: Tuple[str, ...]) -> Stage:
        run = self.dir / "rankers" / name
        overrides = {"upstream": "none"} if snapshots is None else self.ranker
        return Stage(f"ranker-{name}", "train-downstream", to_flags(TrainDownstreamConfig, {
            "data": self.data, "snapshots": snapshots, "out": run, "seed": self.config.seed, **overrides,
            **self.preset.downstream}), done=run / runs.METRICS, inputs=after, output=run)

    def score(self, name: str, ranker: str, snapshots: Path, after: Tuple[str, ...]) -> Stage:
        out = self.dir / "scores" / name
        return Stage(f"score-{name}", "score", to_flags(ScoreConfig, {
            "ranker": self.dir / "rankers" / ranker, "snapshots": snapshots, "out": out}),
            done=out / runs.METRICS, inputs=after, output=out)

    def evaluate(self, name: str, runs_: Dict[str, Path], baseline: str, after: Tuple[str, ...]) -> Stage:
        out = self.dir / "evaluate" / name
        return Stage(f"evaluate-{name}", "evaluate", to_flags(EvaluateConfig, {
            "runs": tuple(f"{n}={p}" for n, p in runs_.items()), "out": out, "baseline": baseline,
            "resamples": self.config.resamples}), done=out / "report.json", inputs=after)

    def snapshots(self, name: str) -> Path:
        return self.dir / "snapshots" / name

    # --- the plan -----------------------------------------------------------------------------

    def generate(self) -> List[Step]:
        if self.config.data is not None:
            return []
        base = WORLD_PRESETS[self.preset.world]
        drift, new = scales(self.spec)
        flags = ["--out", str(self.data), "--preset", self.preset.world, "--seed", str(self.config.seed),
                 "--daily-drift", repr(base.daily_drift * drift), "--new-entity-share",
                 repr(base.cold_user_fraction * new), "--overwrite"]
        return [Stage("generate", "generate", flags, done=self.data / "_world.json")]

    def age_plan(self) -> List[Step]:
        """The first model, a version a day, the fresh ranker, (a) and (b), the pipeline's check."""
        t, k_max = self.t, self.config.max_age
        lags = self.main  # (b) and the pipeline check: the main world's only
        steps: List[Step] = [self.upstream(f"upstream-base-{d}", self.dir / "upstream" / "base" / d, d,
                                           t.upstream_from, t.first - 1, ("generate",))
                             for d in self.domains]
        after: Tuple[str, ...] = tuple(s.name for s in steps)
        daily = self.snapshots("daily")
        oldest = t.eval - k_max - (2 if lags else 0)
        for cut in range(min(oldest, t.train[0]), t.eval + 1):
            steps.append(self.export(f"export-daily-{self.day(cut)}", self.dir / "upstream" / "base", daily, cut,
                                     after))
        exported = tuple(s.name for s in steps if isinstance(s, Stage) and s.subcommand == "export")
        steps += [self.train_ranker("none", None, ("generate",)), self.train_ranker("fresh", daily, exported)]
        for k in range(1, k_max + 1):
            view = self.snapshots(f"age-{k}")  # the version k days old alone: live on E
            steps.append(Copy(daily / self.day(t.eval - k), view / self.day(t.eval - k)))
            steps.append(self.score(f"age-{k}", "fresh", view, ("ranker-fresh",)))
            if lags:
                lag = self.snapshots(f"lag-{k}")
                steps += [Copy(daily / self.day(i - k), lag / self.day(i - k)) for i in t.train]
                steps.append(self.train_ranker(f"lag-{k}", lag, exported))
                steps.append(self.score(f"lag-{k}", f"lag-{k}", view, (f"ranker-lag-{k}",)))
        if lags:
            steps += self.pipeline_plan()
        return steps

    def pipeline_plan(self) -> List[Step]:
        """`derl pipeline`'s snapshot ranker on this world: an upstream on as many days before the
        split's cut as the first model has, one version at the cut, the live join."""
        cut, days = self.t.train[0], self.t.first - self.t.upstream_from
        root = self.dir / "pipeline"
        steps: List[Step] = [self.upstream(f"pipeline-upstream-{d}", root / "upstream" / d, d,
                                           max(0, cut - days), cut - 1, ("generate",)) for d in self.domains]
        steps.append(self.export("pipeline-export", root / "upstream", root / "snapshots", cut,
                                 tuple(s.name for s in steps)))
        steps.append(self.train_ranker("pipeline", root / "snapshots", ("pipeline-export",)))
        return steps

    def retrains(self, cadence: int) -> List[int]:
        """The cut days on which a cadence's model is retrained: every `cadence` days, placed so
        that the evaluation day sits mid-cycle (1, 3, 7 days: models 0, 1, 3 days old on E)."""
        return [c for c in range(self.t.first + 1, self.t.eval + 1) if (self.t.eval - c) % cadence == cadence // 2]

    def cadence_plan(self) -> List[Step]:
        """Per cadence (and the fixed model): its retrains in day order, and on each of the
        rankers' days and E a version per smoothing weight from the model of that day; then a
        ranker per chain."""
        t, steps = self.t, []
        window = list(range(t.train[0], t.eval + 1))
        base = self.dir / "upstream" / "base"
        for cadence in (FIXED, *self.config.cadences):
            models = base if cadence == FIXED else self.dir / "upstream" / f"every-{cadence}"
            after = tuple(f"upstream-base-{d}" for d in self.domains)
            previous = t.first
            for cut in range(t.first + 1, t.eval + 1):
                if cadence != FIXED and cut in self.retrains(cadence):
                    if previous == t.first:  # the first retrain continues from the first model
                        steps += [Copy(base / d, models / d, marker=None) for d in self.domains]
                    trained = [self.upstream(f"every-{cadence}-{self.day(cut)}-{d}", models / d, d, previous, cut - 1,
                                             after, resume=True) for d in self.domains]
                    steps += trained
                    after, previous = tuple(s.name for s in trained), cut
                if cut not in window:
                    continue
                for w in (0.0, *self.config.weights):
                    if cadence == FIXED and not w:
                        continue  # the daily root of the age plan
                    chain = self.chain(cadence, w)
                    steps.append(self.export(f"export-{chain}-{self.day(cut)}", models, self.snapshots(chain), cut,
                                             after, weight=w if cut != window[0] else 0.0))
        for cadence in (FIXED, *self.config.cadences):
            for w in (0.0, *self.config.weights):
                if cadence == FIXED and not w:
                    continue
                chain = self.chain(cadence, w)
                steps.append(self.train_ranker(chain, self.snapshots(chain),
                                               tuple(f"export-{chain}-{self.day(c)}" for c in window)))
        return steps

    @staticmethod
    def chain(cadence: int, weight: float) -> str:
        return f"{'fixed' if cadence == FIXED else f'every-{cadence}'}-w{weight:g}"

    def run_names(self) -> Dict[str, Path]:
        """Every scored run the study compares, by name (the evaluation's)."""
        k_max, out = self.config.max_age, {"none": self.dir / "rankers" / "none",
                                           "fresh": self.dir / "rankers" / "fresh"}
        out.update({f"age-{k}": self.dir / "scores" / f"age-{k}" for k in range(1, k_max + 1)})
        if self.main:
            out.update({f"lag-{k}": self.dir / "scores" / f"lag-{k}" for k in range(1, k_max + 1)})
            out["pipeline"] = self.dir / "rankers" / "pipeline"
        if "cadence" in self.parts:
            out.update({self.chain(c, w): self.dir / "rankers" / self.chain(c, w)
                        for c in (FIXED, *self.config.cadences) for w in (0.0, *self.config.weights)
                        if c != FIXED or w})
        return out

    def evaluate_plan(self, done: Tuple[str, ...]) -> List[Step]:
        """Every run's NE gain over `none`, and over age 0 (the fixed model's fresh versions),
        with paired intervals."""
        named = self.run_names()
        others = {n: p for n, p in named.items() if n != "none"}
        return [self.evaluate("over-none", named, "none", done), self.evaluate("over-fresh", others, "fresh", done)]

    # --- running it -----------------------------------------------------------------------------

    def run(self) -> Dict[str, object]:
        runner = Runner(PipelineConfig(workdir=self.dir, preset=self.config.preset, seed=self.config.seed,
                                       data=self.config.data, nproc=self.config.nproc))
        cpu = json.loads(self.cpu_path.read_text()) if self.cpu_path.is_file() else {}
        t0 = time.perf_counter()

        def steps(plan_: List[Step]) -> None:
            for step in plan_:
                if isinstance(step, Copy):
                    step.do()
                    continue
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                runner.run(step)
                if not runner.timings[step.name]["skipped"]:  # CPU of the stage's processes
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu[step.name] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
                    self.cpu_path.write_text(json.dumps(cpu, indent=1))

        self.dir.mkdir(parents=True, exist_ok=True)
        steps(self.generate())
        if self.config.data is not None:  # the world stands in for the generate stage
            runner.digests["generate"] = str(self.config.data.resolve())
        p = plan(PipelineConfig(workdir=self.dir, data=self.data))
        self.domains = p.domains
        self.ranker = rankers(self.preset, self.domains)["snapshot"]
        steps(self.age_plan())
        if "cadence" in self.parts:
            steps(self.cadence_plan())
        steps(self.evaluate_plan(tuple(f"{'score' if n.startswith(('age-', 'lag-')) else 'ranker'}-{n}"
                                       for n in self.run_names())))
        return self.summarise(cpu, runner, time.perf_counter() - t0)

    # --- what it found --------------------------------------------------------------------------

    def summarise(self, cpu: Dict[str, float], runner: Runner, wall: float) -> Dict[str, object]:
        over_none = json.loads((self.dir / "evaluate" / "over-none" / "report.json").read_text())
        over_fresh = json.loads((self.dir / "evaluate" / "over-fresh" / "report.json").read_text())
        tasks = over_none["tasks"]

        def gains(report_: Dict[str, object], name: str) -> Dict[str, Dict[str, float]]:
            g = report_["ne_gain_over_baseline"][name]
            return {task: {k: g[task][k] for k in ("gain", "ci_low", "ci_high", "significant")} for task in tasks}

        def row(name: str, **extra: object) -> Dict[str, object]:
            m = over_none["runs"][name]
            return {"run": name, **extra, "over_none": gains(over_none, name),
                    **({"over_fresh": gains(over_fresh, name)}
                       if name in over_fresh["runs"] and name != "fresh" else {}),
                    "ne": {task: m[task]["ne"] for task in tasks}}

        result: Dict[str, object] = {"world": self.spec, "data": str(self.data), "domains": list(self.domains),
                                     "eval_day": over_none["eval_day"], "rows": over_none["rows"],
                                     "clicks": over_none["clicks"], "conversions": over_none["conversions"],
                                     "days": {"first_model": [self.day(self.t.upstream_from),
                                                              self.day(self.t.first - 1)],
                                              "rankers_train": [self.day(i) for i in self.t.train]}}
        if self.config.data is None:
            meta = json.loads((self.data / "_world.json").read_text())["config"]
            result["daily_drift"], result["new_entity_share"] = meta["daily_drift"], meta["cold_user_fraction"]
        age = []
        for k in range(self.config.max_age + 1):
            view = self.snapshots("daily") if k == 0 else self.snapshots(f"age-{k}")
            a = row("fresh" if k == 0 else f"age-{k}", age=k, kind="a", **self.coverage(view))
            age.append(a)
            if self.main and k:
                age.append(row(f"lag-{k}", age=k, kind="b", coverage=a["coverage"], recall_at_50=a["recall_at_50"]))
        result["age"] = age
        if self.main and "pipeline" in over_none["runs"]:
            result["pipeline"] = row("pipeline", version=over_none["runs"]["pipeline"]["eval_versions"])
        if "cadence" in self.parts:
            result["cadence"] = self.cadence_rows(row, cpu)
        result["wall_s"] = round(wall, 1)
        result["stages_s"] = round(sum(t["seconds"] or 0.0 for t in runner.timings.values()), 1)
        result["stages"] = len(runner.timings)
        return result

    def coverage(self, view: Path) -> Dict[str, object]:
        """The share of E's impressions whose user and ad the version live on E in `view` holds,
        and its ad retrieval recall@50 (best domain; popularity beside it)."""
        day = self.day(self.t.eval)
        rows = SourceTables(self.data).read("ad_events", (day, day), columns=["user_id", "pin_id"])
        masks = cold_masks(view, day, {c: rows.column(c).to_numpy() for c in ("user_id", "pin_id")})
        train_days = runs.read_metrics(self.dir / "rankers" / "fresh")["train_days"]
        found = ad_retrieval(view, self.data, day, train_days)
        return {"version": found["version"], "coverage": float(masks["warm"].mean()),
                "recall_at_50": {d: found[d]["recall@50"] for d in (*self.domains, "popularity")}}

    def cadence_rows(self, row, cpu: Dict[str, float]) -> List[Dict[str, object]]:
        """Each chain's gains, with its upstream's CPU-seconds a day: the retrains' CPU over the
        days they trained on (every day once, whatever the cadence), plus a day's export."""
        exports = [v for k, v in cpu.items() if k.startswith("export-daily-")]
        export_s = sum(exports) / max(len(exports), 1)
        out = []
        for cadence in (FIXED, *self.config.cadences):
            trained = self.retrains(cadence) if cadence != FIXED else []
            retrain_s = sum(v for k, v in cpu.items() if k.startswith(f"every-{cadence}-"))
            days = self.t.eval - self.t.first if trained else 0
            bounds = [self.t.first, *trained]
            covered = sum(b - a for a, b in zip(bounds, bounds[1:]))
            per_day = retrain_s / covered if covered else 0.0
            for w in (0.0, *self.config.weights):
                name = "fresh" if cadence == FIXED and not w else self.chain(cadence, w)
                out.append(row(name, cadence=cadence or "fixed", weight=w,
                               retrains=[self.day(c) for c in trained], model_age_on_eval=(
                                   self.t.eval - (max(trained) if trained else self.t.first)),
                               upstream_cpu_s_per_day=round(per_day, 1), export_cpu_s_per_day=round(export_s, 1),
                               horizon_days=days))
        return out


def checks(worlds: List[Dict[str, object]]) -> Dict[str, object]:
    """The study's honesty: age 0 against the pipeline's snapshot ranker, and a flat age curve
    on a world of drift 0 without new entities (every age's NE within its interval of age 0's)."""
    out: Dict[str, object] = {}
    main = worlds[0]
    if "pipeline" in main:
        fresh, pipe = main["age"][0]["over_none"], main["pipeline"]["over_none"]
        out["age_0_is_the_pipeline_gain"] = {
            task: {"age_0": fresh[task], "pipeline": pipe[task]["gain"],
                   "holds": fresh[task]["ci_low"] <= pipe[task]["gain"] <= fresh[task]["ci_high"]}
            for task in fresh}
    for w in worlds:
        if w.get("daily_drift") == 0 and w.get("new_entity_share") == 0:
            aged = [r for r in w["age"] if r["age"] and "over_fresh" in r]
            out["no_cost_without_drift"] = {
                "world": w["world"],
                "holds": all(not g["significant"] for r in aged for g in r["over_fresh"].values()),
                "ages": {f"{r['kind']}{r['age']}": {t: [g["ci_low"], g["ci_high"]] for t, g in r["over_fresh"].items()}
                         for r in aged}}
    return out


def render(result: Dict[str, object]) -> str:
    """freshness.md: the tables a person reads."""
    def g(gain: Dict[str, Dict[str, float]], task: str) -> str:
        if task not in gain:
            return "–"
        x = gain[task]
        return f"{x['gain']:+.2%} [{x['ci_low']:+.2%}, {x['ci_high']:+.2%}]{' *' if x['significant'] else ''}"

    meta = result["meta"]
    lines = ["# freshness", "", ", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    for w in result["worlds"]:
        tasks = list(w["age"][0]["over_none"])
        lines += [f"## World {w['world']} ({w['data']})", "",
                  f"Evaluation day {w['eval_day']}: {w['rows']:,} impressions, {w['clicks']:,} clicks, "
                  f"{w['conversions']:,} conversions; first model trained on {' to '.join(w['days']['first_model'])}; "
                  f"rankers train on {', '.join(w['days']['rankers_train'])}"
                  + (f"; daily drift {w['daily_drift']:g}, new-entity share {w['new_entity_share']:g}"
                     if "daily_drift" in w else "") + f"; {w['stages']} stages, {w['stages_s'] / 60:.1f} min.", "",
                  "Vector age ((a): the fresh ranker scored with a version k days old; (b): a ranker trained and "
                  "scored k days behind). NE gain over `none`, and over age 0, with 95 % paired intervals "
                  "(* excludes 0):", "",
                  "| k | kind | " + " | ".join(f"{t.upper()} gain over none" for t in tasks) + " | "
                  + " | ".join(f"{t.upper()} over age 0" for t in tasks) + " | coverage | recall@50 |",
                  "|---|---|" + "---|" * (2 * len(tasks) + 2)]
        for r in w["age"]:
            recall = ", ".join(f"{d} {v:.3f}" for d, v in r["recall_at_50"].items())
            lines.append(f"| {r['age']} | {r['kind']} | " + " | ".join(g(r["over_none"], t) for t in tasks) + " | "
                         + " | ".join(g(r.get("over_fresh", {}), t) for t in tasks)
                         + f" | {r['coverage']:.4f} | {recall} |")
        if "pipeline" in w:
            p = w["pipeline"]
            lines += ["", f"`derl pipeline`'s snapshot ranker on this world (one version, {', '.join(p['version'])}): "
                      + ", ".join(f"{t.upper()} {g(p['over_none'], t)}" for t in tasks) + "."]
        if "cadence" in w:
            lines += ["", "Model age: the upstream retrained every N days (one pass over the days since its last "
                          "training) against the fixed model, its vectors exported daily and smoothed with w:", "",
                      "| cadence | w | model age on E | upstream CPU-s/day | "
                      + " | ".join(f"{t.upper()} gain over none" for t in tasks) + " | "
                      + " | ".join(f"{t.upper()} over the fixed model" for t in tasks) + " |",
                      "|---|---|---|---|" + "---|" * 2 * len(tasks)]
            for r in w["cadence"]:
                lines.append(f"| {r['cadence']} | {r['weight']:g} | {r['model_age_on_eval']} "
                             f"| {r['upstream_cpu_s_per_day']:,.0f} | "
                             + " | ".join(g(r["over_none"], t) for t in tasks) + " | "
                             + " | ".join(g(r.get("over_fresh", {}), t) for t in tasks) + " |")
            lines.append(f"\nA daily export (batch inference, every cadence): "
                         f"{w['cadence'][0]['export_cpu_s_per_day']:,.0f} CPU-s.")
        lines.append("")
    lines += ["## Checks", "", "```json", json.dumps(result["checks"], indent=1), "```", ""]
    return "\n".join(lines)


def plot(result: Dict[str, object], path: Path) -> None:
    worlds = result["worlds"]
    main = worlds[0]
    task = "ctr"

    def series(rows: List[Dict[str, object]], kind: str) -> Tuple[List[int], List[float], List[List[float]]]:
        rows = [r for r in rows if r["kind"] == kind or (kind == "b" and r["age"] == 0)]
        gain = [100 * r["over_none"][task]["gain"] for r in rows]
        err = [[100 * (r["over_none"][task]["gain"] - r["over_none"][task]["ci_low"]) for r in rows],
               [100 * (r["over_none"][task]["ci_high"] - r["over_none"][task]["gain"]) for r in rows]]
        return [r["age"] for r in rows], gain, err

    panels = 2 + ("cadence" in main) + (len(worlds) > 1)
    with report.figure(path, panels, (5 * panels, 4), dpi=110,
                       title=f"Freshness on {main['world']}: CTR NE gain over no upstream (95 % intervals)") as axes:
        a = axes[0]
        for kind, label in (("a", "(a) fresh ranker, old version"), ("b", "(b) trained and scored k days behind")):
            x, y, e = series(main["age"], kind)
            if len(x) > 1:
                a.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
        if "pipeline" in main:
            a.axhline(100 * main["pipeline"]["over_none"][task]["gain"], color="grey", ls="--", lw=0.8,
                      label="derl pipeline's snapshot ranker")
        a.axhline(0, color="black", lw=0.5)
        a.set(xlabel="vector age k (days)", ylabel="CTR NE gain over none (%)", title="Vector age")
        a.legend(fontsize=7)
        b = axes[1]
        ages = [r["age"] for r in main["age"] if r["kind"] == "a"]
        b.plot(ages, [r["coverage"] for r in main["age"] if r["kind"] == "a"], marker="o", label="coverage")
        for d in main["domains"]:
            b.plot(ages, [r["recall_at_50"][d] for r in main["age"] if r["kind"] == "a"], marker="s",
                   label=f"ad recall@50, {d}")
        b.set(xlabel="vector age k (days)", ylabel="share", title="Coverage and retrieval", ylim=(0, 1.05))
        b.legend(fontsize=7)
        i = 2
        if "cadence" in main:
            c = axes[i]
            i += 1
            for w in (0.0, *result["meta"]["weights"]):
                rows = [r for r in main["cadence"] if r["weight"] == w]
                x = [r["upstream_cpu_s_per_day"] for r in rows]
                y = [100 * r["over_none"][task]["gain"] for r in rows]
                e = [[100 * (r["over_none"][task]["gain"] - r["over_none"][task]["ci_low"]) for r in rows],
                     [100 * (r["over_none"][task]["ci_high"] - r["over_none"][task]["gain"]) for r in rows]]
                c.errorbar(x, y, yerr=e, marker="o", capsize=3, ls=":", label=f"w = {w:g}")
                if w == 0.0:
                    for r, xx, yy in zip(rows, x, y):
                        c.annotate(str(r["cadence"]), (xx, yy), fontsize=7, xytext=(3, 3), textcoords="offset points")
            c.set(xlabel="upstream training CPU-s a day", ylabel="CTR NE gain over none (%)",
                  title="Retrain cadence (fixed, every N days)")
            c.legend(fontsize=7)
        if len(worlds) > 1:
            d = axes[i]
            for w in worlds:
                x, y, e = series(w["age"], "a")
                d.errorbar(x, y, yerr=e, marker="o", capsize=3,
                           label=f"drift {w['daily_drift']:g}, new {w['new_entity_share']:g}")
            d.axhline(0, color="black", lw=0.5)
            d.set(xlabel="vector age k (days)", ylabel="CTR NE gain over none (%)", title="(a) by world")
            d.legend(fontsize=7)


def models_digest() -> str:
    """A digest of the model code (models/*.py): every stage of a study must train one upstream.
    A resumed study whose model code changed in between mixes two; its result says so."""
    files = sorted(Path(models.__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = report.parse_config(FreshnessConfig, argv, __doc__, prog="derl bench --suite freshness")
    try:  # every refusal before any work
        t = timeline(config, world_days(config))
    except (ValueError, FileNotFoundError) as e:
        report.parser(__doc__, "derl bench --suite freshness").error(str(e))
    specs = config.world_specs if "worlds" in config.part_list else config.world_specs[:1]
    t0 = time.perf_counter()
    code = models_digest()
    config.out.mkdir(parents=True, exist_ok=True)
    started = config.out / "models_digest.txt"  # the model code of the study's first run
    if not started.is_file():
        started.write_text(code)
    worlds = [World(config, spec, t, main=i == 0).run() for i, spec in enumerate(specs)]
    code = {"first_run": started.read_text(), "now": models_digest()}
    meta = {**report.machine(cores=True), "preset": config.preset, "max_age": config.max_age,
            "cadences": list(config.cadences), "weights": list(config.weights),
            "command": " ".join(["derl bench", *([] if "--suite" in argv else ["--suite", "freshness"]), *argv]),
            "wall_s": round(time.perf_counter() - t0, 1), "models_digest": code}
    if len(set(code.values())) > 1:
        print(f"freshness: the model code changed since this study's first run ({code}): its stages may "
              f"have trained different upstreams; start it afresh in a new --out", file=sys.stderr)
    result = {"meta": meta, "worlds": worlds, "checks": checks(worlds)}
    (config.out / "freshness.json").write_text(json.dumps(result, indent=2))
    (config.out / "freshness.md").write_text(render(result))
    plot(result, config.out / "freshness.png")
    print((config.out / "freshness.md").read_text())
    return {**result, "errors": {}}


def main() -> None:
    report.exit_on_errors(run())


if __name__ == "__main__":
    main()
