"""`derl` in the seqrec suite: derl's own upstream, trained and exported by the derl commands.

The split's sequences are written as a seq-lines file and imported (`derl import seq-lines`),
whose synthesized days put every user's test item on the last day and the validation item on
the day before, the earlier items on the days before those (docs/importing.md). Then:

- `derl train-upstream --until <day of the training items>` trains the engagement domain's DERM
  (user tower with its sequence transformer, Pin tower, interaction tower, contrastive term) on
  the training items only;
- `derl export --cut <validation day>` and `--cut <test day>` write the user vectors as of each
  day (their history: the training items, then also the validation item) and every item's
  vector, as a snapshot does for the rankers;
- scores are what the snapshot's retrieval ranks by: user·item / temperature + the model's
  retrieval prior (weight x log of the item's share of the training interactions), over every
  item, evaluated by `train.evaluate` like every other model.

Training runs in chunks of `--derl-eval-every` epochs (each `derl train-upstream --resume`s
the last), scored after each; the result is the chunk best on validation, as the other models
keep their best state (early stopping after `--derl-patience` chunks, at most `--derl-epochs`).

derl's windows hold the last 32 events before a day (`UpstreamConfig.seq_len`) as context, not
the protocol's 50.
Settings: the presets' small model unless `--derl-model default`, with
`SEQREC_UPSTREAM` on top, and any other `derl train-upstream` flags in `--derl-args "..."`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from derl.benchmarks.studies.seqrec.data import Split
from derl.datapipes.snapshots import Snapshot
from derl.datapipes.snapshots.parts import part_paths, read_parts
from derl.datapipes.sources import SourceTables
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import to_flags
from derl.launchers.runtime.presets import SMALL_UPSTREAM
from derl.launchers.runtime.processes import run_derl
from derl.launchers.runtime.settings import TrainUpstreamConfig


# What the seqrec protocol asks of the upstream beyond a preset (docs/seqrec.md, "derl"):
# no user-id embedding (with one per user, the user vector learns each user's training items
# by heart and test NDCG@10 falls after a few epochs); float32 matmuls (bf16 is slower at d 16).
SEQREC_UPSTREAM = {"user_features": ("country", "age_bucket", "gender"), "seq_bf16": False}


class SnapshotScores(nn.Module):
    """Per stage, every user's vector from the snapshot cut for it; every item's vector; the
    retrieval prior. `score_users(users, stage)` is what `train.evaluate` asks of it."""

    def __init__(self, users: Dict[str, torch.Tensor], items: torch.Tensor, prior: torch.Tensor,
                 temperature: float) -> None:
        super().__init__()
        self.users, self.temperature = users, temperature
        self.register_buffer("items", items)
        self.register_buffer("prior", prior)

    def score_users(self, users: torch.Tensor, stage: str) -> torch.Tensor:
        return self.users[stage][users].to(self.items) @ self.items.T / self.temperature + self.prior


def _write_seq_lines(split: Split, path: Path) -> None:
    """The split's users (source id = their index in the split) and items, one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for u, items in enumerate(split.seqs.to_lists()):
            f.write(f"{u} {' '.join(map(str, items))}\n")


def _vectors(snap: Snapshot, world: SourceTables, entity: str, source: str, size: int) -> torch.Tensor:
    """[size, dim] vectors of the snapshot's `entity` rows, indexed by their source id (zero
    where the snapshot has none: a user or item it left out)."""
    ids, vectors = read_parts(part_paths(snap.path / "engagement" / entity), snap.dim)
    table = world.read(entity, columns=[f"{entity[:-1]}_id" if entity == "users" else "pin_id", source])
    world_ids, source_ids = (table.column(i).to_numpy() for i in range(2))
    order = np.argsort(world_ids)
    src = source_ids[order][np.searchsorted(world_ids[order], ids)]
    out = torch.zeros(size, snap.dim)
    out[torch.from_numpy(src.astype(np.int64))] = torch.tensor(vectors, dtype=torch.float32)
    return out


def _train_chunk(world: Path, run: Path, overrides: Dict[str, object], epochs: int, derl_args: str,
                 fresh: bool) -> float:
    """`derl train-upstream` up to `epochs` (a fresh run, or resumed from its last checkpoint:
    the learning rates are constant, so chunks add up to one run); its seconds."""
    resume = not fresh and runs.latest_checkpoint(run) is not None
    flags = {"data": world, "out": run, **overrides, "epochs": epochs,
             "resume": resume, "overwrite": not resume and (run / runs.CONFIG).exists()}
    t0 = time.perf_counter()
    run_derl(["train-upstream", *to_flags(TrainUpstreamConfig, flags), *derl_args.split()], own_group=False)
    return time.perf_counter() - t0


