"""Training checkpoints through torch.distributed.checkpoint: sharded, resumable, all-or-nothing.

A checkpoint is a folder `step-000123/` holding the DCP shards of the model and both optimizers
(every rank writes its own shards), `train_state.json` (step, the data position of every rank
and whatever the trainer adds) and `rng-<rank>.pt` (each rank's RNG states, so dropout after a
resume draws what it would have drawn). It is written as `.step-000123.tmp` and renamed when
every rank is done: `latest()` never returns a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.optim import Optimizer

T = TypeVar("T")
_NAME = re.compile(r"^step-(\d+)$")


def config_from_json(cls: Type[T], saved: Mapping[str, Any]) -> T:
    """A model config dataclass back from `dataclasses.asdict` via JSON (a run's config.json):
    the lists JSON made of its tuple fields become tuples again."""
    tuples = {f.name for f in dataclasses.fields(cls) if "Tuple" in str(f.type)}
    return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in saved.items()})


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("step-*") if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def _rng_state() -> Dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, model: nn.Module, optimizer: Optimizer,
         train_state: Dict[str, Any]) -> Path:
    """Collective: every rank calls it. `train_state` must be the same on every rank."""
    root = Path(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps({"step": step, **train_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    dist.barrier()
    return final


def train_state(path: Path) -> Dict[str, Any]:
    """A checkpoint's train state (step and what the trainer added), without loading it."""
    path = Path(path)
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no train_state.json)")
    return json.loads((path / "train_state.json").read_text())


def load(path: Path, model: nn.Module, optimizer: Optimizer) -> Dict[str, Any]:
    """Collective: restore model, optimizers and this rank's RNG; return the train state."""
    path = Path(path)
    saved = train_state(path)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    rng = path / f"rng-{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming with another world size
        _set_rng_state(torch.load(rng, weights_only=False))
    return saved
