"""The stage configs: one frozen dataclass per stage, its fields the stage's flags.

`derl <stage> --help` is generated from these (`config.add_flags`): each field carries its help
text, and its default exists once: here, or, for a model setting, in the model's settings class,
which the training stage's config inherits (`UpstreamSettings`, `RankerSettings`: declared,
defaulted and checked in models/), or in the optimizer's config (`default_of`). They sit
together, apart from the stages that run them, so that the CLI, the pipeline, the presets, the
benchmarks and the tests can name a stage's settings without importing the stage (no entry point
imports another). A stage module reads its config only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

from derl.datapipes.domains import DOMAINS, VECTOR_SETS
from derl.launchers.runtime.config import check, default_of, setting
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.models.downstream import RankerSettings
from derl.models.sharding import OptimConfig
from derl.models.upstream import UpstreamConfig, UpstreamSettings


def settings_of(config: Any, model_settings: type) -> Dict[str, Any]:
    """The model settings a stage config inherited, as keyword arguments of the model config."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(model_settings)}


OVERWRITE_HELP = ("start afresh in a folder that holds an earlier run of this stage (derl removes "
                  "that run's own files; anything else there is refused)")


@dataclass(frozen=True)
class TrainUpstreamConfig(UpstreamSettings):
    """How to train an upstream; what it trains is the inherited `UpstreamSettings`."""

    data: Path = setting(help="source folder (derl generate)")
    out: Path = setting(help="run folder")
    domain: str = setting("engagement", "the upstream domain", choices=sorted(DOMAINS))
    nproc: int = setting(1, "local worker processes (ranks)")
    max_steps: Optional[int] = setting(None, "stop after this many steps (default: --epochs)")
    epochs: float = setting(1.0, "passes over the training days' user windows (every row and engagement once)")
    resume: bool = setting(False, "continue from RUN's newest checkpoint")
    from_day: Optional[str] = setting(None, "first training day (default: the source's first)")
    until: Optional[str] = setting(None, "last training day (default: the day before the snapshot cut)")
    targets_from_day: Optional[str] = setting(
        None, "first day whose engagements are next-Pin targets; days before --from-day add their users' "
              "engagements without rows (default: --from-day)")
    batch_size: int = setting(256, "user windows (one user's day: its rows and engagements) a step, per rank")
    embedding_lr: float = setting(default_of(OptimConfig, "embedding_lr"), "fused row-wise Adagrad")
    dense_lr: float = setting(default_of(OptimConfig, "dense_lr"), "Adam, every dense parameter")
    checkpoint_every: int = setting(200, "steps between checkpoints")
    eval_every: int = setting(0, "steps between evaluations (0: at the end only)")
    eval_batch_size: int = setting(2048, "entities per forward in evaluation")
    memory_per_rank_gb: Optional[float] = setting(None, "planner memory cap (default: the host's)")
    seed: int = setting(0, "seed of the model and the data order")
    overwrite: bool = setting(False, OVERWRITE_HELP)

    # What a resumed run may change: where, how long and how it runs, not what it trains.
    RUN_CONTROL: ClassVar[Tuple[str, ...]] = (
        "data", "out", "nproc", "max_steps", "epochs", "resume", "overwrite", "from_day", "until", "targets_from_day",
        "checkpoint_every", "eval_every", "eval_batch_size", "memory_per_rank_gb", "length_buckets", "seq_bf16")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, positive=("nproc", "max_steps", "epochs", "batch_size", "embedding_lr", "dense_lr",
                              "checkpoint_every", "eval_batch_size", "memory_per_rank_gb"),
              non_negative=("eval_every", "seed"), day=("from_day", "until", "targets_from_day"))
        if self.from_day and self.until and self.from_day > self.until:
            raise ValueError(f"--from-day {self.from_day} is after --until {self.until}")
        if self.targets_from_day and self.until and self.targets_from_day > self.until:
            raise ValueError(f"--targets-from-day {self.targets_from_day} is after --until {self.until}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one")

    def model_config(self, vocab: Dict[str, int]) -> UpstreamConfig:
        """The DERM of this run: its settings, the domain's tasks and the data's vocabularies."""
        return UpstreamConfig.for_domain(self.domain, vocab, **settings_of(self, UpstreamSettings))


