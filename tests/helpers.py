"""Helpers shared by the tests that run the `derl` command."""

from __future__ import annotations

import os
import subprocess
import sys

from derl.launchers.config import to_flags
from derl.launchers.presets import SMALL_RANKER, SMALL_UPSTREAM
from derl.launchers.settings import TrainDownstreamConfig, TrainUpstreamConfig

# The presets' small models, as flags (small enough for CPU CI, big enough to learn something).
SMALL = to_flags(TrainUpstreamConfig, SMALL_UPSTREAM)
DOWN = to_flags(TrainDownstreamConfig, SMALL_RANKER)


def derl(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "derl.launchers.cli", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"derl {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def plant_snapshot(root, version: str, cut_day: str, tables: dict, dim: int, ads=(), replace: bool = False,
                   reached=None) -> dict:
    """`write_snapshot` with the tests' defaults: a version by hand, not normalised, dot
    temperature 0.05, and the fault hook as `reached` (DERL_FAULT kills a planting process at a
    commit step)."""
    from derl.datapipes.snapshots import write_snapshot
    from derl.launchers import faults

    return write_snapshot(root, version, cut_day, tables, dim, temperature=0.05, normalised=False, ads=ads,
                          replace=replace, reached=reached or faults.reached)
