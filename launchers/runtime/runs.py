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

Provenance: config.json records the `world` (`datapipes.world.world_id`) a run came from, and a
stage that takes another's output checks it (`require_world`) before any work: a run, snapshot or
ranker of another world is refused naming both.

One run per folder: config.json's `kind` is derl's mark on a run folder and its `settings` are
the stage config that made it. A stage writes only into a new or empty folder, or into one that
holds a run of its own kind: resumed (`--resume`, the same settings but for the stage's
`RUN_CONTROL`, else refused with the differences named) or replaced (`--overwrite`, which removes
that run's own files and refuses a folder that holds anything else). Nothing of an earlier run
is ever read into a new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Collection, Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derl.datapipes.world import read_world_id
from derl.launchers.runtime.config import flag_name, to_json
from derl.models import checkpoint
from derl.models.downstream import RankerConfig
from derl.models.upstream import UpstreamConfig

CONFIG = "config.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
PREDICTIONS = "predictions"
TRAIN_NE = "train_ne.json"  # a ranker's windowed training NE per step, for the NE-over-steps plot
LOSS_HISTORY = "loss_history.json"
TENSORBOARD = "tb"
# Everything derl writes into a run folder; config.json, the mark, goes last when a run is replaced.
OWN_FILES = (CHECKPOINTS, PREDICTIONS, METRICS, TRAIN_NE, LOSS_HISTORY, TENSORBOARD, CONFIG)
# The kinds of run folder (config.json's `kind`).
UPSTREAM, RANKER, SCORES = "upstream", "ranker", "scores"
WRITTEN_BY = {UPSTREAM: "derl train-upstream", RANKER: "derl train-downstream", SCORES: "derl score"}
# Settings a run recorded under another name before its flag took the model field's: an older
# run still resumes.
RENAMED_SETTINGS = {"center": "center_entities", "bf16": "seq_bf16"}
# Upstream metrics that travel with the vectors: into the snapshot manifest and the pipeline report.
HEADLINE_METRICS = ("recall@", "popularity_recall@", "dot_auc_")


def write_json(path: Path, obj: Any) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=list))
    tmp.rename(path)


def claim(cfg: Any, kind: str, resume: bool = False) -> None:
    """May `cfg.out` take this run? Read-only: every rank may call it, before any work."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            raise FileNotFoundError(f"--resume: {out} holds no run to continue")
        return
    if not (out / CONFIG).is_file():
        raise FileExistsError(f"--out {out}: holds files but no derl run ({CONFIG}); derl writes a "
                              f"run only into a new or empty folder, or over a run of its own")
    old = read_config(out)
    if old.get("kind") != kind:
        raise FileExistsError(f"--out {out}: holds a {old.get('kind', 'older derl')} run, not a {kind} run")
    if resume:
        _same_settings(cfg, old, out)
        require_world(f"--resume: {out}", old.get("world"), old.get("data"), cfg.data)
        return
    if not getattr(cfg, "overwrite", False):
        raise FileExistsError(f"--out {out}: holds an earlier {kind} run; pass --resume to continue "
                              f"it or --overwrite to start afresh")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    if foreign:
        raise FileExistsError(f"--overwrite: {out} also holds {', '.join(foreign[:5])}, which derl did "
                              f"not write; move them away first")


def _same_settings(cfg: Any, old: Dict[str, Any], out: Path) -> None:
    """--resume: the settings that shape the run must be the earlier run's."""
    if "settings" not in old:
        raise ValueError(f"--resume: {out} was written by an older derl without its settings; "
                         f"start afresh with --overwrite")
    may_change: Collection[str] = getattr(type(cfg), "RUN_CONTROL", ())
    then = {RENAMED_SETTINGS.get(k, k): v for k, v in old["settings"].items()}
    changed = [f"{flag_name(type(cfg), k)} {then.get(k)!r} then, {v!r} now"
               for k, v in to_json(cfg).items() if k not in may_change and then.get(k) != v]
    if changed:
        raise ValueError(f"--resume: {out} was trained with other settings ({'; '.join(changed)}); "
                         f"resume with the same ones, or start afresh with --overwrite")


def start(cfg: Any, kind: str, record: Dict[str, Any]) -> None:
    """Rank 0, after `claim`: clear an earlier run when replacing it, then write config.json
    (`kind`, `settings` and the stage's `record`)."""
    out = Path(cfg.out)
    if getattr(cfg, "overwrite", False) and out.is_dir():
        for name in OWN_FILES:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG, {"kind": kind, "settings": to_json(cfg), **record})


def require_world(what: str, world: Optional[str], origin: Optional[str], data: Path,
                  flag: str = "--data") -> None:
    """Refuse a hand-over across worlds: `what` came from world `world` (read from `origin`),
    and this stage works on `data`. Unchecked where either world is unidentified (`read_world_id`)."""
    here = read_world_id(data)
    if world and here and world != here:
        raise ValueError(f"{what} comes from world {world} ({origin}), but {flag} {data} is world {here}; "
                         f"runs, snapshots and rankers hand over only within one world")


def kind_of(run: Path, kind: str, what: str) -> Dict[str, Any]:
    """The config of a run that must be of `kind` (`what`: the flag that named it); any other
    is refused, naming what it is."""
    config = read_config(run)
    found = config.get("kind")
    if found != kind:
        raise ValueError(f"{what}: a run of {WRITTEN_BY.get(found, 'an older derl')} ({CONFIG} kind "
                         f"{found!r}), not of {WRITTEN_BY[kind]}")
    return config


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


def checkpoint_days(run: Path, ckpt: Path) -> Tuple[str, str]:
    """The days an upstream checkpoint trained on: its own train state's, which a resumed run
    writes with every checkpoint while its config.json takes the new days only once it has
    finished; config.json's for a checkpoint without them."""
    return tuple(checkpoint.train_state(ckpt).get("days") or read_config(run)["days"])


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
