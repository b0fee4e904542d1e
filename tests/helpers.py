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
    """Write a complete, verifiable snapshot version by hand: `tables` maps "domain/entity" to
    (ids, [n, dim] vectors). Every domain gets an ad index over the `ads` among its Pins (empty
    by default). LATEST names it. `replace` and `reached` go to the commit (`reached` defaults
    to the fault hook, so that DERL_FAULT kills a planting process at a commit step)."""
    import numpy as np

    from derl.datapipes.snapshots import SnapshotWriter, write_part
    from derl.launchers import faults

    writer = SnapshotWriter(root, version, dim).prepare()
    domains: dict = {}
    for key, (ids, vectors) in tables.items():
        domain, entity = key.split("/")
        write_part(writer.part(domain, entity, 0), ids, vectors)
        domains.setdefault(domain, {"rows": {"users": 0, "pins": 0, "ads": 0},
                                    "dot": {"temperature": 0.05}})["rows"][entity] = len(ids)
    for domain, info in domains.items():
        info["rows"]["ads"] = writer.ads_index(domain, np.sort(np.asarray(ads, np.int64)))["size"]
    return writer.commit({"cut_day": cut_day, "dim": dim, "normalised": False, "domains": domains},
                         replace=replace, reached=reached or faults.reached)
