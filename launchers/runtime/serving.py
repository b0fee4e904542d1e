"""The online path behind `derl serve`, without its HTTP (`serving_app`): a snapshot version and
a trained ranker answering requests, the version followed as LATEST moves.

- A request holds one `Version` from start to end (`Versions.acquire`): its user vectors, its
  Pin vectors and its ad index all come from that version, and the answer names it.
- `Versions.refresh` follows LATEST: a new version is opened (verified), checked against the
  ranker (`join.require_fits`) and its world, read whole (every table and index it serves),
  pinned, then swapped in by one assignment; the old one is unpinned and let go when its last
  request ends. One that fails is refused and logged, once per folder, and the old one serves
  on. A new version is loaded only when no old one is still held: at most two in memory.
- /v1/rank builds the ranker's batch from the request as the reader builds a row's
  (`readers.row_features`, the user's profile from `FeatureJoiner`) and joins the version's
  vectors through `join.join_vectors`, the join training and `derl score` use; the snapshot
  ranker reads no sequence feature, so the user's history is not read. Unknown users and ads
  take the ranker's no-vector path (its learned defaults) and are counted as cold starts.
- User vectors come from the version's own tables (embedded) or from Redis under that
  version's keys (`redis_store.RedisUsers`).

Bad requests raise `BadRequest` (a 4xx naming the field).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from derl.datapipes.batch import AD_LABELS, Batch
from derl.datapipes.features import FeatureJoiner
from derl.datapipes.readers import row_features
from derl.datapipes.snapshots import ENTITIES, Snapshot, SnapshotError, latest, pin, resolve, unpin
from derl.datapipes.snapshots.join import join_vectors, require_fits
from derl.datapipes.snapshots.redis_store import NotPublished, RedisUsers, connect
from derl.datapipes.sources import SourceTables
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import runs, scoring
from derl.launchers.runtime.settings import ServeConfig

INT64_MAX = 2**63 - 1
DRAIN_WAIT_S = 30.0  # how long a refresh waits for the old version's last requests before it skips a round
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BadRequest(Exception):
    """A request the service refuses: an HTTP status (4xx), the field at fault, why, and the
    version it was checked against (None where none was)."""

    def __init__(self, status: int, field: str, message: str, version: Optional[str] = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.version = status, field, version

    def body(self) -> Dict[str, Any]:
        out = {"error": str(self), "field": self.field}
        if self.version is not None:
            out["version"] = self.version
        return out


def _integer(value: Any, field: str, low: int = 0, high: int = INT64_MAX) -> int:
    """A JSON integer in [low, high] (not a bool, not a float), else a 422 naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(422, field, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise BadRequest(422, field, f"must be between {low} and {high}, got {value}")
    return value


def _object(body: Any, field: str = "body") -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(422, field, f"must be a JSON object, got {type(body).__name__}")
    return body


def _required(body: Dict[str, Any], key: str, field: str) -> Any:
    if key not in body:
        raise BadRequest(422, field, "is required")
    return body[key]


@dataclass(frozen=True)
class RankRequest:
    """One /v1/rank request, checked: a user, the context, and per candidate its Pin, slot and
    (where given) advertiser and campaign (-1: take the catalogue's)."""

    user_id: int
    ts: int
    surface: int
    pins: np.ndarray
    positions: np.ndarray
    advertisers: np.ndarray
    campaigns: np.ndarray


def parse_rank(body: Any, max_candidates: int, surfaces: int) -> RankRequest:
    """The /v1/rank body: {"user_id", "context": {"surface", "ts" (unix seconds, default now)},
    "candidates": [Pin id, or {"pin_id", "position", "advertiser_id", "campaign_id"}]}."""
    body = _object(body)
    user = _integer(_required(body, "user_id", "user_id"), "user_id")
    context = _object(_required(body, "context", "context"), "context")
    surface = _integer(_required(context, "surface", "context.surface"), "context.surface", 0, surfaces - 1)
    ts = _integer(context.get("ts", int(time.time())), "context.ts")
    candidates = _required(body, "candidates", "candidates")
    if not isinstance(candidates, list) or not candidates:
        raise BadRequest(422, "candidates", "must be a non-empty list of Pin ids or objects")
    if len(candidates) > max_candidates:
        raise BadRequest(422, "candidates", f"{len(candidates)} candidates, at most {max_candidates} "
                                            f"(--max-candidates)")
    cols: Dict[str, List[int]] = {k: [] for k in ("pin_id", "position", "advertiser_id", "campaign_id")}
    for i, c in enumerate(candidates):
        c = {"pin_id": c} if isinstance(c, int) and not isinstance(c, bool) else _object(c, f"candidates[{i}]")
        cols["pin_id"].append(_integer(_required(c, "pin_id", f"candidates[{i}].pin_id"),
                                       f"candidates[{i}].pin_id"))
        cols["position"].append(_integer(c.get("position", 0), f"candidates[{i}].position", 0, 2**15 - 1))
        for key in ("advertiser_id", "campaign_id"):
            cols[key].append(-1 if c.get(key) is None else _integer(c[key], f"candidates[{i}].{key}"))
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
    return RankRequest(user, ts, surface, arrays["pin_id"], arrays["position"], arrays["advertiser_id"],
                       arrays["campaign_id"])


class Version:
    """One snapshot version as the service holds it: verified, fitting the ranker, every table
    and ad index it serves read into memory, its user vectors from the version (embedded) or
    from Redis under its keys. `users` counts the requests holding it."""

    def __init__(self, snap: Snapshot, redis: Optional[RedisUsers]):
        self.snap, self.redis = snap, redis
        self.version, self.dim, self.domains = snap.version, snap.dim, snap.domains
        self.cut_day = snap.manifest["cut_day"]
        self.retrievable = [d for d in self.domains if snap.manifest["domains"][d]["rows"].get("ads", 0) > 0]
        self.users = 0
        self.retired = False

    def preload(self) -> None:
        """Read now what requests will read (every table but, with Redis, the users; every ad
        index), so that no request pays for it."""
        for d in self.domains:
            for entity in ENTITIES if self.redis is None else ("pins",):
                self.snap.table(d, entity)
        for d in self.retrievable:
            self.snap.ads_index(d)

    def table(self, domain: str, entity: str):
        """`domain`'s users or Pins, looked up by `lookup(ids)`: users from the store."""
        if entity == "users" and self.redis is not None:
            return self.redis.table(domain)
        return self.snap.table(domain, entity)

    def close(self) -> None:
        self.snap.close()
        self.snap = None  # the tables and indexes go with it


class Versions:
    """The live version, followed as LATEST moves (module docstring)."""

    def __init__(self, root: Path, load: Callable[[str], Version], owner: str,
                 say: Callable[[str], None], on_swap: Callable[[Version], None]):
        self.root, self.load, self.owner, self.say, self.on_swap = Path(root), load, owner, say, on_swap
        self.lock = threading.Lock()
        self.in_memory = 0
        self.most_in_memory = 0
        self.retiring: List[Version] = []
        self.refused: Dict[Tuple[str, int], str] = {}  # (version, folder inode) -> why
        self.waiting: Dict[str, str] = {}  # version -> why it cannot be served yet (not published)
        name = latest(self.root)
        if name is None:
            raise SnapshotError(f"{self.root}: no LATEST, so no version to serve")
        self.live = self._loaded(name)
        pin(self.root, self.live.version, owner)
        on_swap(self.live)

    def _loaded(self, name: str) -> Version:
        with self.lock:
            self.in_memory += 1
            self.most_in_memory = max(self.most_in_memory, self.in_memory)
        try:
            return self.load(name)
        except BaseException:
            with self.lock:
                self.in_memory -= 1
            raise

    def acquire(self) -> Version:
        with self.lock:
            live = self.live
            live.users += 1
        return live

    def release(self, version: Version) -> None:
        with self.lock:
            version.users -= 1
            done = version.retired and version.users == 0
        if done:
            self._let_go(version)

    def _let_go(self, version: Version) -> None:
        with self.lock:
            if version not in self.retiring:
                return
            self.retiring.remove(version)
            self.in_memory -= 1
        version.close()

    def refresh(self) -> str:
        """One look at LATEST: "same", "swapped", "refused", "waiting" (a version the user
        store does not hold yet) or "drain" (an old version still held: tried next time)."""
        try:
            name = latest(self.root)
            if name is None or name == self.live.version:
                return "same"
            key = (name, resolve(self.root, name).stat().st_ino)
        except (SnapshotError, OSError) as e:
            return self._refuse(("LATEST", 0), f"LATEST of {self.root}: {e}")
        if key in self.refused:
            return "refused"
        deadline = time.monotonic() + DRAIN_WAIT_S
        while self.retiring and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.retiring:
            return "drain"
        try:
            new = self._loaded(name)
        except NotPublished as e:
            if self.waiting.get(name) != str(e):
                self.say(f"version {name} not served yet: {e}; serving {self.live.version}")
            self.waiting[name] = str(e)
            return "waiting"
        except (SnapshotError, ValueError, OSError) as e:
            return self._refuse(key, f"version {name}: {e}")
        pin(self.root, new.version, self.owner)
        with self.lock:
            old, self.live = self.live, new
            old.retired = True
            self.retiring.append(old)
            unused = old.users == 0
        if old.version != new.version:
            unpin(self.root, self.owner, old.version)
        self.waiting.pop(name, None)
        self.on_swap(new)
        self.say(f"now serving version {new.version} (cut {new.cut_day}), was {old.version}")
        if unused:
            self._let_go(old)
        return "swapped"

    def _refuse(self, key: Tuple[str, int], why: str) -> str:
        if key not in self.refused:
            self.say(f"refused {why}; serving {self.live.version}")
        self.refused[key] = why
        return "refused"

    def close(self) -> None:
        """Unpin and let go of everything (the service stops)."""
        unpin(self.root, self.owner, self.live.version)
        for v in [self.live, *self.retiring]:
            if v.snap is not None:
                v.close()


class Metrics:
    """What /metrics exposes, in a registry of the service's own (Prometheus text)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

        disable_created_metrics()  # no `_created` twin of every series
        self.registry = CollectorRegistry()
        self.requests = Counter("derl_serve_requests", "requests answered, by route and HTTP status",
                                ("route", "status"), registry=self.registry)
        self.latency = Histogram("derl_serve_request_seconds", "time from a request's arrival to its answer",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("derl_serve_in_flight", "requests admitted and not yet answered",
                               registry=self.registry)
        self.live = Info("derl_serve_live_version", "the snapshot version requests get now",
                         registry=self.registry)
        self.cold_starts = Counter("derl_serve_cold_starts", "users and ads without a vector in the version "
                                   "asked (the ranker's no-vector path; 404 on /vector and /retrieve)",
                                   ("entity",), registry=self.registry)
        self.refreshes = Counter("derl_serve_refreshes", "looks at LATEST that found a new version, by outcome",
                                 ("outcome",), registry=self.registry)
        self.in_memory = Gauge("derl_serve_versions_in_memory", "snapshot versions loaded (at most two)",
                               registry=self.registry)


def require_servable(cfg: ServeConfig) -> Dict[str, Any]:
    """Before anything loads: --ranker is a finished snapshot ranker run, --snapshots a root
    with a LATEST, --data of the ranker's world; the ranker run's config."""
    meta = runs.kind_of(cfg.ranker, runs.RANKER, f"--ranker {cfg.ranker}")
    if meta["upstream"] != "snapshot":
        raise ValueError(f"--ranker {cfg.ranker}: an --upstream {meta['upstream']} ranker; derl serve scores with "
                         f"snapshot vectors, so it takes a ranker trained with --upstream snapshot")
    if runs.latest_checkpoint(cfg.ranker) is None:
        raise FileNotFoundError(f"--ranker {cfg.ranker}: no checkpoint, not a finished ranker run")
    if latest(cfg.snapshots) is None:
        raise SnapshotError(f"--snapshots {cfg.snapshots}: no LATEST, so no version to serve (derl export --out)")
    if cfg.data is not None:
        runs.require_world(f"--ranker {cfg.ranker}", meta.get("world"), meta["data"], cfg.data)
    return meta


class Service:
    """A trained ranker and the live snapshot version, answering /v1 requests (each method one
    route; they run on one worker thread, `serving_app`)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        meta = require_servable(cfg)
        self.data = Path(cfg.data or meta["data"])
        self.metrics = Metrics()
        # A process group of one: the sharded model wants one. One already there (a test's other
        # service) is shared, and left to its owner.
        self._own_group = not torch.distributed.is_initialized()
        worker = derl_dist.init()
        try:
            torch.set_num_threads(cfg.threads)
            import faiss

            faiss.omp_set_num_threads(cfg.threads)
            self.device = worker.device
            self.dmp, self.model = scoring.load_ranker(cfg.ranker, self.device)
            self.dmp.eval()
            self.taker = f"ranker {cfg.ranker}"
            self.joiner = FeatureJoiner(SourceTables(self.data), dict(self.model.num_embeddings))
            self.redis = connect(cfg.user_store, "--user-store") if cfg.user_store != "embedded" else None
            owner = f"derl serve --ranker {Path(cfg.ranker).resolve()} on {cfg.host}:{cfg.port}"
            self.versions = Versions(cfg.snapshots, self._load, owner, self._say, self._swapped)
        except BaseException:
            if self._own_group:
                derl_dist.shutdown()
            raise
        self.metrics.in_memory.set(self.versions.in_memory)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- versions ---------------------------------------------------------------------------

    def _load(self, name: str) -> Version:
        snap = Snapshot(self.cfg.snapshots, name)
        try:
            require_fits(snap, self.model.vectors, self.model.upstream_dim, self.taker)
            runs.require_world(f"snapshot {snap.version} of {self.cfg.snapshots}", snap.manifest.get("world"),
                               snap.manifest.get("data"), self.data)
            users = RedisUsers(self.redis, snap, self.cfg.user_store) if self.redis is not None else None
            version = Version(snap, users)
            version.preload()
        except BaseException:
            snap.close()
            raise
        return version

    def _swapped(self, version: Version) -> None:
        self.metrics.live.info({"version": version.version, "cut_day": version.cut_day})

    @staticmethod
    def _say(line: str) -> None:
        print(f"derl serve: {line}", file=sys.stderr, flush=True)

    def refresh(self) -> str:
        outcome = self.versions.refresh()
        if outcome != "same":
            self.metrics.refreshes.labels(outcome).inc()
        self.metrics.in_memory.set(self.versions.in_memory)
        return outcome

    def start(self) -> None:
        """Follow LATEST every --refresh-every seconds, in a thread of its own."""
        if self.cfg.refresh_every <= 0 or self._thread is not None:
            return

        def follow() -> None:
            while not self._stop.wait(self.cfg.refresh_every):
                try:
                    self.refresh()
                except Exception as e:  # a refresh never takes the service down
                    self._say(f"refresh failed: {type(e).__name__}: {e}; serving {self.versions.live.version}")

        self._thread = threading.Thread(target=follow, daemon=True, name="derl-serve-refresh")
        self._thread.start()

    def close(self) -> None:
        """Stop following LATEST, unpin the live version, let everything go (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(DRAIN_WAIT_S + 5)
        self.versions.close()
        if self._own_group:
            derl_dist.shutdown()

    def health(self) -> Dict[str, Any]:
        live = self.versions.live
        refused = dict(self.versions.refused)  # one step: the refresh thread may add to it meanwhile
        return {"status": "ok", "version": live.version, "cut_day": live.cut_day,
                "user_store": "embedded" if self.redis is None else self.cfg.user_store,
                "versions_in_memory": self.versions.in_memory, "most_versions_in_memory":
                self.versions.most_in_memory, "refused": {v: why for (v, _), why in refused.items()},
                "waiting": dict(self.versions.waiting), "pid": os.getpid()}

    def _holding(self, work: Callable[[Version], Dict[str, Any]]) -> Dict[str, Any]:
        """`work` on one version from start to end; the answer names it."""
        version = self.versions.acquire()
        try:
            return {"version": version.version, **work(version)}
        except BadRequest as e:
            e.version = version.version
            raise
        finally:
            self.versions.release(version)

    def _domain(self, version: Version, domain: Any, allowed: List[str]) -> str:
        if domain not in allowed:
            raise BadRequest(422, "domain", f"{domain!r} is not one of {', '.join(allowed)} "
                                            f"(version {version.version})")
        return domain

    def _unknown_user(self, user: int, domain: str) -> BadRequest:
        self.metrics.cold_starts.labels("user").inc()
        return BadRequest(404, "user_id", f"user {user} has no {domain} vector in this version (a cold start)")

    # -- routes -----------------------------------------------------------------------------

    def user_vector(self, user_id: str, domain: Optional[str]) -> Dict[str, Any]:
        """GET /v1/users/{id}/vector[?domain=D]: the user's vector of one domain, or of each."""
        try:
            user = _integer(int(user_id), "user_id")
        except ValueError:
            raise BadRequest(422, "user_id", f"must be a whole number, got {user_id!r}") from None

        def work(version: Version) -> Dict[str, Any]:
            domains = [self._domain(version, domain, version.domains)] if domain is not None else version.domains
            vectors = {}
            for d in domains:
                vector, missing = version.table(d, "users").lookup(np.array([user], dtype=np.int64))
                if missing[0]:
                    raise self._unknown_user(user, d)
                vectors[d] = vector[0].tolist()
            return {"user_id": user, "vectors": vectors}

        return self._holding(work)

    def retrieve(self, body: Any) -> Dict[str, Any]:
        """POST /v1/retrieve {"user_id", "k" (10), "domain" ("engagement")}: the top-k ads of the
        live version's ad index for the user's vector."""
        body = _object(body)
        user = _integer(_required(body, "user_id", "user_id"), "user_id")
        k = _integer(body.get("k", 10), "k", 1, self.cfg.max_k)
        domain = body.get("domain", "engagement")

        def work(version: Version) -> Dict[str, Any]:
            self._domain(version, domain, version.retrievable)
            vector, missing = version.table(domain, "users").lookup(np.array([user], dtype=np.int64))
            if missing[0]:
                raise self._unknown_user(user, domain)
            pins, scores = version.snap.search_ads(domain, vector, k)
            return {"user_id": user, "domain": domain,
                    "ads": [{"pin_id": int(p), "score": float(s)} for p, s in zip(pins[0], scores[0])]}

        return self._holding(work)

    def rank(self, body: Any) -> Dict[str, Any]:
        """POST /v1/rank: p_ctr and p_cvr of each candidate ad for the user in the context
        (`parse_rank`), from the ranker with the live version's vectors."""
        request = parse_rank(body, self.cfg.max_candidates, self.model.num_embeddings["surface"])
        return self._holding(lambda version: self._rank(version, request))

    def _rank(self, version: Version, r: RankRequest) -> Dict[str, Any]:
        n = len(r.pins)
        rows = {"user_id": np.full(n, r.user_id, dtype=np.int64), "pin_id": r.pins, "ts": np.full(n, r.ts),
                "surface": np.full(n, r.surface, dtype=np.int8), "position": r.positions,
                **self._ad_ids(r), **{c: np.zeros(n, dtype=np.int8) for c in AD_LABELS}}
        jagged = self.joiner.profile_features(rows["user_id"])
        pin_jagged, content, _, _ = row_features(self.joiner, "ad_events", rows)
        jagged.update(pin_jagged)
        upstream, missing = join_vectors(version.table, self.model.vectors, rows["user_id"], r.pins, version.dim)
        batch = Batch(sparse=self.joiner.sparse(jagged, n),
                      dense={"content_emb": torch.from_numpy(content), "upstream": torch.from_numpy(upstream),
                             "upstream_missing": torch.from_numpy(missing)}, labels={}, meta={})
        with torch.no_grad():
            _, out = self.dmp(batch.to(self.device))
        users = [j for j, v in enumerate(self.model.vectors) if v.endswith("/users")]
        cold_user = bool(missing[0, users].any()) if users else False
        cold_ads = missing[:, [j for j in range(len(self.model.vectors)) if j not in users]].any(axis=1)
        self.metrics.cold_starts.labels("user").inc(int(cold_user))
        self.metrics.cold_starts.labels("ad").inc(int(cold_ads.sum()))
        p_ctr = out["ctr"].cpu().numpy()
        p_cvr = out["cvr"].cpu().numpy() if "cvr" in out else None
        scores = [{"pin_id": int(p), "p_ctr": float(p_ctr[i]),
                   **({"p_cvr": float(p_cvr[i])} if p_cvr is not None else {}), "cold": bool(cold_ads[i])}
                  for i, p in enumerate(r.pins)]
        return {"user_id": r.user_id, "cold_user": cold_user, "scores": scores}

    def _ad_ids(self, r: RankRequest) -> Dict[str, np.ndarray]:
        """Each candidate's advertiser and campaign: the request's, else the catalogue's (an
        impression row carries its own). A Pin the catalogue holds as organic is no ad; one it
        does not hold needs both in the request."""
        e = self.joiner.entities
        row, found = e.pins.rows(r.pins)
        out = {}
        for key, given, known in (("advertiser_id", r.advertisers, e.advertiser),
                                  ("campaign_id", r.campaigns, e.campaign)):
            ours = np.where(found, known[row], -1)
            value = np.where(given >= 0, given, ours)
            for i in np.flatnonzero(value < 0)[:1]:
                pin_id = int(r.pins[i])
                if found[i] and e.advertiser[row[i]] < 0:
                    raise BadRequest(422, f"candidates[{i}].pin_id", f"Pin {pin_id} is not an ad")
                raise BadRequest(422, f"candidates[{i}].{key}", f"ad {pin_id} is not in the catalogue of "
                                                                f"{self.data} (or has no {key}): give its {key}")
            out[key] = value
        return out
