"""`derl serve` (launchers/runtime/serving.py, serving_app.py; docs/serving.md): /v1/rank scores
equal to `derl score`'s for the same rows, every answer naming its version, each bad request a
4xx naming its field, cold starts counted, overload a 503 with Retry-After, the refresh (swap,
pins, at most two versions, a corrupt or unfitting version refused while the old one serves),
the Redis user store and `derl snapshots publish` against a real redis-server, and
`derl bench --suite serve` at its smallest.

The service runs in-process behind Starlette's TestClient on the tiny pipeline's snapshot ranker
and a copy of its snapshot (one per module, `live`); the load and overload tests start `derl
serve` itself on 127.0.0.1 and a free port. Every load is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from derl.benchmarks import serve_bench
from derl.datapipes.snapshots import Snapshot, SnapshotError, gc, pinned, redis_store
from derl.launchers import cli
from derl.launchers.runtime.serving import BadRequest, Metrics, parse_rank
from derl.launchers.runtime.settings import ServeConfig
from helpers import derl, plant_snapshot

EVAL_DAY = "2026-01-08"  # the tiny world's evaluation day


def _ranker(tiny_pipeline) -> Path:
    return tiny_pipeline / "downstream" / "snapshot"


def _service(root: Path, ranker: Path, **settings):
    from derl.launchers.runtime.serving import Service

    return Service(ServeConfig(snapshots=root, ranker=ranker, refresh_every=0, **settings))


@pytest.fixture(scope="module")
def root(tiny_pipeline, tmp_path_factory) -> Path:
    """A copy of the tiny pipeline's LATEST version, in a root of this module's own."""
    out = tmp_path_factory.mktemp("serve") / "snapshots"
    serve_bench.copy_latest(tiny_pipeline / "snapshots", out)
    return out


@pytest.fixture(scope="module")
def live(root, tiny_pipeline):
    """(the service, a TestClient on its app), for the module; every test here leaves the root
    as it found it."""
    from starlette.testclient import TestClient

    from derl.launchers.runtime.serving_app import build_app

    service = _service(root, _ranker(tiny_pipeline), max_candidates=50, max_k=100)
    with TestClient(build_app(service)) as client:
        yield service, client


def _eval_rows(world: Path, n: int) -> dict:
    files = sorted((world / "ad_events" / f"ds={EVAL_DAY}").glob("*.parquet"))
    return pq.read_table(files[0]).slice(0, n).to_pydict()


def _rank_body(rows: dict, i: int, pins=None) -> dict:
    candidates = [{"pin_id": rows["pin_id"][j], "position": rows["position"][j]} for j in (pins or [i])]
    return {"user_id": rows["user_id"][i], "context": {"surface": rows["surface"][i], "ts": rows["ts"][i]},
            "candidates": candidates}


# --- requests, checked without a model ------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({"context": {"surface": 0}, "candidates": [1]}, "user_id"),
    ({"user_id": True, "context": {"surface": 0}, "candidates": [1]}, "user_id"),
    ({"user_id": -1, "context": {"surface": 0}, "candidates": [1]}, "user_id"),
    ({"user_id": 1.5, "context": {"surface": 0}, "candidates": [1]}, "user_id"),
    ({"user_id": 1, "candidates": [1]}, "context"),
    ({"user_id": 1, "context": {"surface": 3}, "candidates": [1]}, "context.surface"),
    ({"user_id": 1, "context": {"surface": 0, "ts": "noon"}, "candidates": [1]}, "context.ts"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": []}, "candidates"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": list(range(11))}, "candidates"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": [1, "2"]}, "candidates[1]"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": [{"position": 1}]}, "candidates[0].pin_id"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": [{"pin_id": 1, "position": -2}]},
     "candidates[0].position"),
    ({"user_id": 1, "context": {"surface": 0}, "candidates": [{"pin_id": 1, "campaign_id": 2**63}]},
     "candidates[0].campaign_id"),
])
def test_a_bad_rank_request_is_a_422_naming_its_field(body, field):
    with pytest.raises(BadRequest) as e:
        parse_rank(body, max_candidates=10, surfaces=3)
    assert e.value.status == 422 and e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_rank_request_takes_pin_ids_or_objects_and_defaults_the_slot_and_the_ad_ids():
    r = parse_rank({"user_id": 7, "context": {"surface": 2, "ts": 100},
                    "candidates": [5, {"pin_id": 6, "position": 3, "advertiser_id": 4, "campaign_id": 9}]}, 10, 3)
    assert (r.user_id, r.surface, r.ts) == (7, 2, 100)
    assert r.pins.tolist() == [5, 6] and r.positions.tolist() == [0, 3]
    assert r.advertisers.tolist() == [-1, 4] and r.campaigns.tolist() == [-1, 9]


@pytest.mark.parametrize("settings, says", [
    ({"port": 0}, "--port must be positive, got 0"),
    ({"port": 70000}, "--port must be at most 65535, got 70000"),
    ({"user_store": "http://127.0.0.1:6379"}, "--user-store must be 'embedded' or redis://HOST:PORT[/DB]"),
    ({"max_in_flight": 0}, "--max-in-flight must be positive, got 0"),
    ({"max_candidates": -1}, "--max-candidates must be positive, got -1"),
    ({"refresh_every": -1.0}, "--refresh-every must be 0 or more, got -1.0"),
    ({"refresh_every": float("inf")}, "--refresh-every must be a finite number, got inf"),
])
def test_serve_flags_are_checked_by_name(tmp_path, settings, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        ServeConfig(snapshots=tmp_path, ranker=tmp_path, **settings)


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    import socket

    from derl.launchers.stages import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--host 127.0.0.1 --port {port}: cannot listen there"):
            serve.run(ServeConfig(snapshots=tmp_path, ranker=tmp_path, port=port))


def test_the_serve_component_is_one_long_running_role_with_its_port_declared():
    from derl.launchers import components

    (role,) = components.serve("--snapshots", "S", "--ranker", "R", "--port", "9000", max_retries=2).roles
    assert role.args[:3] == ["-m", "derl.launchers.cli", "serve"] and role.num_replicas == 1
    assert role.max_retries == 2 and role.port_map == {"http": 9000}
    assert not components.serve("--snapshots", "S").roles[0].port_map  # the default port: nothing declared


def test_over_the_in_flight_limit_a_request_is_a_503_with_retry_after_and_health_still_answers():
    """Admission in front of an app whose requests wait until released: the limit's worth are
    admitted, the next is refused at once; /healthz is never held back; once one ends, the
    next is admitted again."""
    import httpx2

    from derl.launchers.runtime.serving_app import Admission

    release = asyncio.Event()

    async def app(scope, receive, send):
        if scope["path"].startswith("/v1/"):
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario():
        metrics = Metrics()
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=Admission(app, metrics, 2)),
                                     base_url="http://test") as client:
            held = [asyncio.ensure_future(client.post("/v1/rank", json={})) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await client.post("/v1/rank", json={})
            health = await client.get("/healthz")
            release.set()
            answered = await asyncio.gather(*held)
            again = await client.post("/v1/retrieve", json={})
        return metrics, refused, health, answered, again

    metrics, refused, health, answered, again = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "--max-in-flight 2" in refused.json()["error"]
    assert health.status_code == 200 and [r.status_code for r in answered] == [200, 200]
    assert again.status_code == 200
    assert metrics.requests.labels("/v1/rank", "503")._value.get() == 1
    assert metrics.requests.labels("/v1/rank", "200")._value.get() == 2


# --- the Redis layout, against a real redis-server ------------------------------------------------

def _planted(root: Path, version: str, cut: str, scale: float, dim: int = 4) -> dict:
    ids = np.arange(1, 6)
    vectors = {"engagement/users": (ids, np.eye(5, dim) * scale), "engagement/pins": (ids + 100, np.eye(5, dim)),
               "conversion/users": (ids, np.eye(5, dim)[::-1] * scale), "conversion/pins": (ids + 100, np.eye(5, dim))}
    plant_snapshot(root, version, cut, vectors, dim, ads=ids + 100)
    return vectors


@pytest.mark.slow
def test_publish_writes_versioned_keys_then_latest_and_expires_the_older_versions(tmp_path):
    import redis

    root = tmp_path / "snap"
    v1 = _planted(root, "v1", "2026-01-06", 1.0)
    _planted(root, "v2", "2026-01-07", 2.0)
    _planted(root, "v0", "2026-01-05", 3.0)  # a backfill: cut before the others
    with serve_bench.redis_server(tmp_path / "redis") as url:
        client = redis.Redis.from_url(url)
        with Snapshot(root, "v1") as s1, Snapshot(root, "v2") as s2, Snapshot(root, "v0") as s0:
            with pytest.raises(redis_store.NotPublished, match=f"derl snapshots publish {root} --version v1"):
                redis_store.RedisUsers(client, s1, url)
            done = redis_store.publish(s1, client, expire_after=600)
            tag1 = redis_store.tag_of(s1)
            assert done["tag"] == tag1 == client.get("derl:LATEST").decode() and done["expiring"] == []
            users = redis_store.RedisUsers(client, s1, url).table("engagement")
            got, missing = users.lookup(np.array([3, 1, 42]))
            np.testing.assert_array_equal(got[:2], v1["engagement/users"][1][[2, 0]])
            assert missing.tolist() == [False, False, True] and not got[2].any()
            # v2 takes LATEST; v1's keys then expire (not at once: a reader on v1 finishes)
            done = redis_store.publish(s2, client, expire_after=600)
            assert client.get("derl:LATEST").decode() == redis_store.tag_of(s2) and done["expiring"] == [tag1]
            assert 0 < client.ttl(f"derl:{tag1}:meta") <= 600
            assert 0 < client.ttl(f"derl:{tag1}:engagement:users") <= 600
            assert client.ttl(f"derl:{redis_store.tag_of(s2)}:meta") == -1
            # a backfill is published beside: LATEST stays
            done = redis_store.publish(s0, client, expire_after=600)
            assert done["latest"] == redis_store.tag_of(s2) == client.get("derl:LATEST").decode()
            # published again, v1 lives again
            redis_store.publish(s1, client, expire_after=600)
            assert client.ttl(f"derl:{tag1}:meta") == -1
            # a publish killed before its meta key: the half-written version is never read
            client.delete(f"derl:{tag1}:meta")
            assert client.exists(f"derl:{tag1}:engagement:users")
            with pytest.raises(redis_store.NotPublished):
                redis_store.RedisUsers(client, s1, url)


@pytest.mark.slow
def test_the_publish_command_and_its_bad_urls(tmp_path, capsys):
    root = tmp_path / "snap"
    _planted(root, "v1", "2026-01-06", 1.0)
    with serve_bench.redis_server(tmp_path / "redis") as url:
        cli.main(["snapshots", "publish", str(root), "--redis", url])
        line = capsys.readouterr().out
        assert line.startswith("published v1@") and "conversion 5 users, engagement 5 users" in line
    for bad, says in ((url, "no Redis answers there"), ("http://127.0.0.1:1", "must be a redis://")):
        with pytest.raises(SystemExit) as e:
            cli.main(["snapshots", "publish", str(root), "--redis", bad])
        assert e.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["snapshots", "publish", str(root)])
    assert "publish needs --redis" in capsys.readouterr().err


# --- the service in-process ----------------------------------------------------------------------

def test_rank_scores_equal_derl_scores_for_the_same_rows(live, tiny_pipeline, tmp_path):
    """The eval day's first rows, each as a request: p_ctr and p_cvr as `derl score` wrote them
    for those rows; several candidates in one request score as they do alone."""
    _, client = live
    derl("score", "--run", str(_ranker(tiny_pipeline)), "--out", str(tmp_path / "scores"))
    preds = {}
    for part in sorted((tmp_path / "scores" / "predictions").glob("*.parquet")):
        t = pq.read_table(part).to_pydict()
        preds.update({r: (c, v) for r, c, v in zip(t["request_id"], t["p_ctr"], t["p_cvr"])})
    rows = _eval_rows(tiny_pipeline / "world", 40)
    served, scored = [], []
    for i, request in enumerate(rows["request_id"]):
        answer = client.post("/v1/rank", json=_rank_body(rows, i)).json()
        assert answer["version"] == "2026-01-06"
        served.append((answer["scores"][0]["p_ctr"], answer["scores"][0]["p_cvr"]))
        scored.append(preds[request])
    np.testing.assert_allclose(served, scored, rtol=1e-5, atol=1e-7)
    together = client.post("/v1/rank", json=_rank_body(rows, 0, pins=list(range(10)))).json()["scores"]
    alone = [client.post("/v1/rank", json={**_rank_body(rows, 0), "candidates": [
        {"pin_id": rows["pin_id"][j], "position": rows["position"][j]}]}).json()["scores"][0] for j in range(10)]
    np.testing.assert_allclose([s["p_ctr"] for s in together], [s["p_ctr"] for s in alone], rtol=1e-5)
    assert [s["pin_id"] for s in together] == rows["pin_id"][:10]


def test_every_route_answers_from_the_live_version_and_names_it(live, root):
    service, client = live
    with Snapshot(root) as snap:
        user = int(snap.table("engagement", "users").ids[3])
        want = {d: snap.table(d, "users").lookup(np.array([user]))[0][0] for d in snap.domains}
        pins, scores, _ = snap.retrieve_ads("engagement", np.array([user]), 5)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["version"] == "2026-01-06" and health["user_store"] == "embedded"
    vectors = client.get(f"/v1/users/{user}/vector").json()
    assert vectors["version"] == "2026-01-06" and set(vectors["vectors"]) == set(want)
    for d, v in want.items():
        np.testing.assert_allclose(vectors["vectors"][d], v, rtol=1e-6)
    one = client.get(f"/v1/users/{user}/vector", params={"domain": "conversion"}).json()
    assert list(one["vectors"]) == ["conversion"]
    got = client.post("/v1/retrieve", json={"user_id": user, "k": 5}).json()
    assert got["version"] == "2026-01-06" and [a["pin_id"] for a in got["ads"]] == pins[0].tolist()
    np.testing.assert_allclose([a["score"] for a in got["ads"]], scores[0], rtol=1e-5)
    metrics = client.get("/metrics").text
    assert 'derl_serve_live_version_info{cut_day="2026-01-06",version="2026-01-06"} 1.0' in metrics
    assert 'derl_serve_requests_total{route="/v1/retrieve",status="200"}' in metrics
    assert 'derl_serve_request_seconds_bucket{le="0.005",route="/v1/retrieve"}' in metrics
    assert "derl_serve_versions_in_memory 1.0" in metrics


@pytest.mark.parametrize("method, path, body, status, field", [
    ("post", "/v1/rank", b"{not json", 400, "body"),
    ("post", "/v1/retrieve", b'{"user_id": 1, "k": 0}', 422, "k"),
    ("post", "/v1/retrieve", b'{"user_id": 1, "k": 101}', 422, "k"),
    ("post", "/v1/retrieve", b'{"user_id": 1, "domain": "nowhere"}', 422, "domain"),
    ("post", "/v1/retrieve", b'{"user_id": 999999999}', 404, "user_id"),
    ("get", "/v1/users/abc/vector", None, 422, "user_id"),
    ("get", "/v1/users/999999999/vector", None, 404, "user_id"),
    ("post", "/v1/rank", json.dumps({"user_id": 1, "context": {"surface": 0},
                                     "candidates": list(range(51))}).encode(), 422, "candidates"),
    ("post", "/v1/rank", b"x" * (2 << 20), 413, "body"),
])
def test_each_bad_request_is_a_4xx_naming_its_field(live, method, path, body, status, field):
    _, client = live
    answer = client.get(path) if method == "get" else client.post(path, content=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["error"].startswith(f"{field}: ")


def test_an_organic_pin_or_an_ad_outside_the_catalogue_is_refused_naming_the_candidate(live, tiny_pipeline):
    from derl.datapipes.sources import SourceTables

    _, client = live
    pins = SourceTables(tiny_pipeline / "world").read("pins", columns=["pin_id", "is_ad"]).to_pydict()
    organic = next(p for p, ad in zip(pins["pin_id"], pins["is_ad"]) if not ad)
    ad = next(p for p, is_ad in zip(pins["pin_id"], pins["is_ad"]) if is_ad)
    body = {"user_id": 1, "context": {"surface": 0}, "candidates": [ad, organic]}
    answer = client.post("/v1/rank", json=body)
    assert answer.status_code == 422 and answer.json()["field"] == "candidates[1].pin_id"
    assert answer.json()["version"] == "2026-01-06"
    unknown = 10**9
    answer = client.post("/v1/rank", json={**body, "candidates": [unknown]})
    assert answer.status_code == 422 and answer.json()["field"] == "candidates[0].advertiser_id"
    given = {"pin_id": unknown, "advertiser_id": 1, "campaign_id": 4}
    answer = client.post("/v1/rank", json={**body, "candidates": [given]})
    assert answer.status_code == 200 and answer.json()["scores"][0]["cold"] is True


def test_a_cold_user_or_ad_takes_the_rankers_no_vector_path_and_is_counted(live, root, tiny_pipeline):
    from derl.datapipes.sources import SourceTables

    service, client = live
    pins = SourceTables(tiny_pipeline / "world").read("pins", columns=["pin_id", "is_ad"]).to_pydict()
    ads = np.array([p for p, ad in zip(pins["pin_id"], pins["is_ad"]) if ad])
    with Snapshot(root) as snap:
        _, absent = snap.table("engagement", "pins").lookup(ads)
        known_user = int(snap.table("engagement", "users").ids[0])
    cold_ad, warm_ad = int(ads[absent][0]), int(ads[~absent][0])  # in the catalogue; not in the snapshot
    counted = service.metrics.cold_starts.labels
    users, ads_before = counted("user")._value.get(), counted("ad")._value.get()
    body = {"user_id": 10**9, "context": {"surface": 1, "ts": 1767830400}, "candidates": [warm_ad, cold_ad]}
    answer = client.post("/v1/rank", json=body).json()
    assert answer["cold_user"] is True and [s["cold"] for s in answer["scores"]] == [False, True]
    assert all(0 < s["p_ctr"] < 1 and 0 < s["p_cvr"] < 1 for s in answer["scores"])
    warm = client.post("/v1/rank", json={**body, "user_id": known_user}).json()
    assert warm["cold_user"] is False and warm["scores"][0]["p_ctr"] != answer["scores"][0]["p_ctr"]
    assert counted("user")._value.get() == users + 1 and counted("ad")._value.get() == ads_before + 2


def _corrupt(root: Path, version: str) -> None:
    part = sorted((root / version / "engagement" / "users").glob("*.parquet"))[0]
    with open(part, "ab") as f:
        f.write(b"\0")


def test_a_refresh_swaps_in_one_step_pins_the_live_version_and_refuses_a_bad_one_while_the_old_serves(
        live, tiny_pipeline, tmp_path, capsys):
    """On a root of its own: an in-flight request keeps the old version through the swap (two
    in memory, never three); the new one is pinned, the old unpinned and let go after the
    request; a corrupt version and one of another dimension are refused, logged once, and the
    live one serves on (pinned: gc does not take it though LATEST moved past it)."""
    base_root = tmp_path / "snap"
    base = serve_bench.copy_latest(tiny_pipeline / "snapshots", base_root)
    vectors = serve_bench.vectors_of(base_root, base)
    service = _service(base_root, _ranker(tiny_pipeline))
    versions = service.versions
    owner = versions.owner
    try:
        old = versions.acquire()  # a request in flight on the base version
        serve_bench.refreshed_version(base_root, vectors, "r1", seed=0)
        assert service.refresh() == "swapped" and versions.live.version == "r1"
        assert versions.in_memory == 2 and old.snap is not None  # still held: still whole
        user = int(vectors["tables"]["engagement/users"][0][0])
        before = old.table("engagement", "users").lookup(np.array([user]))[0]
        versions.release(old)
        assert versions.in_memory == 1 and old.snap is None
        assert {v: owners for v, owners in pinned(base_root).items() if owner in owners} == {"r1": [owner]}
        now = service.retrieve({"user_id": user, "k": 3})
        assert now["version"] == "r1"
        assert not np.allclose(versions.live.table("engagement", "users").lookup(np.array([user]))[0], before)

        serve_bench.refreshed_version(base_root, vectors, "r2", seed=0)
        _corrupt(base_root, "r2")
        wide = {k: (ids, np.pad(v, ((0, 0), (0, 4)))) for k, (ids, v) in vectors["tables"].items()}
        assert service.refresh() == "refused" and service.refresh() == "refused"
        assert "r2" in service.health()["refused"] and "checksum mismatch" in service.health()["refused"]["r2"]
        assert capsys.readouterr().err.count("refused version r2") == 1
        gc(base_root, keep=1)  # LATEST is r2: only the pin keeps r1
        assert service.rank({"user_id": user, "context": {"surface": 0}, "candidates": [
            int(vectors["ads"][0])]})["version"] == "r1"
        plant_snapshot(base_root, "r3", vectors["cut_day"], wide, vectors["dim"] + 4, ads=vectors["ads"])
        assert service.refresh() == "refused"
        assert f"dimension {vectors['dim'] + 4}, but ranker {_ranker(tiny_pipeline)} takes vectors of dimension " \
               f"{vectors['dim']}" in service.health()["refused"]["r3"]
        serve_bench.refreshed_version(base_root, vectors, "r4", seed=0)
        assert service.refresh() == "swapped" and service.health()["version"] == "r4"
        assert versions.most_in_memory == 2
        assert service.metrics.refreshes.labels("refused")._value.get() == 3
    finally:
        service.close()
    assert not [v for v, owners in pinned(base_root).items() if owner in owners]  # unpinned when it stops


def test_the_service_refuses_to_start_on_a_snapshot_that_does_not_fit_the_ranker(live, tiny_pipeline, tmp_path):
    ranker = _ranker(tiny_pipeline)
    narrow = tmp_path / "narrow"
    _planted(narrow, "n1", "2026-01-06", 1.0, dim=8)
    with pytest.raises(SnapshotError,
                       match=re.escape(f"dimension 8, but ranker {ranker} takes vectors of dimension 16")):
        _service(narrow, ranker)
    one_domain = tmp_path / "one"
    ids = np.arange(5)
    plant_snapshot(one_domain, "e1", "2026-01-06", {"engagement/users": (ids, np.eye(5, 16)),
                                                    "engagement/pins": (ids, np.eye(5, 16))}, 16, ads=ids)
    with pytest.raises(SnapshotError, match=re.escape(f"no conversion/users table (domains: ['engagement']), but "
                                                      f"ranker {ranker} takes engagement/users, engagement/pins")):
        _service(one_domain, ranker)
    from derl.launchers.stages import serve

    with pytest.raises(ValueError, match="an --upstream none ranker"):
        serve.validate(ServeConfig(snapshots=narrow, ranker=tiny_pipeline / "downstream" / "none"))
    with pytest.raises(SnapshotError, match="no LATEST"):
        serve.validate(ServeConfig(snapshots=tmp_path / "nowhere", ranker=ranker))


@pytest.mark.slow
def test_the_redis_user_store_gives_the_embedded_stores_answers_and_waits_for_a_publish(
        live, root, tiny_pipeline, tmp_path):
    import redis
    from starlette.testclient import TestClient

    from derl.launchers.runtime.serving_app import build_app

    _, embedded = live
    own = tmp_path / "snap"
    base = serve_bench.copy_latest(root, own)
    rows = _eval_rows(tiny_pipeline / "world", 5)
    with serve_bench.redis_server(tmp_path / "redis") as url:
        with pytest.raises(redis_store.NotPublished, match="does not hold version"):
            _service(own, _ranker(tiny_pipeline), user_store=url)
        with Snapshot(own) as snap:
            redis_store.publish(snap, redis_store.connect(url), expire_after=60)
        service = _service(own, _ranker(tiny_pipeline), user_store=url)
        with TestClient(build_app(service)) as client:
            assert client.get("/healthz").json()["user_store"] == url
            for i in range(5):
                assert client.post("/v1/rank", json=_rank_body(rows, i)).json() == \
                    embedded.post("/v1/rank", json=_rank_body(rows, i)).json()
            user = rows["user_id"][0]
            assert client.get(f"/v1/users/{user}/vector").json() == embedded.get(f"/v1/users/{user}/vector").json()
            assert client.post("/v1/retrieve", json={"user_id": user}).json() == \
                embedded.post("/v1/retrieve", json={"user_id": user}).json()
            # a new version not yet in Redis: the service waits on the old one, then moves
            serve_bench.refreshed_version(own, serve_bench.vectors_of(own, base), "r1", seed=0)
            assert service.refresh() == "waiting" and service.health()["version"] == base
            assert "r1" in service.health()["waiting"]
            with Snapshot(own, "r1") as snap:
                redis_store.publish(snap, redis_store.connect(url), expire_after=60)
            assert service.refresh() == "swapped" and client.get("/healthz").json()["version"] == "r1"
            # the store goes away: 503 with Retry-After, never a crash
            with contextlib.suppress(redis.exceptions.ConnectionError):
                redis.Redis.from_url(url).shutdown(nosave=True)
            answer = client.post("/v1/rank", json=_rank_body(rows, 0))
            assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
            assert answer.json()["error"].startswith("user store unavailable")
            assert client.get("/healthz").json()["status"] == "ok"


# --- derl serve itself, under load ---------------------------------------------------------------

@pytest.mark.slow
def test_derl_serve_overloaded_answers_503_never_crashes_and_stops_unpinned(root, tiny_pipeline, tmp_path):
    own = tmp_path / "snap"
    serve_bench.copy_latest(root, own)
    wires = serve_bench.requests_for(own, "rank", 8, 50, 10, seed=0)
    with serve_bench.derl_serve(own, _ranker(tiny_pipeline), tmp_path / "serve.log", "--max-in-flight", "2",
                                "--refresh-every", "0") as (port, proc):
        assert any("derl serve --ranker" in o for owners in pinned(own).values() for o in owners)
        burst = serve_bench.summarise(serve_bench.drive(port, wires, 2000, 0.05, 64, 10.0), 2000, 0.05)
        assert set(burst["statuses"]) <= {"200", "503"} and burst["statuses"].get("503", 0) > 0
        calm = serve_bench.summarise(serve_bench.drive(port, wires, 20, 0.5, 4, 10.0), 20, 0.5)
        assert calm["errors"] == 0 and serve_bench.health(port)["status"] == "ok"
    assert proc.returncode == 0
    assert not any("derl serve" in o for owners in pinned(own).values() for o in owners)


@pytest.mark.slow
def test_derl_bench_suite_serve_at_its_smallest(root, tiny_pipeline, tmp_path):
    """Both routes and both stores at one low rate each, then a refresh every 0.75 s under load:
    no error, no mixed answer, several versions served, never more than two in memory."""
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "serve", "--out", str(out), "--snapshots", str(root),
            "--ranker", str(_ranker(tiny_pipeline)), "--retrieve-rates", "20", "--rank-rates", "10",
            "--step-s", "1", "--retrieve-rate", "40", "--rank-rate", "20", "--refresh-s", "0.75",
            "--refresh-run-s", "3", "--candidates", "20", "--k", "10", "--pool", "8"]
    cli.main(argv)  # exits non-zero on an error or a mixed answer under refresh
    result = json.loads((out / "serve.json").read_text())
    rows = result["rows"]
    assert {(r["route"], r["store"], r["refresh"]) for r in rows} == {
        (route, store, refresh) for route in ("retrieve", "rank") for store in ("embedded", "redis")
        for refresh in (False, True)}
    for r in rows:
        assert r["answered_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] and r["server_peak_rss_mb"] > 100
        assert r["errors"] == 0 and r["mixed"] == 0, r
    for store, server in result["meta"]["servers"].items():
        # versions landed while requests ran (the refresher runs at a lower priority: on a busy
        # machine one route's run may see no swap, the store's two runs together do)
        assert any(r["versions"] >= 2 for r in rows if r["store"] == store and r["refresh"])
        assert server["last_version"] != "2026-01-06" and server["most_versions_in_memory"] == 2
        assert server["versions_refused"] == 0
    assert result["meta"]["refresh_errors"] == 0 and result["meta"]["refresh_mixed"] == 0
    assert result["meta"]["command"] == "derl " + " ".join(argv)
    assert set(result["meta"]["held"]) == {"retrieve/embedded", "retrieve/redis", "rank/embedded", "rank/redis"}
    assert (out / "serve.md").is_file() and (out / "serve.png").is_file()
    shutil.rmtree(out / "work")
