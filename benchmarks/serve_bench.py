"""`derl bench --suite serve`: `derl serve` under an open-loop load on loopback. For /v1/retrieve
and for /v1/rank (with --candidates ads), with the embedded user store and with Redis: p50, p99
and p99.9 latency at rising request rates, and the highest rate held with p99 under its target;
then the same service at the target rate while a new snapshot version lands every --refresh-s
seconds: errors and mixed-version answers (both must be 0), versions served; the server's peak
RSS. Writes DIR/serve.{json,md,png}; what each figure is: docs/serving.md, "Under load".

    derl bench --suite serve --out DIR --snapshots SNAP --ranker RANKER_RUN [--data WORLD]
        [--routes retrieve,rank] [--stores embedded,redis] [--retrieve-rates 100 250 ...]
        [--rank-rates 50 100 ...] [--step-s 10] [--retrieve-rate 500] [--rank-rate 200]
        [--refresh-s 3] [--refresh-run-s 30] [--candidates 100] [--k 100] [--pool 64]
    python -m derl.benchmarks.serve_bench ...   (the same, without --suite)

The load is open-loop: request i is due at i / rate seconds whatever the answers before it
did, and its latency runs from when it was due, so a slow answer delays none of the requests'
clocks (no coordinated omission). Every step is bounded in count (rate x --step-s) and time
(each request at most --timeout-s, then counted an error). The service runs on a copy of the
snapshot's LATEST version under DIR/work (removed at the end; the servers' logs stay there);
the given root is only read. A mixed answer is one that differs from the other answers to the
same request that name the same version: the versions written during a refresh run differ in
every vector, so an answer that took its user vector from one version and its ads from another
matches none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from derl.benchmarks import report
from derl.launchers.runtime.config import check, setting
from derl.launchers.runtime.dist import free_port
from derl.launchers.runtime.processes import DERL

HOST = "127.0.0.1"
ROUTES = ("retrieve", "rank")
STORES = ("embedded", "redis")
START_TIMEOUT_S = 180.0  # a server (or Redis) that does not answer /healthz (PING) by then failed
WARMUP_REQUESTS = 50
WAKE_EARLY_S = 0.001


@dataclass(frozen=True)
class ServeBenchConfig:
    out: Path = setting(help="folder for serve.json, serve.md, serve.png (and the work)")
    snapshots: Path = setting(help="snapshot root: its LATEST version is served (a copy, under DIR/work)")
    ranker: Path = setting(help="a snapshot ranker run (derl train-downstream --upstream snapshot)")
    data: Optional[Path] = setting(None, "source folder (default: the ranker's)")
    suite: str = setting("serve", "derl bench's suite", choices=("serve",))
    routes: str = setting(",".join(ROUTES), "the routes to load, comma-separated")
    stores: str = setting(",".join(STORES), "the user stores, comma-separated")
    retrieve_rates: Tuple[int, ...] = setting((100, 250, 500, 750, 1000, 1500), "/v1/retrieve requests/s, "
                                              "rising (stops after the first rate not held)", many=True)
    rank_rates: Tuple[int, ...] = setting((50, 100, 200, 300, 400, 600), "/v1/rank requests/s, rising",
                                          many=True)
    step_s: float = setting(10.0, "seconds of load per rate")
    retrieve_p99_ms: float = setting(10.0, "the p99 a /v1/retrieve rate must stay under to be held")
    rank_p99_ms: float = setting(25.0, "the p99 a /v1/rank rate must stay under to be held")
    retrieve_rate: int = setting(500, "/v1/retrieve requests/s during the refresh runs")
    rank_rate: int = setting(200, "/v1/rank requests/s during the refresh runs")
    refresh_s: float = setting(3.0, "seconds between new snapshot versions in the refresh runs (0: no refresh run)")
    refresh_run_s: float = setting(30.0, "seconds of each refresh run")
    candidates: int = setting(100, "candidate ads per /v1/rank request")
    k: int = setting(100, "ads per /v1/retrieve answer")
    pool: int = setting(64, "distinct requests per route, sent in turn (each is answered many times per version)")
    connections: int = setting(64, "most connections the load generator opens at once")
    timeout_s: float = setting(5.0, "a request unanswered this long after it was due is an error")
    threads: int = setting(1, "derl serve --threads")
    seed: int = setting(0, "seed of the requests and of the refreshed versions' vectors")

    def __post_init__(self) -> None:
        check(self, positive=("step_s", "retrieve_p99_ms", "rank_p99_ms", "retrieve_rate", "rank_rate",
                              "refresh_run_s", "candidates", "k", "pool", "connections", "timeout_s", "threads"),
              non_negative=("refresh_s", "seed"))
        for name, allowed in (("routes", ROUTES), ("stores", STORES)):
            unknown = sorted(set(_listed(getattr(self, name))) - set(allowed))
            if unknown or not _listed(getattr(self, name)):
                raise ValueError(f"--{name}: {', '.join(unknown) or 'none given'} (known: {', '.join(allowed)})")
        for name in ("retrieve_rates", "rank_rates"):
            if not getattr(self, name) or min(getattr(self, name)) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive rates")


def _listed(text: str) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


# -- the processes: Redis and derl serve ---------------------------------------------------------

@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A Redis of our own on 127.0.0.1 and a free port, without persistence, until the block
    ends; its url. No redis-server is an error that says how to get one (never a skip)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `make setup` installs it "
                           "(apt-get install redis-server)")
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(folder / "redis.log", "ab") as log:
        proc = subprocess.Popen([exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://{HOST}:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start: {folder / 'redis.log'}")
                time.sleep(0.05)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def health(port: int, timeout: float = 2.0) -> Dict[str, object]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def derl_serve(snapshots: Path, ranker: Path, log: Path, *flags: object) -> Iterator[Tuple[int, subprocess.Popen]]:
    """`derl serve` on 127.0.0.1 and a free port, until the block ends (then SIGTERM, which ends
    it after its requests in flight); (port, process), once /healthz answers."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([*DERL, "serve", "--snapshots", str(snapshots), "--ranker", str(ranker),
                                 "--host", HOST, "--port", str(port), *map(str, flags)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                health(port, 1.0)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    raise RuntimeError(f"derl serve did not start (exit {proc.poll()}):\n" + "\n".join(tail))
                time.sleep(0.2)
        yield port, proc
    finally:
        _stop(proc)


