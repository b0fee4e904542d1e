"""`derl export`: upstream checkpoints -> a versioned embedding snapshot (DESIGN.md stage 3).

    derl export --data WORLD --upstream engagement=RUN_E --upstream conversion=RUN_C \
                --out SNAPSHOTS [--cut DAY] [--nproc N]

Every rank embeds its own share of users (their sequences as of the cut) and Pins with each
domain's model, without gradients, and streams its vectors into its own Parquet parts: no table
is ever gathered on one rank. Rank 0 then builds each domain's faiss index over the ad Pins,
writes the manifest (sha256 of every file, rows, data window, checkpoints, throughput, the
upstream runs' metrics) and renames the temporary folder into place; LATEST is written last.
A run that dies half-way leaves only a hidden `.VERSION.tmp-*` folder and the old LATEST.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from derl.datapipes.features import FeatureJoiner
from derl.datapipes.sequences import sequences_as_of
from derl.datapipes.snapshots import LATEST, MANIFEST, Snapshot, SnapshotError, embedding_schema, sha256
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.launchers import dist as derl_dist
from derl.launchers.embedding import rank_chunks
from derl.launchers.refresh import refresh_domain
from derl.launchers.train_upstream import load_model_config
from derl.models import checkpoint
from derl.models.sharding import OptimConfig, shard_model
from derl.models.upstream import DERM

# Fault injection for the tests: the last rank dies after writing its parts.
_FAULT = os.environ.get("DERL_EXPORT_FAULT") == "1"
FLAT_INDEX_MAX = 200_000  # ad catalogues above this get an HNSW index instead of exact search


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="source folder")
    p.add_argument("--upstream", action="append", required=True, metavar="DOMAIN=RUN",
                   help="an upstream run per domain (repeat for engagement and conversion)")
    p.add_argument("--out", type=Path, required=True, help="snapshot root")
    p.add_argument("--cut", help="snapshot day: vectors as of its start (default: the split's cut)")
    p.add_argument("--version", help="version name (default: the cut day)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--previous", help="refresh: smooth with this version ('latest': LATEST)")
    p.add_argument("--weight", type=float, default=0.8, help="refresh: w in w*E(t-1) + (1-w)*E(t)")
    p.add_argument("--no-align", action="store_true", help="refresh: average without Procrustes")


def _runs(args: argparse.Namespace) -> Dict[str, Path]:
    runs = {}
    for spec in args.upstream:
        domain, sep, run = spec.partition("=")
        if not sep:
            raise ValueError(f"--upstream {spec!r}: expected DOMAIN=RUN")
        if checkpoint.latest(Path(run) / "checkpoints") is None:
            raise FileNotFoundError(f"--upstream {spec}: no checkpoint under {run}/checkpoints")
        runs[domain] = Path(run)
    return runs


def validate(args: argparse.Namespace) -> None:
    _runs(args)
    version = args.version or args.cut
    if version and (args.out / version / MANIFEST).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / version}: version exists; pass --overwrite to replace it")


def _entities(sources: SourceTables, cut: str):
    """Users signed up and Pins created before the cut, and which Pins are ads."""
    day = pc.strptime(cut, "%Y-%m-%d", "s").cast("date32")
    users = sources.read("users", columns=["user_id", "signup_ds"])
    users = pc.filter(users.column("user_id"), pc.less(users.column("signup_ds"), day)).to_numpy()
    pins = sources.read("pins", columns=["pin_id", "created_ds", "is_ad"])
    live = pc.less(pins.column("created_ds"), day)
    return np.sort(users), pc.filter(pins.column("pin_id"), live).to_numpy(), \
        pc.filter(pins.column("pin_id"), pc.and_(live, pins.column("is_ad"))).to_numpy()


@torch.no_grad()
def _write_part(path: Path, chunks, embed, make_batch, device, dim: int) -> int:
    """Embed this rank's chunks and stream them into one Parquet part; returns rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with pq.ParquetWriter(path, embedding_schema(dim)) as writer:
        for ids, real in chunks:
            vectors = embed(make_batch(ids).to(device))[:real].float().cpu().numpy()
            writer.write_table(pa.table({
                "entity_id": pa.array(ids[:real]),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            }, schema=embedding_schema(dim)))
            rows += real
    return rows


def _ads_index(folder: Path, ad_ids: np.ndarray, dim: int, version: str) -> Dict[str, object]:
    """faiss inner-product index over the ad Pins' vectors (exact while small, HNSW above)."""
    import faiss

    t = pa.concat_tables([pq.read_table(p) for p in sorted((folder / "pins").glob("part-*.parquet"))])
    ids = t.column("entity_id").to_numpy()
    keep = np.isin(ids, ad_ids)
    emb = t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    vectors, ids = np.ascontiguousarray(emb[keep], dtype=np.float32), ids[keep]
    if len(ids) <= FLAT_INDEX_MAX:
        index, kind = faiss.IndexFlatIP(dim), "flat_ip"
    else:
        index, kind = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT), "hnsw32_ip"
        index.hnsw.efSearch = 128
    index.add(vectors)
    faiss.write_index(index, str(folder / "ads.faiss"))
    ids_table = pa.table({"pin_id": pa.array(ids)}).replace_schema_metadata({"snapshot_version": version})
    pq.write_table(ids_table, folder / "ads_ids.parquet")
    return {"kind": kind, "size": len(ids)}