def _score_snapshots(split: Split, settings, world: Path, run: Path, snaps: Path, days: List[str],
                     desc: str, progress: bool) -> Dict[str, object]:
    """Export the user vectors as of the validation and the test day and every item's vector,
    and score them as `train.evaluate` scores every model: {"val": metrics, "test": metrics}."""
    from derl.benchmarks.studies.seqrec import train

    val_day, test_day = days[-2], days[-1]
    for day in (val_day, test_day):
        run_derl(["export", "--data", world, "--out", snaps, "--cut", day, "--version", day,
                  "--upstream", f"engagement={run}", "--overwrite"], own_group=False)
    world_tables = SourceTables(world)
    val, test = Snapshot(snaps, val_day), Snapshot(snaps, test_day)
    users = {stage: _vectors(snap, world_tables, "users", "source_user_id", split.n_users)
             for stage, snap in (("val", val), ("test", test))}
    items = _vectors(test, world_tables, "pins", "source_item_id", split.n_items + 1)
    dot = test.manifest["domains"]["engagement"]["dot"]
    counts = split.train_counts().double()
    prior = (dot["retrieval_prior_weight"] * torch.log(counts.clamp(min=0.5) / counts.sum())).float()
    scorer = SnapshotScores(users, items, prior, dot["temperature"])
    return train.fit(scorer, split, settings, None, trainable=False, desc=desc, progress=progress)


def fit(model: nn.Module, split: Split, settings, state_path: Optional[Path] = None,
        trainable: bool = True, desc: str = "", progress: bool = True) -> Dict[str, object]:
    """Train in chunks of `derl_eval_every` epochs, export and score after each, stop after
    `derl_patience` chunks without a better validation NDCG@10 or at `derl_epochs`; the result
    is the best chunk's, as `train.fit` keeps the best state of the other models. Each chunk's
    scores go to WORK/progress.json: a rerun with the same settings resumes after the last one."""
    from derl.benchmarks.studies.seqrec.train import SELECT

    if settings.derl_days < 4:
        raise ValueError(f"--derl-days must be at least 4 (training days, then the validation and the test "
                         f"day; derl train-upstream's time split needs 4), got {settings.derl_days}")
    work = Path(state_path).parent / f"{Path(state_path).stem}-work"
    world, run, snaps, log = work / "world", work / "upstream", work / "snapshots", work / "progress.json"
    shape = {"data": [split.n_users, split.n_items, int(split.train_len.sum())],
             **{k: getattr(settings, k) for k in ("seed", "derl_model", "derl_args", "derl_eval_every", "derl_days")}}
    state = json.loads(log.read_text()) if log.is_file() else {}
    fresh = state.get("shape") != shape
    if fresh:
        state = {"shape": shape, "points": [], "train_s": 0.0}
        _write_seq_lines(split, work / "sequences.txt")
        run_derl(["import", "seq-lines", "--input", work / "sequences.txt", "--out", world,
                  "--days", settings.derl_days, "--overwrite"], own_group=False)
    days = SourceTables(world).days("engagements")
    overrides = {**(SMALL_UPSTREAM if settings.derl_model == "small" else {}), **SEQREC_UPSTREAM,
                 "seed": settings.seed, "until": days[-3]}
    every, last = settings.derl_eval_every, settings.derl_epochs
    points: List[Dict[str, object]] = state["points"]
    for epochs in [*range(every, last, every), last]:
        best = max(points, key=lambda p: p["val"][SELECT], default=None)
        if best is not None and sum(p["epoch"] > best["epoch"] for p in points) >= settings.derl_patience:
            break
        if any(p["epoch"] == epochs for p in points):
            continue
        state["train_s"] += _train_chunk(world, run, overrides, epochs, settings.derl_args, fresh)
        fresh = False
        scores = _score_snapshots(split, settings, world, run, snaps, days, desc, progress)
        metrics = json.loads((run / "metrics.json").read_text())
        points.append({"epoch": epochs, "val": scores["val"], "test": scores["test"],
                       # next-Pin targets a second: the positions the other models count
                       "train_examples_per_s": metrics["train_positions_per_s"],
                       "upstream_recall_at_50_val_day": metrics["recall@50"]})
        log.with_suffix(".tmp").write_text(json.dumps(state, indent=1))
        os.replace(log.with_suffix(".tmp"), log)  # after each chunk: a kill loses at most one
        print(f"derl {desc}: epoch {epochs}, validation {SELECT} {scores['val'][SELECT]:.4f}", flush=True)
    best = max(points, key=lambda p: p["val"][SELECT])
    trained = points[-1]["epoch"]
    return {"device": "cpu", "threads": settings.threads, "params": 0, "settings": asdict(settings),
            "test": best["test"], "val": best["val"], "train_s": round(state["train_s"], 1),
            "s_per_epoch": round(state["train_s"] / trained, 2),
            "train_examples_per_s": best["train_examples_per_s"], "epochs": trained,
            "best_epoch": best["epoch"],
            "stopped": "max epochs" if trained == last else f"patience ({settings.derl_patience} evaluations)",
            "curve": [{"epoch": p["epoch"], "val_" + SELECT: p["val"][SELECT]} for p in points],
            "upstream_run": str(run), "upstream_recall_at_50_val_day": best["upstream_recall_at_50_val_day"]}


def build(split: Split, settings) -> nn.Module:
    return nn.Identity()  # the model is trained and scored by `fit`, through the derl commands