def peak_rss_mb(pid: int) -> Optional[float]:
    """A live process's peak resident set (Linux /proc), else None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(found.group(1)) / 1024, 1) if found else None


# -- the load -------------------------------------------------------------------------------------

def post(path: str, body: dict) -> bytes:
    """One HTTP/1.1 POST of a JSON body, as bytes on the wire (keep-alive)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _exchange(conn: Tuple[asyncio.StreamReader, asyncio.StreamWriter], wire: bytes) -> Tuple[int, bytes, bool]:
    """(status, body, whether the server keeps the connection) of one request on `conn`."""
    reader, writer = conn
    writer.write(wire)
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return int(head[9:12]), body, not re.search(rb"(?i)\r\nconnection: *close", head)


async def _load(port: int, wires: Sequence[bytes], rate: float, count: int, connections: int,
                timeout: float) -> List[Tuple[int, float, int, bytes]]:
    """Open loop: request i (wires[i % len(wires)]) is due at i / rate s; at most `connections`
    are open (a request that finds none free waits, on its own clock). (pool index, latency s
    from when it was due, HTTP status (0: no answer in `timeout` s), body) per request."""
    idle: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    slots = asyncio.Semaphore(connections)
    results: List[Tuple[int, float, int, bytes]] = [(i % len(wires), float("nan"), 0, b"") for i in range(count)]
    loop = asyncio.get_running_loop()

    async def one(i: int, due: float) -> None:
        async with slots:
            conn = idle.pop() if idle else await asyncio.open_connection(HOST, port)
            try:
                status, body, keep = await _exchange(conn, wires[i % len(wires)])
            except BaseException:
                conn[1].close()
                raise
            if keep:
                idle.append(conn)
            else:
                conn[1].close()
        results[i] = (i % len(wires), loop.time() - due, status, body)

    async def bounded(i: int, due: float) -> None:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(one(i, due), max(due + timeout - loop.time(), 0.001))

    start = loop.time() + 0.05
    tasks = []
    for i in range(count):
        due = start + i / rate
        # The loop's timers wake up to a millisecond late: aim one early, and clock a request
        # sent early from when it was sent (one sent late still counts from when it was due).
        if due - WAKE_EARLY_S > loop.time():
            await asyncio.sleep(due - WAKE_EARLY_S - loop.time())
        tasks.append(asyncio.ensure_future(bounded(i, max(due, loop.time()))))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return results