@dataclass(frozen=True)
class ExportConfig:
    data: Path = setting(help="source folder")
    upstream: Tuple[str, ...] = setting(help="an upstream run per domain (repeat for engagement and conversion)",
                                        repeat=True, metavar="DOMAIN=RUN")
    out: Path = setting(help="snapshot root")
    cut: Optional[str] = setting(None, "snapshot day: vectors as of its start (default: the split's cut)")
    version: Optional[str] = setting(None, "version name (default: the cut day)")
    nproc: int = setting(1, "local worker processes (ranks)")
    batch_size: int = setting(4096, "entities per forward, per rank")
    overwrite: bool = setting(False, "replace an existing version (derl's own, unpinned)")
    previous: Optional[str] = setting(None, "refresh: smooth with this version ('latest': LATEST)")
    weight: float = setting(0.8, "refresh: w in w*E(t-1) + (1-w)*E(t)")
    align: bool = setting(True, "refresh: average without Procrustes")
    retention_days: int = setting(90, "leave out users and Pins idle longer than this before the cut "
                                      "(no engagement or ad event; with none at all, counted from "
                                      "signup / creation)")

    def __post_init__(self) -> None:
        check(self, positive=("nproc", "batch_size", "retention_days"), fraction=("weight",), day=("cut",))


@dataclass(frozen=True)
class TrainDownstreamConfig(RankerSettings):
    """How to train a ranker; what it trains is the inherited `RankerSettings`."""

    data: Path = setting(help="source folder (derl generate)")
    out: Path = setting(help="run folder")
    snapshots: Optional[Path] = setting(None, "snapshot root (derl export --out)")
    vectors: str = setting("all", "which upstream vectors: engagement user; + its Pin; all four",
                           choices=sorted(VECTOR_SETS))
    snapshot_version: Optional[str] = setting(
        None, "join every row with this version instead of the one live on its day")
    nproc: int = setting(1, "local worker processes (ranks)")
    epochs: float = setting(1.0, "passes over the training days' ad impressions")
    max_steps: Optional[int] = setting(None, "stop after this many steps (default: --epochs)")
    batch_size: int = setting(512, "per rank")
    embedding_lr: float = setting(default_of(OptimConfig, "embedding_lr"), "fused row-wise Adagrad")
    dense_lr: float = setting(default_of(OptimConfig, "dense_lr"), "Adam, every dense parameter")
    from_day: Optional[str] = setting(None, "first training day (default: the split's downstream days)")
    until: Optional[str] = setting(None, "last training day")
    eval_day: Optional[str] = setting(None, "evaluation day (default: the split's last day)")
    ne_window: int = setting(20, "batches in the training-NE window")
    checkpoint_every: int = setting(0, "steps between checkpoints (0: at the end only)")
    seed: int = setting(0, "seed of the model and the data order")
    overwrite: bool = setting(False, OVERWRITE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, positive=("nproc", "epochs", "max_steps", "batch_size", "embedding_lr", "dense_lr",
                              "ne_window"),
              non_negative=("checkpoint_every", "seed"), day=("from_day", "until", "eval_day"))
        if self.from_day and self.until and self.from_day > self.until:
            raise ValueError(f"--from-day {self.from_day} is after --until {self.until}")

    @property
    def vector_names(self) -> Tuple[str, ...]:
        return VECTOR_SETS[self.vectors] if self.upstream != "none" else ()


