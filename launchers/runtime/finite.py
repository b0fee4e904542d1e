"""A run whose numbers turn non-finite stops with an error instead of shipping them.

The training loops check their losses every step (collectively, so that every rank stops at
the same step and none waits for the others in a collective), and the scoring checks its
predictions before anything is written; the export checks its vectors (datapipes/snapshots).
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist


class NonFiniteError(ValueError):
    """A loss, prediction or vector that is NaN or infinite."""


def check_losses(step: int, losses: Dict[str, float], device: torch.device) -> None:
    """Collective: raise on every rank when any rank's loss is not finite at `step`."""
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    flag = torch.tensor([float(bool(bad))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    if flag.item():
        raise NonFiniteError(f"step {step}: the loss is not finite ({', '.join(bad) or 'on another rank'}); "
                             f"the run stops here, and its last checkpoint is its last good state")


def require_finite(name: str, values: np.ndarray, device: torch.device) -> None:
    """Collective: raise on every rank when any rank's `values` hold a NaN or an infinity."""
    counts = torch.tensor([int(np.count_nonzero(~np.isfinite(values))), int(np.size(values))], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    bad, total = (int(c) for c in counts)
    if bad:
        raise NonFiniteError(f"{name}: {bad:,} of {total:,} values are not finite")