def export(args: argparse.Namespace) -> Optional[dict]:
    worker = derl_dist.init()
    try:
        return _export(args, worker)
    finally:
        derl_dist.shutdown()


def _export(args: argparse.Namespace, worker: derl_dist.Worker) -> Optional[dict]:
    t0 = time.perf_counter()
    runs = _runs(args)
    sources = SourceTables(args.data)
    cut = args.cut or default_split(sources.days("engagements")).cut_day
    version = args.version or cut
    tmp = args.out / f".{version}.tmp-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    if worker.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    users, pins, ads = _entities(sources, cut)
    configs = {d: load_model_config(r) for d, r in runs.items()}
    dims = {c.embedding_dim for c in configs.values()}
    if len(dims) != 1:
        raise ValueError(f"upstream runs disagree on the embedding dimension: {dims}")
    dim = dims.pop()
    user_chunks = rank_chunks(users, worker.rank, worker.world_size, args.batch_size)
    pin_chunks = rank_chunks(pins, worker.rank, worker.world_size, args.batch_size)
    my_users = np.unique(np.concatenate([ids for ids, _ in user_chunks]))
    joiner = FeatureJoiner(sources)
    seq_len = max(c.seq_len for c in configs.values())
    joiner.set_sequences(cut, sequences_as_of(sources, cut, seq_len, my_users))

    previous = None
    if args.previous:
        previous = Snapshot(args.out, None if args.previous == "latest" else args.previous)
    domains: Dict[str, dict] = {}
    for domain, run in runs.items():
        model = DERM(configs[domain], table_device=torch.device("meta"))
        dmp, optimizer, _ = shard_model(model, worker.device, OptimConfig())
        ckpt = checkpoint.latest(run / "checkpoints")
        checkpoint.load(ckpt, dmp, optimizer)
        dmp.eval()
        part = f"part-{worker.rank:05d}.parquet"
        start = time.perf_counter()
        n_users = _write_part(tmp / domain / "users" / part, user_chunks,
                              lambda b: dmp.module.embed_users(b.sparse, b.dense["seq_content"]),
                              lambda u: joiner.user_batch(u, cut), worker.device, dim)
        n_pins = _write_part(tmp / domain / "pins" / part, pin_chunks,
                             lambda b: dmp.module.embed_pins(b.sparse, b.dense["content_emb"]),
                             joiner.pin_batch, worker.device, dim)
        counts = torch.tensor([n_users, n_pins], dtype=torch.long)
        dist.all_reduce(counts)
        seconds = time.perf_counter() - start
        metrics_file = run / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        domains[domain] = {
            "run": str(run),
            "checkpoint": str(ckpt),
            "train_days": json.loads((run / "config.json").read_text())["days"],
            "rows": {"users": int(counts[0]), "pins": int(counts[1])},
            "entities_per_s": float(counts.sum()) / seconds,
            "upstream_metrics": {k: v for k, v in metrics.items() if k.startswith(("recall@", "popularity_recall@"))},
        }
        if previous is not None:
            domains[domain]["refresh"] = refresh_domain(
                tmp / domain, previous, domain, worker.rank, args.weight, not args.no_align)
    if _FAULT and worker.rank == worker.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dies after writing its parts
    dist.barrier()
    if not worker.is_main:
        return None

    for domain, info in domains.items():
        info["ads_index"] = _ads_index(tmp / domain, ads, dim, version)
        info["rows"]["ads"] = info["ads_index"]["size"]
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cut_day": cut,
        "data": str(args.data),
        "dim": dim,
        "normalised": True,
        "domains": domains,
        "world_size": worker.world_size,
        "wall_s": round(time.perf_counter() - t0, 2),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    final = args.out / version
    if final.exists():
        if not args.overwrite:
            raise SnapshotError(f"{final}: version exists; pass --overwrite to replace it")
        shutil.rmtree(final)
    tmp.rename(final)
    latest = args.out / f".{LATEST}.tmp"
    latest.write_text(version + "\n")
    latest.rename(args.out / LATEST)
    print(f"snapshot {version}: " + ", ".join(
        f"{d} {i['rows']['users']:,} users, {i['rows']['pins']:,} pins, {i['rows']['ads']:,} ads "
        f"({i['entities_per_s']:,.0f} entities/s)" for d, i in domains.items()) + f" -> {final}")
    return manifest


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m` / `torchrun -m` entry: the same as `derl export`."""
    from derl.launchers import cli

    cli.main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
