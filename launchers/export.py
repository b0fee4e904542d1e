"""`derl export`: upstream checkpoints -> a versioned embedding snapshot (DESIGN.md stage 3).

    derl export --data WORLD --upstream engagement=RUN_E --upstream conversion=RUN_C \
                --out SNAPSHOTS [--cut DAY] [--nproc N] [--retention-days 90]

Every rank embeds its own share of users (their sequences as of the cut) and Pins with each
domain's model, without gradients, and streams its vectors into its own Parquet parts: no table
is ever gathered on one rank. Rank 0 then builds each domain's faiss index over the ad Pins,
writes the manifest (sha256 of every file, rows, data window, checkpoints, throughput, the
upstream runs' metrics) and renames the temporary folder into place; LATEST is written last.
A run that dies half-way leaves only a hidden `.VERSION.tmp-*` folder and the old LATEST.

Retention: an entity's last activity is the latest `ts` of its rows in `engagements` and
`ad_events` before the cut day (user_id for users, pin_id for Pins). One with no activity in the
logs counts from the later of its `signup_ds` / `created_ds` and the first day the logs hold
(`activity_days`): what happened before the logs is unknown, not idleness. Entities whose last
activity lies more than --retention-days before the cut's start are not exported (nor indexed,
for ads); the manifest records `retention_days`, `idle_before`, the days of activity read and
`dropped_idle` counts. Every rank computes the same lists.
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
from typing import Dict, List, Optional, Tuple

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
# Ad catalogues above FLAT_INDEX_MAX get an HNSW index (M=32, efSearch HNSW_EF_SEARCH) instead
# of exact search. Measured (benchmarks/ann_bench.py, results/cpu-2core/ann.md, one search
# thread, batched queries): up to 1M ads exact search is about 2x slower than HNSW at
# efSearch 128, which finds only 92.5 % of the exact top 10 at 1M (97.5 % at 200k) and takes
# minutes to build with twice the memory; above 1M, efSearch 256 (95 % at 1M) rather than 128,
# and never below the k a caller asks for (faiss 1.15 does not raise efSearch to k).
FLAT_INDEX_MAX = 1_000_000
HNSW_EF_SEARCH = 256
DAY_S = 86_400
ACTIVITY_TABLES = ("engagements", "ad_events")  # what counts as activity, for retention


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
    p.add_argument("--retention-days", type=int, default=90,
                   help="leave out users and Pins idle longer than this before the cut (no engagement "
                        "or ad event; with none at all, counted from signup / creation)")


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
    if args.retention_days < 1:
        raise ValueError(f"--retention-days must be at least 1, got {args.retention_days}")
    version = args.version or args.cut
    if version and (args.out / version / MANIFEST).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out / version}: version exists; pass --overwrite to replace it")


def _last_activity(sources: SourceTables, cut_s: int, day_before: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"user_id": (sorted ids, latest ts of each), "pin_id": (...)} over the rows of `engagements`
    and `ad_events` strictly before the cut's start. Reads the two id columns and `ts` only, one
    day partition at a time (memory bounded by a day); per-id maxima are Arrow group-bys."""
    maxima: Dict[str, list] = {"user_id": [], "pin_id": []}
    for table in ACTIVITY_TABLES:
        for day in sources.days(table):
            if day > day_before:
                continue
            t = sources.read(table, (day, day), columns=[*maxima, "ts"])
            t = t.filter(pc.less(t.column("ts"), cut_s))
            for column, parts in maxima.items():
                parts.append(t.group_by(column).aggregate([("ts", "max")]))
    out = {}
    for column, parts in maxima.items():
        if not parts:
            out[column] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            continue
        t = pa.concat_tables(parts).group_by(column).aggregate([("ts_max", "max")]).sort_by(column)
        out[column] = (t.column(column).to_numpy(), t.column("ts_max_max").to_numpy())
    return out


def _retained(ids: np.ndarray, since: np.ndarray, active_ids: np.ndarray, active_ts: np.ndarray,
              horizon_s: int) -> np.ndarray:
    """Mask of `ids` whose last activity (their latest ts in `active_*`, else `since`, in
    seconds) is no more than the retention window before the cut."""
    last = since.copy()
    if len(active_ids):
        pos = np.minimum(np.searchsorted(active_ids, ids), len(active_ids) - 1)
        seen = active_ids[pos] == ids
        last[seen] = active_ts[pos[seen]]
    return last >= horizon_s


def _entities(sources: SourceTables, cut: str, retention_days: int):
    """Users signed up and Pins created before the cut whose last activity before it (their
    latest engagement or ad event; with none, the later of their signup / creation day and the
    logs' first day) lies within the retention window, the ad Pins among those, and what the
    window dropped (for the manifest)."""
    day = pc.strptime(cut, "%Y-%m-%d", "s").cast("date32")
    cut_s = int(np.datetime64(cut, "s").astype(np.int64))
    horizon_s = cut_s - retention_days * DAY_S
    day_before = str(np.datetime64(cut, "D") - 1)

    active = _last_activity(sources, cut_s, day_before)
    activity_days = sorted(d for t in ACTIVITY_TABLES for d in sources.days(t) if d <= day_before)
    logs_from = int(np.datetime64(activity_days[0], "s").astype(np.int64)) if activity_days else cut_s

    def seconds(dates: pa.ChunkedArray) -> np.ndarray:  # no activity: idle since signup or the logs' start
        return np.maximum(dates.to_numpy().astype("datetime64[s]").astype(np.int64), logs_from)

    users = sources.read("users", columns=["user_id", "signup_ds"])
    users = users.filter(pc.less(users.column("signup_ds"), day))
    user_ids = users.column("user_id").to_numpy()
    keep_users = _retained(user_ids, seconds(users.column("signup_ds")), *active["user_id"], horizon_s)
    pins = sources.read("pins", columns=["pin_id", "created_ds", "is_ad"])
    pins = pins.filter(pc.less(pins.column("created_ds"), day))
    pin_ids = pins.column("pin_id").to_numpy()
    is_ad = pins.column("is_ad").to_numpy(zero_copy_only=False)
    keep_pins = _retained(pin_ids, seconds(pins.column("created_ds")), *active["pin_id"], horizon_s)
    retention = {
        "retention_days": retention_days,
        "idle_before": str(np.datetime64(horizon_s, "s")),
        "activity_days": [activity_days[0], activity_days[-1]] if activity_days else None,
        "dropped_idle": {"users": int((~keep_users).sum()), "pins": int((~keep_pins).sum()),
                         "ads": int((~keep_pins & is_ad).sum())},
    }
    return (np.sort(user_ids[keep_users]), pin_ids[keep_pins], pin_ids[keep_pins & is_ad], retention)


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


