"""The run folder: what a training stage leaves behind, and the one place that reads it.

    RUN/config.json        what rebuilds the model: {"model": <model config>, days, data, ...}
    RUN/metrics.json       the run's results (`HEADLINE_METRICS` travel on into snapshot
                           manifests and pipeline reports)
    RUN/checkpoints/step-*/  DCP checkpoints (models/checkpoint.py)
    RUN/predictions/part-*.parquet  a ranker's scored evaluation rows, one part per rank
    RUN/train_ne.json      a ranker's training NE over steps; RUN/loss_history.json, RUN/tb/
                           an upstream run's losses

Every stage that reads another stage's run (export reads upstream runs, score and evaluate
read ranker runs, the pipeline reads both) goes through here, so no entry point imports
another. docs/runs.md describes the contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derl.models import checkpoint
from derl.models.downstream import RankerConfig
from derl.models.upstream import UpstreamConfig

CONFIG = "config.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
PREDICTIONS = "predictions"
TRAIN_NE = "train_ne.json"  # a ranker's windowed training NE per step, for the NE-over-steps plot
# Upstream metrics that travel with the vectors: into the snapshot manifest and the pipeline report.
HEADLINE_METRICS = ("recall@", "popularity_recall@", "dot_auc_")


def write_json(path: Path, obj: Any) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=list))
    tmp.rename(path)


def read_config(run: Path) -> Dict[str, Any]:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no {CONFIG})")
    return json.loads(path.read_text())


def read_metrics(run: Path) -> Dict[str, Any]:
    path = Path(run) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished run (no {METRICS})")
    return json.loads(path.read_text())


def upstream_model_config(run: Path) -> UpstreamConfig:
    """The model config an upstream run was trained with, to rebuild its model."""
    return checkpoint.config_from_json(UpstreamConfig, read_config(run)["model"])


def ranker_model_config(run: Path) -> RankerConfig:
    return checkpoint.config_from_json(RankerConfig, read_config(run)["model"])


def latest_checkpoint(run: Path) -> Optional[Path]:
    return checkpoint.latest(Path(run) / CHECKPOINTS)


def headline(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The upstream metrics that travel on (`HEADLINE_METRICS`)."""
    return {k: v for k, v in metrics.items() if k.startswith(HEADLINE_METRICS)}


def write_predictions(run: Path, rank: int, rows: Dict[str, np.ndarray]) -> None:
    """This rank's part of RUN/predictions, written beside and renamed."""
    folder = Path(run) / PREDICTIONS
    folder.mkdir(parents=True, exist_ok=True)
    table = {k: pa.array(v) for k, v in rows.items() if k != "missing"}
    if "missing" in rows:
        m = rows["missing"].astype(np.int8)
        table["missing"] = pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), m.shape[1])
    tmp = folder / f".part-{rank:05d}.tmp"
    pq.write_table(pa.table(table), tmp)
    tmp.rename(folder / f"part-{rank:05d}.parquet")


def read_predictions(run: Path) -> Dict[str, np.ndarray]:
    """Every rank's scored rows of a ranker run, as columns."""
    folder = Path(run) / PREDICTIONS
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder}: no predictions")
    t = pa.concat_tables([pq.read_table(p) for p in parts])
    out = {c: t.column(c).to_numpy() for c in t.column_names if c != "missing"}
    if "missing" in t.column_names:
        m = t.column("missing").combine_chunks()
        out["missing"] = m.values.to_numpy().reshape(len(m), -1)
    return out