def drive(port: int, wires: Sequence[bytes], rate: float, seconds: float, connections: int,
          timeout: float) -> List[Tuple[int, float, int, bytes]]:
    """`_load` of rate x seconds requests, run to its end."""
    return asyncio.run(_load(port, wires, rate, max(1, round(rate * seconds)), connections, timeout))


def summarise(results: List[Tuple[int, float, int, bytes]], rate: float, seconds: float) -> Dict[str, object]:
    """Latency percentiles of the answered requests, errors (not 200, or no answer), the
    versions the answers named, and the mixed answers (module docstring)."""
    ok = [(i, lat, body) for i, lat, status, body in results if status == 200]
    lat_ms = np.array([lat for _, lat, _ in ok]) * 1e3
    answers: Dict[Tuple[int, str], Counter] = {}
    for i, _, body in ok:
        answers.setdefault((i, json.loads(body)["version"]), Counter())[body] += 1
    mixed = sum(sum(c.values()) - max(c.values()) for c in answers.values())
    pct = (lambda q: round(float(np.percentile(lat_ms, q)), 2) if len(lat_ms) else None)
    return {"rate": rate, "requests": len(results), "answered_per_s": round(len(ok) / seconds, 1),
            "errors": len(results) - len(ok), "p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9),
            "max_ms": round(float(lat_ms.max()), 2) if len(lat_ms) else None,
            "versions": len({v for _, v in answers}), "mixed": mixed,
            "statuses": dict(Counter(str(status) for _, _, status, _ in results))}


def requests_for(snapshots: Path, route: str, pool: int, candidates: int, k: int, seed: int) -> List[bytes]:
    """`pool` distinct requests of `route`, from the served version's users and ads."""
    from derl.datapipes.snapshots import Snapshot

    rng = np.random.default_rng(seed)
    with Snapshot(snapshots) as snap:
        users = rng.choice(snap.table("engagement", "users").ids, pool)
        ads = snap.ad_ids("engagement")
        day_start = int(np.datetime64(snap.manifest["cut_day"], "s").astype(np.int64))
    if route == "retrieve":
        return [post("/v1/retrieve", {"user_id": int(u), "k": k}) for u in users]
    size = min(candidates, len(ads))
    return [post("/v1/rank", {"user_id": int(u),
                              "context": {"surface": int(rng.integers(3)), "ts": day_start + int(rng.integers(86400))},
                              "candidates": [int(a) for a in rng.choice(ads, size, replace=False)]})
            for u in users]


# -- refreshes ------------------------------------------------------------------------------------

def vectors_of(snapshots: Path, version: Optional[str] = None) -> Dict[str, object]:
    """What `refreshed_version` moves: a version's tables, ads, dot temperature, cut day, dim."""
    from derl.datapipes.snapshots import Snapshot

    with Snapshot(snapshots, version) as snap:
        return {"tables": {f"{d}/{e}": (snap.table(d, e).ids, snap.table(d, e).vectors)
                           for d in snap.domains for e in ("users", "pins")},
                "ads": np.unique(np.concatenate([snap.ad_ids(d) for d in snap.domains])),
                "temperature": snap.dot_temperature(snap.domains[0]), "cut_day": snap.manifest["cut_day"],
                "dim": snap.dim}


def refreshed_version(root: Path, base: Dict[str, object], name: str, seed: int,
                      redis_url: Optional[str] = None) -> str:
    """Version `name` of `root`: every vector of `base` (`vectors_of`) moved by noise of its own
    (seed, name) and renormalised, the same ads indexed, the same cut day, written whole through
    `write_snapshot` (LATEST names it); published to Redis too where `redis_url` is given."""
    from derl.datapipes.snapshots import Snapshot, write_snapshot

    rng = np.random.default_rng([seed, *name.encode()])
    tables = {}
    for key, (ids, vectors) in base["tables"].items():
        moved = vectors + rng.normal(0.0, 0.1, vectors.shape).astype(np.float32)
        tables[key] = (ids, moved / np.linalg.norm(moved, axis=1, keepdims=True))
    write_snapshot(root, name, base["cut_day"], tables, base["dim"], temperature=base["temperature"],
                   normalised=True, ads=base["ads"])
    if redis_url is not None:
        from derl.datapipes.snapshots import redis_store

        with Snapshot(root, name) as snap:
            redis_store.publish(snap, redis_store.connect(redis_url), expire_after=60)
    return name


