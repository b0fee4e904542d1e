"""ANN index benchmark: recall@K against exact search, queries/s, build time and index size of the
faiss indexes a snapshot's ad index could use, on synthetic catalogues and a snapshot's ads (this
prints the table and writes DIR/ann.{json,md,png}; the catalogues, the indexes and what each
figure is: docs/results.md, "ANN").

    python -m derl.benchmarks.ann_bench --out DIR [--ads 1000000 [N ...]] [--dim 64]
        [--queries 2000] [--topics 300] [--noise 1.0] [--threads 1] [--build-threads N]
        [--min-time 1.0]
        [--snapshots SNAP_ROOT [--version V] [--domain engagement]] [--seed 0]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from derl.benchmarks import report
from derl.launchers.runtime.config import check, setting

HNSW_M = 32
HNSW_EF = (16, 32, 64, 128, 256)
IVF_NPROBE = (1, 4, 16, 64, 256)
RECALL_KS = (10, 100)


@dataclass(frozen=True)
class AnnBenchConfig:
    out: Path = setting(help="folder for ann.json, ann.md and ann.png")
    ads: Tuple[int, ...] = setting((1_000_000,), "synthetic catalogue size(s); smaller ones are prefixes of "
                                   "the largest; 0: none", many=True)
    dim: int = setting(64, "vector dimension of the synthetic catalogues")
    queries: int = setting(2000, "queries per catalogue")
    topics: int = setting(300, "topic centres of the synthetic catalogues")
    noise: float = setting(1.0, "noise norm relative to the topic centre")
    threads: int = setting(1, "OpenMP threads for searches")
    build_threads: int = setting(os.cpu_count(), "OpenMP threads for index builds (default: all cores)")
    min_time: float = setting(1.0, "seconds of repeated searches per QPS figure")
    snapshots: Optional[Path] = setting(None, "also measure on this snapshot root's ad vectors")
    version: Optional[str] = setting(None, "snapshot version (default: LATEST)")
    domain: str = setting("engagement", "the snapshot's domain")
    seed: int = setting(0, "seed of the synthetic catalogues and the snapshot's query sample")

    def __post_init__(self) -> None:
        check(self, positive=("dim", "queries", "topics", "threads", "build_threads"),
              non_negative=("noise", "min_time"))


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def synthetic(n: int, n_queries: int, dim: int, topics: int, noise: float,
              seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(catalogue [n, dim], queries [n_queries, dim]): float32 unit vectors around `topics`
    random centres (docs/results.md, "ANN")."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((topics, dim)).astype(np.float32))
    weights = rng.dirichlet(np.full(topics, 2.0))
    sigma = np.float32(noise / math.sqrt(dim))  # E|noise| ~ noise * |centre|

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for lo in range(0, m, 1 << 18):  # in blocks: bounded temporary memory
            hi = min(m, lo + (1 << 18))
            block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            block *= sigma
            block += centres[rng.choice(topics, size=hi - lo, p=weights)]
            out[lo:hi] = _unit(block)
        return out

    return draw(n), draw(n_queries)


def from_snapshot(root: Path, version: Optional[str], domain: str, n_queries: int,
                  seed: int) -> Tuple[str, np.ndarray, np.ndarray]:
    """(name, ad vectors, user vectors as queries) of a real snapshot."""
    from derl.datapipes.snapshots import Snapshot

    snap = Snapshot(root, version)
    ad_ids = snap.ad_ids(domain)
    ads, missing = snap.table(domain, "pins").lookup(ad_ids)
    if missing.any():
        raise ValueError(f"{snap.path}: {int(missing.sum())} ads of the index have no Pin vector")
    users = snap.table(domain, "users").vectors
    pick = np.random.default_rng(seed).choice(len(users), size=min(n_queries, len(users)), replace=False)
    return (f"snapshot-{snap.version}-{domain}", np.ascontiguousarray(ads, np.float32),
            np.ascontiguousarray(users[np.sort(pick)], np.float32))


def ivf_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _index_mb(index) -> float:
    import faiss

    return faiss.serialize_index(index).nbytes / 2**20


def _timed_search(index, queries: np.ndarray, k: int, min_time: float) -> Tuple[np.ndarray, float]:
    """(result ids of the first timed call, queries/s of the fastest of repeated batched calls),
    after an untimed warm-up call on a few queries (thread pool start-up, first touches). Calls
    repeat until --min-time seconds have passed, at least twice; the fastest call is the one
    least disturbed by other processes on the cores."""
    index.search(queries[:32], k)
    first, best, total, calls = None, float("inf"), 0.0, 0
    while calls < 2 or total < min_time:
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        secs = time.perf_counter() - t0
        first = ids if first is None else first
        best, total, calls = min(best, secs), total + secs, calls + 1
    return first, len(queries) / max(best, 1e-9)


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k (-1, "no result", never matches)."""
    a, b = found[:, :k], exact[:, :k]
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2) & (a >= 0)
    return float(hits.sum(axis=1).mean() / k)


