"""A snapshot version's user vectors in Redis: the online key-value store `derl serve
--user-store redis://...` reads, filled by `derl snapshots publish SNAP --redis URL`.

    derl:<version>@<content>:<domain>:users   a hash: user id (decimal) -> float32[dim], little-endian
    derl:<version>@<content>:meta             JSON: version, content, cut day, dim, users per domain
    derl:LATEST                               <version>@<content> of the newest published version
    derl:versions                             a sorted set of the <version>@<content> tags published

`<content>` is a digest of the version's file list (`content_id`): a version replaced under the
same name (`derl export --overwrite`) lands under new keys, never into the old ones. A publish
writes every hash first, then the meta key, then moves LATEST (never back to an earlier cut),
and only then sets the other versions' keys to expire: a reader that checks a version's meta key
before reading its hashes (`RedisUsers`) never reads a half-written version, and one still
serving the previous version keeps it for `expire_after` seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Dict, Optional, Tuple

import numpy as np

from derl.datapipes.snapshots.reader import Snapshot
from derl.datapipes.snapshots.store import SnapshotError

PREFIX = "derl"
LATEST_KEY = f"{PREFIX}:LATEST"
VERSIONS_KEY = f"{PREFIX}:versions"
WRITE_CHUNK = 10_000  # users per HSET: bounded command size, few round trips


class NotPublished(SnapshotError):
    """The store does not hold this version (yet): a reader waits for its publish."""


def content_id(manifest: dict) -> str:
    """A digest of a version's files (their sha256s): one version name, one content."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def tag_of(snap: Snapshot) -> str:
    return f"{snap.version}@{content_id(snap.manifest)}"


def _meta_key(tag: str) -> str:
    return f"{PREFIX}:{tag}:meta"


def _users_key(tag: str, domain: str) -> str:
    return f"{PREFIX}:{tag}:{domain}:users"


def connect(url: str, what: str = "--redis"):
    """A client of the Redis at `url` (redis://HOST:PORT[/DB]), answering: one that is not is
    refused naming `what` and the url."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if not url.startswith("redis://"):
        raise ValueError(f"{what} must be a redis://HOST:PORT[/DB] url, got {url!r}")
    # A store that stops answering fails a request after three tries of at most a second each,
    # not the client's default ten retries: the one worker thread of `derl serve` waits on it.
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1,
                                  retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2))
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        raise ValueError(f"{what} {url}: no Redis answers there ({e})") from None
    return client


def _order(meta: Optional[dict]) -> Tuple[str, str]:
    """Versions order by cut day, then creation, as the snapshot root's do (`store.catalogue`)."""
    return (meta["cut_day"], meta["created_at"]) if meta else ("", "")


def _read_meta(client, tag: Optional[str]) -> Optional[dict]:
    raw = client.get(_meta_key(tag)) if tag else None
    return json.loads(raw) if raw else None


def publish(snap: Snapshot, client, expire_after: int) -> Dict[str, object]:
    """Put the users of every domain of `snap` into Redis (module docstring): hashes, then the
    meta key, then LATEST, then the other versions set to expire in `expire_after` seconds.
    Publishing a version that is already there only makes it live again (no expiry)."""
    if expire_after < 1:
        raise ValueError(f"--expire-after must be at least 1 second, got {expire_after}")
    tag = tag_of(snap)
    client.zadd(VERSIONS_KEY, {tag: time.time()})  # before any write: a killed publish is expired later
    if client.exists(_meta_key(tag)):
        for key in client.scan_iter(match=f"{PREFIX}:{tag}:*"):
            client.persist(key)
    else:
        for domain in snap.domains:
            table = snap.table(domain, "users")
            rows = np.ascontiguousarray(table.vectors, dtype="<f4")
            for lo in range(0, len(table), WRITE_CHUNK):
                hi = min(lo + WRITE_CHUNK, len(table))
                client.hset(_users_key(tag, domain),
                            mapping={str(int(i)): rows[j].tobytes() for j, i in enumerate(table.ids[lo:hi], lo)})
        meta = {"version": snap.version, "content": content_id(snap.manifest), "cut_day": snap.manifest["cut_day"],
                "created_at": snap.manifest.get("created_at", ""), "dim": snap.dim,
                "users": {d: int(i["rows"]["users"]) for d, i in snap.manifest["domains"].items()},
                "published_at": time.time()}
        client.set(_meta_key(tag), json.dumps(meta))
    current = client.get(LATEST_KEY)
    current = current.decode() if current else None
    latest = tag
    if current != tag and _order(_read_meta(client, current)) > _order(_read_meta(client, tag)):
        latest = current  # a version cut earlier is published beside LATEST, which stays
    else:
        client.set(LATEST_KEY, tag)
    expiring = []
    for old in (m.decode() for m in client.zrange(VERSIONS_KEY, 0, -1)):
        if old not in (tag, latest):
            for key in client.scan_iter(match=f"{PREFIX}:{old}:*"):
                client.expire(key, expire_after)
            client.zrem(VERSIONS_KEY, old)
            expiring.append(old)
    return {"tag": tag, "latest": latest, "expiring": expiring,
            "users": {d: len(snap.table(d, "users")) for d in snap.domains}}


class RedisUsers:
    """The user vectors of one snapshot version, read from Redis: refused at once when the store
    does not hold that very version (its meta key is written last), so a reader never reads a
    half-written or another version."""

    def __init__(self, client, snap: Snapshot, url: str):
        self.client, self.dim = client, snap.dim
        self.tag = tag_of(snap)
        meta = _read_meta(client, self.tag)
        if meta is None:
            raise NotPublished(f"{url} does not hold version {snap.version} of {snap.path.parent} (content "
                                f"{content_id(snap.manifest)}): `derl snapshots publish {snap.path.parent} "
                                f"--version {snap.version} --redis {url}` puts it there")
        if meta["dim"] != snap.dim:
            raise SnapshotError(f"{url}: version {self.tag} holds vectors of dimension {meta['dim']}, "
                                f"its snapshot {snap.dim}")

    def table(self, domain: str) -> "RedisUserTable":
        return RedisUserTable(self.client, _users_key(self.tag, domain), self.dim)


class RedisUserTable:
    """One domain's users in Redis, looked up as `EmbeddingTable.lookup` looks up its rows."""

    def __init__(self, client, key: str, dim: int):
        self.client, self.key, self.dim = client, key, dim

    def lookup(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """([len(ids), dim] vectors, [len(ids)] missing flags); missing ids get zeros."""
        found = self.client.hmget(self.key, [str(int(i)) for i in ids])
        missing = np.array([v is None for v in found], dtype=bool)
        out = np.zeros((len(found), self.dim), dtype=np.float32)
        if (~missing).any():
            out[~missing] = np.frombuffer(b"".join(v for v in found if v is not None),
                                          dtype="<f4").reshape(-1, self.dim)
        return out, missing