@dataclass(frozen=True)
class ScoreConfig:
    ranker: Path = setting(help="a ranker run (derl train-downstream --out)", flag="--run")
    out: Path = setting(help="folder for its predictions and metrics")
    snapshots: Optional[Path] = setting(None, "snapshot root (default: the run's)")
    snapshot_version: Optional[str] = setting(
        None, "join every row with this version (default: the one live on its day)")
    data: Optional[Path] = setting(None, "source folder (default: the run's)")
    eval_day: Optional[str] = setting(None, "day to score (default: the run's evaluation day)")
    nproc: int = setting(1, "local worker processes (ranks)")
    overwrite: bool = setting(False, "replace an earlier `derl score` output in --out")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",), day=("eval_day",))


@dataclass(frozen=True)
class EvaluateConfig:
    runs: Tuple[str, ...] = setting(help="ranker runs (derl train-downstream --out); NAME defaults "
                                         "to the folder name", many=True, metavar="NAME=RUN")
    out: Path = setting(help="folder for report.json, report.md and the NE plot")
    baseline: str = setting("none", "the run NAME the gains are measured against")
    data: Optional[Path] = setting(None, "source folder (for ad retrieval recall)")
    snapshots: Optional[Path] = setting(None, "snapshot root (cold start, ad retrieval)")
    resamples: int = setting(1000, "bootstrap resamples")

    def __post_init__(self) -> None:
        check(self, positive=("resamples",))


@dataclass(frozen=True)
class PipelineConfig:
    workdir: Path = setting(help="work folder: the world, every run, the snapshots, the report")
    preset: str = setting("demo", "the world and the stages' overrides (launchers/runtime/presets.py)",
                          choices=sorted(STAGE_PRESETS))
    seed: int = setting(0, "seed of the world and of every stage")
    data: Optional[Path] = setting(None, "run on this world (derl import, or generated before) instead "
                                         "of generating one; the preset gives the model sizes")
    nproc: int = setting(1, "ranks of each distributed stage")
    launcher: str = setting("local", "how each stage starts: derl processes, or TorchX's local_cwd",
                            choices=("local", "torchx"))
    refresh: bool = setting(False, "then run one more day: incremental upstream, a refreshed "
                                   "snapshot, the old ranker scored with it")
    coupled: bool = setting(False, "also train and score the coupled ranker (the upstream towers "
                                   "inside it) where the preset leaves it out (on the demo world, the slowest ranker "
                                   "by far)")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",), non_negative=("seed",))


@dataclass(frozen=True)
class ServeConfig:
    snapshots: Path = setting(help="snapshot root (derl export --out): the service serves its LATEST and follows it")
    ranker: Path = setting(help="a snapshot ranker run (derl train-downstream --upstream snapshot --out)")
    data: Optional[Path] = setting(None, "source folder: user profiles and the ad catalogue (default: the ranker's)")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "port to listen on")
    user_store: str = setting("embedded", "user vectors from the snapshot itself (embedded), or from "
                                          "redis://HOST:PORT[/DB], filled by `derl snapshots publish`")
    refresh_every: float = setting(5.0, "seconds between looks at LATEST (0: serve the first version only)")
    max_in_flight: int = setting(64, "requests admitted at once; more are answered 503 with Retry-After")
    max_candidates: int = setting(500, "most candidate ads one /v1/rank request may carry")
    max_k: int = setting(1000, "largest k a /v1/retrieve request may ask for")
    threads: int = setting(1, "torch and faiss threads of the one thread that runs the requests' work")

    def __post_init__(self) -> None:
        check(self, positive=("port", "max_in_flight", "max_candidates", "max_k", "threads"),
              non_negative=("refresh_every",))
        if self.port > 65535:
            raise ValueError(f"--port must be at most 65535, got {self.port}")
        if self.user_store != "embedded" and not self.user_store.startswith("redis://"):
            raise ValueError(f"--user-store must be 'embedded' or redis://HOST:PORT[/DB], got {self.user_store!r}")