def _configs(dim: int, n: int) -> List[Tuple[str, str, Callable, Callable]]:
    """(index, param, build(xb) -> index, tune(index)) per measured configuration; configs of one
    index type share one build (its first entry builds, the rest re-tune)."""
    import faiss

    def flat(xb):
        index = faiss.IndexFlatIP(dim)
        index.add(xb)
        return index

    def hnsw(xb):
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.add(xb)
        return index

    nlist = ivf_nlist(n)

    def ivf(xb):
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(1).choice(len(xb), size=min(len(xb), 64 * nlist), replace=False)
        index.train(xb[np.sort(sample)])
        index.add(xb)
        return index

    def set_ef(ef):
        return lambda index: setattr(index.hnsw, "efSearch", ef)

    def set_nprobe(p):
        return lambda index: setattr(index, "nprobe", p)

    out = [("flat_ip", "exact", flat, lambda index: None)]
    out += [(f"hnsw{HNSW_M}", f"efSearch={ef}", hnsw, set_ef(ef)) for ef in HNSW_EF]
    out += [("ivf_flat", f"nlist={nlist},nprobe={p}", ivf, set_nprobe(p))
            for p in IVF_NPROBE if p <= nlist]
    return out


def measure(name: str, xb: np.ndarray, xq: np.ndarray, min_time: float, threads: int = 1,
            build_threads: int = 1) -> List[Dict[str, object]]:
    """Every configuration of `_configs` on one catalogue; rows for the table. Builds run on
    `build_threads` OpenMP threads, searches on `threads`."""
    import faiss
    from tqdm import tqdm

    n, dim = xb.shape
    configs = _configs(dim, n)
    exact = None
    rows: List[Dict[str, object]] = []
    built: Dict[str, Tuple[object, float, float]] = {}
    bar = tqdm(configs, desc=f"{name} ({n:,} x {dim})", unit="config")
    for kind, param, build, tune in bar:
        bar.set_postfix_str(f"{kind} {param}")
        if kind not in built:
            built.clear()  # one index in memory at a time
            faiss.omp_set_num_threads(build_threads)
            t0 = time.perf_counter()
            index = build(xb)
            built[kind] = (index, time.perf_counter() - t0, _index_mb(index))
            faiss.omp_set_num_threads(threads)
        index, build_s, mb = built[kind]
        tune(index)
        row: Dict[str, object] = {"dataset": name, "ads": n, "index": kind, "param": param,
                                  "build_s": round(build_s, 2)}
        found = {}
        for k in RECALL_KS:
            found[k], qps = _timed_search(index, xq, min(k, n), min_time)
            row[f"qps_k{k}"] = round(qps, 1)
        if exact is None:  # flat_ip comes first: its top-100 is the ground truth
            assert kind == "flat_ip"
            exact = found[max(RECALL_KS)]
        for k in RECALL_KS:
            row[f"recall@{k}_%"] = round(100 * recall(found[k], exact, min(k, n)), 2)
        row["index_mb"] = round(mb, 1)
        rows.append(row)
    bar.close()
    return rows


def _plot(rows: List[Dict[str, object]], path: Path) -> None:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    title = "faiss ANN: recall@10 against queries/s (labels: efSearch / nprobe)"
    with report.figure(path, len(datasets), (5.5 * len(datasets), 4.2), title, dpi=120) as axes:
        for ax, ds in zip(axes, datasets):
            mine = [r for r in rows if r["dataset"] == ds]
            for i, kind in enumerate(dict.fromkeys(r["index"] for r in mine)):
                pts = [r for r in mine if r["index"] == kind]
                x = [r["recall@10_%"] for r in pts]
                y = [r["qps_k10"] for r in pts]
                ax.plot(x, y, marker="o", color=f"C{i}", label=kind)
                for r, xi, yi in zip(pts, x, y):
                    ax.annotate(r["param"].split(",")[-1].split("=")[-1], (xi, yi), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
            ax.set(yscale="log", xlabel="recall@10 vs exact (%)", ylabel="queries/s (batched, k=10)")
            ax.set_title(f"{ds}: {mine[0]['ads']:,} ads", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    import faiss

    config = report.parse_config(AnnBenchConfig, argv, __doc__)

    rows: List[Dict[str, object]] = []
    meta: Dict[str, object] = {**report.machine(threads=False, cores=True),
                               "faiss": faiss.__version__, "search_threads": config.threads,
                               "build_threads": config.build_threads, "queries": config.queries,
                               "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    sizes = sorted({n for n in config.ads if n > 0}, reverse=True)
    if sizes:
        xb, xq = synthetic(sizes[0], config.queries, config.dim, config.topics, config.noise, config.seed)
        meta["synthetic"] = (f"{config.topics} topic centres on the unit sphere, Dirichlet(2) topic "
                             f"weights, noise {config.noise} x centre norm, dim {config.dim}, seed {config.seed}")
        for n in sizes:
            rows += measure(f"synthetic-{n}", np.ascontiguousarray(xb[:n]), xq, config.min_time,
                            config.threads, config.build_threads)
        del xb, xq
    if config.snapshots:
        name, xb, xq = from_snapshot(config.snapshots, config.version, config.domain, config.queries, config.seed)
        meta["snapshot"] = f"{config.snapshots} ({name}: {len(xb):,} ads, {len(xq):,} user queries)"
        rows += measure(name, xb, xq, config.min_time, config.threads, config.build_threads)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_1m_end"] = round(os.getloadavg()[0], 2)  # > cores: other processes shared them
    meta["peak_rss_mb"] = round(report.peak_rss_mb(), 1)
    return report.publish(config.out, "ann", rows, meta, _plot)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