def ad_prior(sources: SourceTables, days: Tuple[str, str], ad_ids: np.ndarray,
             temperature: float, weight: float) -> np.ndarray:
    """Per ad, temperature x weight x log(its share of the ad impressions in `days`): added to
    the dot, it ranks ads by dot / temperature + weight x log q (`UpstreamConfig.
    retrieval_prior_weight`). An ad never shown counts as half an impression."""
    shown = sources.read("ad_events", days, columns=["pin_id"]).column("pin_id").to_numpy()
    counts = np.bincount(np.searchsorted(ad_ids, shown[np.isin(shown, ad_ids)]), minlength=len(ad_ids))
    share = np.maximum(counts, 0.5) / max(counts.sum(), 1)
    return (temperature * weight * np.log(share)).astype(np.float32)


def _ads_index(folder: Path, ad_ids: np.ndarray, dim: int, version: str,
               prior: Optional[np.ndarray] = None) -> Dict[str, object]:
    """faiss inner-product index over the ad Pins' vectors (exact while small, HNSW above).
    With `prior` (per ad of the sorted `ad_ids`) each ad is stored as [vector, prior] and
    queried as [user, 1], so the index ranks by dot + prior; its dimension is then dim + 1."""
    import faiss

    t = pa.concat_tables([pq.read_table(p) for p in sorted((folder / "pins").glob("part-*.parquet"))])
    ids = t.column("entity_id").to_numpy()
    keep = np.isin(ids, ad_ids)
    emb = t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    vectors, ids = emb[keep], ids[keep]
    if prior is not None:
        vectors = np.column_stack([vectors, prior[np.searchsorted(ad_ids, ids)]])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = vectors.shape[1]
    if len(ids) <= FLAT_INDEX_MAX:
        index, kind = faiss.IndexFlatIP(width), "flat_ip"
    else:
        index, kind = faiss.IndexHNSWFlat(width, 32, faiss.METRIC_INNER_PRODUCT), "hnsw32_ip"
        index.hnsw.efSearch = HNSW_EF_SEARCH  # stored in ads.faiss
    index.add(vectors)
    faiss.write_index(index, str(folder / "ads.faiss"))
    ids_table = pa.table({"pin_id": pa.array(ids)}).replace_schema_metadata({"snapshot_version": version})
    pq.write_table(ids_table, folder / "ads_ids.parquet")
    return {"kind": kind, "size": len(ids), "popularity_prior": prior is not None}


def export(args: argparse.Namespace) -> Optional[dict]:
    """One worker's part of an export (every rank runs this); rank 0 returns the manifest."""
    return derl_dist.run_as_worker(_export, args)


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

    users, pins, ads, retention = _entities(sources, cut, args.retention_days)
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
            "upstream_metrics": {k: v for k, v in metrics.items() if k.startswith(("recall@", "popularity_recall@", "dot_auc_"))},
            # What the dot means: retrieval by P(Pin | user) scores dot / temperature +
            # retrieval_prior_weight x log(the Pin's share of impressions), as the ads index
            # does (`ad_prior`); the dot alone is affinity, popularity left out at weight 1.
            "dot": {"temperature": configs[domain].temperature,
                    "logq_strength": configs[domain].logq_strength,
                    "retrieval_prior_weight": configs[domain].retrieval_prior_weight},
        }
        if previous is not None:
            domains[domain]["refresh"] = refresh_domain(
                tmp / domain, previous, domain, worker.rank, args.weight, not args.no_align)
    if _FAULT and worker.rank == worker.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dies after writing its parts
    dist.barrier()
    if not worker.is_main:
        return None

    ad_ids = np.sort(ads)
    for domain, info in domains.items():
        cfg, prior = configs[domain], None
        if cfg.retrieval_prior_weight:
            prior = ad_prior(sources, tuple(info["train_days"]), ad_ids, cfg.temperature,
                             cfg.retrieval_prior_weight)
        info["ads_index"] = _ads_index(tmp / domain, ad_ids, dim, version, prior)
        info["rows"]["ads"] = info["ads_index"]["size"]
    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cut_day": cut,
        "data": str(args.data),
        "dim": dim,
        "normalised": True,
        **retention,
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
    idle = retention["dropped_idle"]
    print(f"snapshot {version}: " + ", ".join(
        f"{d} {i['rows']['users']:,} users, {i['rows']['pins']:,} pins, {i['rows']['ads']:,} ads "
        f"({i['entities_per_s']:,.0f} entities/s)" for d, i in domains.items())
        + f"; idle over {retention['retention_days']} days, left out: {idle['users']:,} users, "
        f"{idle['pins']:,} pins ({idle['ads']:,} ads) -> {final}")
    return manifest


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m` / `torchrun -m` entry: the same as `derl export`."""
    from derl.launchers import cli

    cli.main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