def _refresher(root: str, base: str, every_s: float, seed: int, redis_url: Optional[str], ready, stop) -> None:
    """A new version every `every_s` seconds until `stop` is set, the old ones collected (gc
    keeps the two newest; never LATEST, the pinned one or one a reader holds). At a lower CPU
    priority: the export it stands for would run on another host."""
    from derl.datapipes.snapshots import gc

    os.nice(10)
    vectors = vectors_of(Path(root), base)
    ready.set()
    n = 0
    while not stop.wait(every_s):
        n += 1
        refreshed_version(Path(root), vectors, f"{base}-r{n:03d}", seed, redis_url)
        gc(Path(root), keep=2)


@contextlib.contextmanager
def refreshing(root: Path, base: str, every_s: float, seed: int, redis_url: Optional[str]) -> Iterator[None]:
    """`_refresher` in a process of its own for the length of the block, which starts once it
    has read the base version (its first version lands `every_s` seconds later)."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_refresher, args=(str(root), base, every_s, seed, redis_url, ready, stop),
                       daemon=True)
    proc.start()
    try:
        while not ready.wait(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"the refresher of {root} ended before it started (exit {proc.exitcode})")
        yield
    finally:
        stop.set()
        proc.join(60)
        if proc.is_alive():
            proc.kill()


# -- the run --------------------------------------------------------------------------------------

def copy_latest(snapshots: Path, root: Path) -> str:
    """The LATEST version of `snapshots`, copied into a fresh root `root`; its name."""
    from derl.datapipes.snapshots import LATEST, latest

    base = latest(snapshots)
    if base is None:
        raise ValueError(f"--snapshots {snapshots}: no LATEST")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(snapshots / base, root / base)
    (root / LATEST).write_text(base)
    return base


def _store(config: ServeBenchConfig, store: str, work: Path, rows: List[Dict[str, object]]) -> Dict[str, object]:
    """Every measured row of one user store: one server, the rising rates of each route, then
    the refresh runs; what the server said of itself at the end."""
    root = work / "snapshots"
    base = copy_latest(config.snapshots, root)
    redis_url = None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)  # the copies go last; the logs beside them stay
        flags = ["--threads", config.threads, "--refresh-every", max(0.2, config.refresh_s / 4),
                 "--max-candidates", max(config.candidates, 500)]
        if config.data is not None:
            flags += ["--data", config.data]
        if store == "redis":
            from derl.datapipes.snapshots import Snapshot, redis_store

            redis_url = stack.enter_context(redis_server(work / "redis"))
            with Snapshot(root, base) as snap:
                redis_store.publish(snap, redis_store.connect(redis_url), expire_after=60)
            flags += ["--user-store", redis_url]
        port, proc = stack.enter_context(derl_serve(root, config.ranker, work / f"serve-{store}.log", *flags))
        wires = {route: requests_for(root, route, config.pool, config.candidates, config.k, config.seed)
                 for route in _listed(config.routes)}
        mine: List[Dict[str, object]] = []

        def measured(route: str, rate: float, seconds: float, refresh: bool) -> bool:
            """One run of `rate` x `seconds` requests into a row; whether its rate was held."""
            row = {"route": route, "store": store, "refresh": refresh,
                   **summarise(drive(port, wires[route], rate, seconds, config.connections, config.timeout_s),
                               rate, seconds)}
            row["held"] = (row["errors"] == 0 and row["mixed"] == 0 and row["p99_ms"] is not None
                           and row["p99_ms"] <= getattr(config, f"{route}_p99_ms"))
            mine.append(row)
            print(_line(row), flush=True)
            return row["held"]

        for route, requests in wires.items():
            drive(port, requests, 50.0, WARMUP_REQUESTS / 50.0, config.connections, config.timeout_s)
            for rate in sorted(getattr(config, f"{route}_rates")):
                if not measured(route, rate, config.step_s, refresh=False):
                    break
        if config.refresh_s > 0:
            with refreshing(root, base, config.refresh_s, config.seed, redis_url):
                for route in wires:
                    measured(route, getattr(config, f"{route}_rate"), config.refresh_run_s, refresh=True)
        served = health(port)
        rss = peak_rss_mb(proc.pid)
        for row in mine:
            row["server_peak_rss_mb"] = rss
        rows += mine
    return {"peak_rss_mb": rss, "most_versions_in_memory": served["most_versions_in_memory"],
            "versions_refused": len(served["refused"]), "last_version": served["version"]}


def _line(row: Dict[str, object]) -> str:
    return (f"{row['route']:<8} {row['store']:<8} {'refresh ' if row['refresh'] else ''}{row['rate']:>6} req/s: "
            f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, p99.9 {row['p999_ms']} ms, errors {row['errors']}, "
            f"versions {row['versions']}, mixed {row['mixed']}{'' if row['held'] else ' (not held)'}")


def held(rows: List[Dict[str, object]]) -> Dict[str, Optional[int]]:
    """route/store -> the highest rate held with p99 under its target and no error (None: none)."""
    out: Dict[str, Optional[int]] = {}
    for r in rows:
        if not r["refresh"]:
            key = f"{r['route']}/{r['store']}"
            best = out.get(key)
            out[key] = max(best or 0, r["rate"]) if r["held"] else best
    return out


def _plot(rows: List[Dict[str, object]], path: Path, targets: Dict[str, float]) -> None:
    routes = list(dict.fromkeys(r["route"] for r in rows))
    with report.figure(path, len(routes), (5.5 * len(routes), 4.2),
                       "derl serve: latency under open-loop load (lines: rising rates; stars: p99 with a "
                       "refresh every few seconds)") as axes:
        for ax, route in zip(axes, routes):
            for i, store in enumerate(dict.fromkeys(r["store"] for r in rows)):
                steady = [r for r in rows if r["route"] == route and r["store"] == store and not r["refresh"]
                          and r["p50_ms"] is not None]
                for key, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p999_ms", "--")):
                    ax.plot([r["rate"] for r in steady], [r[key] for r in steady], style, marker="o", color=f"C{i}",
                            label=f"{store} {key[:-3].replace('p999', 'p99.9')}")
                for r in rows:
                    if r["route"] == route and r["store"] == store and r["refresh"] and r["p99_ms"] is not None:
                        ax.plot([r["rate"]], [r["p99_ms"]], "*", markersize=12, color=f"C{i}")
            ax.axhline(targets[route], color="grey", linestyle="-.", linewidth=1, label="p99 target")
            ax.set(yscale="log", xlabel="offered requests/s", ylabel="latency (ms, from when due)")
            ax.set_title(f"/v1/{route}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)


COLUMNS = ("route", "store", "refresh", "rate", "answered_per_s", "requests", "errors", "p50_ms", "p99_ms",
           "p999_ms", "max_ms", "versions", "mixed", "held", "server_peak_rss_mb")


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = report.parse_config(ServeBenchConfig, argv, __doc__, prog="derl bench --suite serve")
    work = config.out / "work"
    rows: List[Dict[str, object]] = []
    meta: Dict[str, object] = {**report.machine(threads=False, cores=True),
                               "command": " ".join(["derl bench", *([] if "--suite" in argv else ["--suite", "serve"]),
                                                    *argv]),
                               "snapshots": str(config.snapshots), "ranker": str(config.ranker),
                               "candidates": config.candidates, "k": config.k, "step_s": config.step_s,
                               "refresh_s": config.refresh_s, "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    meta["servers"] = {store: _store(config, store, work / store, rows) for store in _listed(config.stores)}
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    meta["held"] = held(rows)
    meta["targets_p99_ms"] = {"retrieve": config.retrieve_p99_ms, "rank": config.rank_p99_ms}
    refresh = [r for r in rows if r["refresh"]]
    meta["refresh_errors"] = sum(r["errors"] for r in refresh)
    meta["refresh_mixed"] = sum(r["mixed"] for r in refresh)
    result = report.publish(config.out, "serve", rows, meta,
                            lambda rs, path: _plot(rs, path, meta["targets_p99_ms"]), columns=COLUMNS)
    # The refresh's promise, not a figure: an error or a mixed answer under refresh fails the suite.
    failed = {f"refresh/{r['route']}/{r['store']}": f"{r['errors']} errors, {r['mixed']} mixed-version answers"
              for r in refresh if r["errors"] or r["mixed"]}
    return {**result, "errors": failed}


def main() -> None:
    run()


if __name__ == "__main__":
    main()
