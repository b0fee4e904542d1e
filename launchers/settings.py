"""The stage configs: one frozen dataclass per stage, its fields the stage's flags.

`derl <stage> --help` is generated from these (`config.add_flags`): each field carries its help
text, and its default exists once, here, or, for a model knob, in the model config it feeds
(`default_of`). They sit together, apart from the stages that run them, so that the CLI, the
pipeline, the presets, the benchmarks and the tests can name a stage's settings without
importing the stage (no entry point imports another). A stage module reads its config only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

from derl.datapipes.batch import USER_FEATURES
from derl.datapipes.domains import DOMAINS, VECTOR_SETS
from derl.launchers.config import check, default_of, setting
from derl.models.downstream import UPSTREAM_MODES, RankerConfig
from derl.models.sharding import OptimConfig
from derl.models.upstream import UpstreamConfig


def _upstream(name: str) -> Any:
    return default_of(UpstreamConfig, name)


def _ranker(name: str) -> Any:
    return default_of(RankerConfig, name)


OVERWRITE_HELP = ("start afresh in a folder that holds an earlier run of this stage (derl removes "
                  "that run's own files; anything else there is refused)")


@dataclass(frozen=True)
class TrainUpstreamConfig:
    data: Path = setting(help="source folder (derl generate)")
    out: Path = setting(help="run folder")
    domain: str = setting("engagement", "the upstream domain", choices=sorted(DOMAINS))
    nproc: int = setting(1, "local worker processes (ranks)")
    max_steps: Optional[int] = setting(None, "stop after this many steps (default: --epochs)")
    epochs: float = setting(1.0, "passes over the domain's main table")
    resume: bool = setting(False, "continue from RUN's newest checkpoint")
    from_day: Optional[str] = setting(None, "first training day (default: the source's first)")
    until: Optional[str] = setting(None, "last training day (default: the day before the snapshot cut)")
    batch_size: int = setting(1024, "per rank")
    embedding_dim: int = setting(_upstream("embedding_dim"), "width of every table and of the entity vectors")
    seq_len: int = setting(_upstream("seq_len"), "sequence events the model reads")
    seq_layers: int = setting(_upstream("seq_layers"), "transformer layers over the user sequence")
    seq_heads: int = setting(_upstream("seq_heads"), "attention heads of the sequence transformer "
                                                     "(--embedding-dim must be a multiple)")
    seq_dropout: float = setting(_upstream("seq_dropout"), "dropout in the sequence transformer")
    tower_dims: Tuple[int, ...] = setting(_upstream("tower_dims"), "hidden widths of the user and Pin towers")
    interaction_dims: Tuple[int, ...] = setting(_upstream("interaction_dims"),
                                                "hidden widths of the interaction tower")
    user_features: Tuple[str, ...] = setting(_upstream("user_features"),
                                             "comma-separated profile features the user tower reads, of "
                                             "user_id, country, age_bucket, gender")
    contrastive: bool = setting(_upstream("contrastive"), "drop the in-batch contrastive term: BCE heads only (ablation)")
    logq_strength: float = setting(_upstream("logq_strength"),
                                   "share of the logQ correction in training: 0 leaves popularity out "
                                   "of the dot (retrieval adds it back), 1 puts it in")
    center: bool = setting(_upstream("center_entities"), "do not centre the tower outputs over the batch before "
                                 "normalising (ablation)")
    contrastive_weight: float = setting(_upstream("contrastive_weight"), "weight of the contrastive term")
    contrastive_positives: Optional[Tuple[str, ...]] = setting(
        None, "comma-separated labels whose rows are positives (default: every task but hide)")
    temperature: float = setting(_upstream("temperature"), "softmax temperature of the dot")
    next_pin_weight: float = setting(_upstream("next_pin_weight"),
                                     "weight of the next-Pin term over every prefix of the sequence "
                                     "(0: off, and the sequence encoder bidirectional)")
    next_pin_positions: int = setting(_upstream("next_pin_positions"),
                                      "at most this many of the batch's sequence prefixes in the next-Pin term")
    next_pin_negatives: int = setting(_upstream("next_pin_negatives"),
                                      "at most this many of the batch's distinct next Pins as its negatives")
    dot_rank_weight: float = setting(_upstream("dot_rank_weight"),
                                     "weight of a pairwise (AUC) loss on the user·Pin dot over the "
                                     "batch's labelled rows, per task (0: off)")
    length_buckets: int = setting(_upstream("length_buckets"),
                                  "groups of similar sequence length the transformer runs a batch in")
    bf16: bool = setting(_upstream("seq_bf16"), "keep the sequence transformer's matmuls in float32 where "
                                                "the hardware multiplies bf16")
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
        "data", "out", "nproc", "max_steps", "epochs", "resume", "overwrite", "from_day", "until",
        "checkpoint_every", "eval_every", "eval_batch_size", "memory_per_rank_gb", "length_buckets", "bf16")

    def __post_init__(self) -> None:
        check(self, positive=("nproc", "max_steps", "epochs", "batch_size", "embedding_dim", "seq_len",
                              "seq_layers", "seq_heads", "temperature", "embedding_lr", "dense_lr", "checkpoint_every",
                              "eval_batch_size", "memory_per_rank_gb", "next_pin_positions", "next_pin_negatives",
                              "length_buckets"),
              non_negative=("eval_every", "contrastive_weight", "next_pin_weight", "dot_rank_weight", "seed"),
              below_one=("seq_dropout",),
              fraction=("logq_strength",), widths=("tower_dims", "interaction_dims"),
              day=("from_day", "until"))
        if not self.user_features or set(self.user_features) - set(USER_FEATURES):
            raise ValueError(f"--user-features must name some of {','.join(USER_FEATURES)}, "
                             f"got {','.join(self.user_features)!r}")
        if self.embedding_dim % self.seq_heads:
            raise ValueError(f"--embedding-dim must be a multiple of --seq-heads {self.seq_heads}, "
                             f"got {self.embedding_dim}")
        if self.from_day and self.until and self.from_day > self.until:
            raise ValueError(f"--from-day {self.from_day} is after --until {self.until}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one")

    def model_config(self, vocab: Dict[str, int]) -> UpstreamConfig:
        extra = {"contrastive_positives": self.contrastive_positives} if self.contrastive_positives else {}
        return UpstreamConfig.for_domain(
            self.domain, vocab, embedding_dim=self.embedding_dim, seq_len=self.seq_len,
            seq_layers=self.seq_layers, seq_heads=self.seq_heads, seq_dropout=self.seq_dropout,
            user_features=self.user_features, tower_dims=self.tower_dims,
            interaction_dims=self.interaction_dims, contrastive=self.contrastive,
            contrastive_weight=self.contrastive_weight, logq_strength=self.logq_strength,
            center_entities=self.center, temperature=self.temperature, next_pin_weight=self.next_pin_weight,
            next_pin_positions=self.next_pin_positions, next_pin_negatives=self.next_pin_negatives,
            dot_rank_weight=self.dot_rank_weight, length_buckets=self.length_buckets,
            seq_bf16=self.bf16, **extra)


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
class TrainDownstreamConfig:
    data: Path = setting(help="source folder (derl generate)")
    out: Path = setting(help="run folder")
    upstream: str = setting("snapshot", "where the upstream vectors come from (none: the baseline)",
                            choices=UPSTREAM_MODES)
    snapshots: Optional[Path] = setting(None, "snapshot root (derl export --out)")
    vectors: str = setting("all", "which upstream vectors: engagement user; + its Pin; all four",
                           choices=sorted(VECTOR_SETS))
    snapshot_version: Optional[str] = setting(
        None, "join every row with this version instead of the one live on its day")
    projection_dim: Optional[int] = setting(None, "project the upstream vectors to this width")
    interaction: str = setting(_ranker("interaction"), "feature interaction: DCN-v2 or DLRM's dot",
                               choices=("dcn", "dot"))
    embedding_dim: int = setting(_ranker("embedding_dim"), "width of the ranker's id tables")
    dense_arch: Tuple[int, ...] = setting(_ranker("dense_arch"), "hidden widths of the dense arch")
    over_arch: Tuple[int, ...] = setting(_ranker("over_arch"), "hidden widths of each head")
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
        check(self, positive=("nproc", "epochs", "max_steps", "batch_size", "embedding_dim", "embedding_lr",
                              "dense_lr", "ne_window", "projection_dim"),
              non_negative=("checkpoint_every", "seed"), widths=("over_arch",),
              day=("from_day", "until", "eval_day"))
        if any(w <= 0 for w in self.dense_arch):
            raise ValueError(f"--dense-arch must be positive widths, got {','.join(map(str, self.dense_arch))!r}")
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
    preset: str = setting("demo", "the world and the stages' overrides (launchers/presets.py)",
                          choices=("demo", "tiny"))
    seed: int = setting(0, "seed of the world and of every stage")
    data: Optional[Path] = setting(None, "run on this world (derl import, or generated before) instead "
                                         "of generating one; the preset gives the model sizes")
    nproc: int = setting(1, "ranks of each distributed stage")
    launcher: str = setting("local", "how each stage starts: derl processes, or TorchX's local_cwd",
                            choices=("local", "torchx"))
    refresh: bool = setting(False, "then run one more day: incremental upstream, a refreshed "
                                   "snapshot, the old ranker scored with it")
    coupled: bool = setting(False, "also train and score the coupled ranker (the upstream towers "
                                   "inside it) where the preset leaves it out (on the demo world, the slowest ranker by far)")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",), non_negative=("seed",))
