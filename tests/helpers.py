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


def plant_snapshot(root, version: str, cut_day: str, tables: dict, dim: int) -> None:
    """Write a complete, verifiable snapshot version by hand: `tables` maps "domain/entity" to
    (ids, [n, dim] vectors). Every domain gets an (empty) ad index. LATEST names it."""
    import json
    from pathlib import Path

    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from derl.datapipes.snapshots import embedding_schema, sha256

    folder = Path(root) / version
    domains: dict = {}
    for key, (ids, vectors) in tables.items():
        domain, entity = key.split("/")
        (folder / domain / entity).mkdir(parents=True, exist_ok=True)
        vectors = np.asarray(vectors, dtype=np.float32)
        pq.write_table(pa.table({
            "entity_id": pa.array(np.asarray(ids, dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }, schema=embedding_schema(dim)), folder / domain / entity / "part-00000.parquet")
        domains.setdefault(domain, {"rows": {"users": 0, "pins": 0, "ads": 0},
                                    "dot": {"temperature": 0.05}})["rows"][entity] = len(ids)
    for domain in domains:
        faiss.write_index(faiss.IndexFlatIP(dim), str(folder / domain / "ads.faiss"))
        ids = pa.table({"pin_id": pa.array([], pa.int64())}).replace_schema_metadata({"snapshot_version": version})
        pq.write_table(ids, folder / domain / "ads_ids.parquet")
    files = {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "manifest.json").write_text(json.dumps(
        {"version": version, "cut_day": cut_day, "dim": dim, "normalised": False,
         "domains": domains, "files": files}))
    (Path(root) / "LATEST").write_text(version + "\n")
