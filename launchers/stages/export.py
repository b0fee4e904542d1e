"""`derl export`: upstream checkpoints -> a versioned embedding snapshot.

    derl export --data WORLD --upstream engagement=RUN_E --upstream conversion=RUN_C \
                --out SNAPSHOTS [--cut DAY] [--nproc N] [--retention-days 90]

Three steps. Plan: every rank works out the same version, models and entity lists. Embed: every
rank embeds its own share of users (their sequences as of the cut) and Pins with each domain's
model, without gradients, and streams its vectors into its own parts (with --previous, then
aligns and smooths them onto that version): no table is ever gathered on one rank. Publish:
rank 0 builds each domain's ad index and commits the version with its manifest (rows, data
window, checkpoints, throughput, the upstream runs' headline metrics). The snapshot format, and
what a run that dies half-way leaves behind, is `derl.datapipes.snapshots`'.

Refused before any worker starts: a version or --previous that is not a plain name, an --out
that is a file, an --upstream of an unknown domain, given twice, or naming a run of another domain
or of another world than --data (`upstream_runs`), a cut on or before a day an upstream checkpoint
trained on (its vectors would know the days they are joined to), a snapshot whose users or Pins
would be empty, and an --overwrite of anything but derl's own, unpinned version. Vectors that
are not finite stop the export before its commit (`_embed_domain`), and the commit checks the
tables again (`SnapshotWriter.commit`). The manifest records the world's id and, per domain, the
run, its domain and the days its checkpoint trained on.

Retention: an entity's last activity is the latest `ts` of its rows in `engagements` and
`ad_events` before the cut day (user_id for users, pin_id for Pins). One with no activity in the
logs counts from the later of its `signup_ds` / `created_ds` and the first day the logs hold
(`activity_days`): what happened before the logs is unknown, not idleness. Entities whose last
activity lies more than --retention-days before the cut's start are not exported (nor indexed,
for ads); the manifest records `retention_days`, `idle_before`, the days of activity read and
`dropped_idle` counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from derl.datapipes.domains import DOMAINS
from derl.datapipes.features import FeatureJoiner
from derl.datapipes.sequences import sequences_as_of
from derl.datapipes.snapshots import (PartWriter, Snapshot, SnapshotError, SnapshotWriter, nonfinite_rows, plain_name,
                                     refuse_replacing, resolve)
from derl.datapipes.snapshots.refresh import refresh_domain
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import read_world_id
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime import faults, runs
from derl.launchers.runtime.embedding import Chunk, rank_chunks
from derl.launchers.runtime.finite import NonFiniteError
from derl.launchers.runtime.settings import ExportConfig
from derl.models import checkpoint
from derl.models.sharding import OptimConfig, shard_model
from derl.models.upstream import DERM, UpstreamConfig

DAY_S = 86_400
ACTIVITY_TABLES = ("engagements", "ad_events")  # what counts as activity, for retention


def activity_tables(sources: SourceTables) -> List[str]:
    return [t for t in ACTIVITY_TABLES if sources.has(t)]


class Upstream(NamedTuple):
    """One domain's upstream run as the export takes it: its newest checkpoint and the days
    that checkpoint trained on (`runs.checkpoint_days`)."""
    run: Path
    checkpoint: Path
    days: Tuple[str, str]


def upstream_runs(cfg: ExportConfig) -> Dict[str, Upstream]:
    """domain -> its upstream run, from --upstream DOMAIN=RUN: each domain a known one, given
    once, its run an upstream run of that domain and of --data's world, holding a checkpoint."""
    out: Dict[str, Upstream] = {}
    for spec in cfg.upstream:
        domain, sep, run = spec.partition("=")
        if not sep:
            raise ValueError(f"--upstream {spec!r}: expected DOMAIN=RUN")
        if domain not in DOMAINS:
            raise ValueError(f"--upstream {spec}: no domain {domain!r}; the domains are {', '.join(DOMAINS)}")
        if domain in out:
            raise ValueError(f"--upstream {domain} is given twice ({out[domain].run} and {run}): one run per domain")
        run = Path(run)
        config = runs.kind_of(run, runs.UPSTREAM, f"--upstream {spec}")
        if config["domain"] != domain:
            raise ValueError(f"--upstream {spec}: {run} trained the {config['domain']} domain (its {runs.CONFIG}), "
                             f"not {domain}")
        runs.require_world(f"--upstream {spec}", config.get("world"), config["data"], cfg.data)
        ckpt = runs.latest_checkpoint(run)
        if ckpt is None:
            raise FileNotFoundError(f"--upstream {spec}: no checkpoint under {run / runs.CHECKPOINTS}")
        out[domain] = Upstream(run, ckpt, runs.checkpoint_days(run, ckpt))
    return out


def _model_configs(upstream: Dict[str, Upstream]) -> Tuple[Dict[str, UpstreamConfig], int]:
    """Each domain's model config, and the embedding dimension they share."""
    configs = {d: runs.upstream_model_config(u.run) for d, u in upstream.items()}
    dims = {c.embedding_dim for c in configs.values()}
    if len(dims) != 1:
        raise ValueError(f"--upstream: the runs disagree on the embedding dimension: {dims}")
    return configs, dims.pop()


def _previous_version(cfg: ExportConfig) -> Optional[str]:
    """--previous as a version name (None: LATEST)."""
    return None if cfg.previous == "latest" else cfg.previous


def validate(cfg: ExportConfig) -> None:
    """Configuration errors, caught before any worker starts (the values themselves are
    `ExportConfig`'s): names, the root, the plan, what --overwrite would replace, --previous."""
    if cfg.version is not None:
        plain_name(cfg.version, "--version")
    if cfg.previous not in (None, "latest"):
        plain_name(cfg.previous, "--previous")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise FileExistsError(f"--out {cfg.out}: a file, not a snapshot root")
    plan = _plan(cfg, SourceTables(cfg.data))
    final = cfg.out / plan.version
    if final.exists() or final.is_symlink():
        if not cfg.overwrite:
            raise FileExistsError(f"{final}: version exists; pass --overwrite to replace it")
        refuse_replacing(cfg.out, plan.version)
    if cfg.previous:
        resolve(cfg.out, _previous_version(cfg))


def run(cfg: ExportConfig) -> Optional[dict]:
    """One worker's part of an export (every rank runs this); rank 0 returns the manifest."""
    return derl_dist.run_as_worker(_export, cfg)


def _export(cfg: ExportConfig, worker: derl_dist.Worker) -> Optional[dict]:
    t0 = time.perf_counter()
    sources = SourceTables(cfg.data)
    plan = _plan(cfg, sources)
    writer = SnapshotWriter(cfg.out, plan.version, plan.dim)
    if worker.is_main:
        writer.prepare()
    try:
        dist.barrier()
        domains = _embed(cfg, plan, sources, writer, worker)
        faults.reached("export-parts", worker.rank, worker.world_size)
        dist.barrier()
        if not worker.is_main:
            return None
        return _publish(cfg, plan, sources, writer, domains, worker.world_size, t0)
    except BaseException:  # a full disk, Ctrl-C, a rank that failed: the parts would hold the disk
        if worker.is_main:
            writer.abort()
        raise


def _embed(cfg: ExportConfig, plan: ExportPlan, sources: SourceTables, writer: SnapshotWriter,
           worker: derl_dist.Worker) -> Dict[str, dict]:
    """Collective: this rank's parts of every domain's tables, smoothed with `--previous`'s
    vectors where it is given (closed before the commit, so an `--overwrite` of it is not
    held open)."""
    share = _share(cfg, plan, sources, worker)
    domains: Dict[str, dict] = {}
    previous = Snapshot(cfg.out, _previous_version(cfg)) if cfg.previous else None
    try:
        for domain in plan.runs:
            domains[domain] = _embed_domain(plan, domain, share, writer, worker)
            if previous is not None:
                domains[domain]["refresh"] = refresh_domain(writer, previous, domain, worker.rank, cfg.weight,
                                                            cfg.align, worker.device)
    finally:
        if previous is not None:
            previous.close()
    return domains


# --- plan: what every rank works out alike ----------------------------------------------------

@dataclass(frozen=True)
class ExportPlan:
    cut: str
    version: str
    world: Optional[str]  # the id of --data's world (`read_world_id`), for the manifest
    runs: Dict[str, Upstream]
    configs: Dict[str, UpstreamConfig]
    dim: int
    users: np.ndarray  # sorted
    pins: np.ndarray  # in the order of the pins table
    ads: np.ndarray  # sorted
    retention: dict  # for the manifest


def _plan(cfg: ExportConfig, sources: SourceTables) -> ExportPlan:
    upstream = upstream_runs(cfg)
    configs, dim = _model_configs(upstream)
    cut = cfg.cut or default_split(sources.days("engagements")).cut_day
    cut_name = f"--cut {cut}" if cfg.cut else f"the default cut {cut}"
    for domain, u in upstream.items():
        first, last = u.days
        if cut <= last:
            raise ValueError(f"{cut_name}: --upstream {domain}={u.run} trained on {first}..{last}; a snapshot's "
                             f"cut must come after every day its upstream runs trained on")
    users, pins, ads, retention = _entities(sources, cut, cfg.retention_days)
    if not len(users) or not len(pins):
        raise SnapshotError(
            f"{cut_name}: the snapshot would hold {len(users):,} users and {len(pins):,} Pins (activity "
            f"read: {retention['activity_days'] or 'none before the cut'}; idle over --retention-days "
            f"{cfg.retention_days}: {retention['dropped_idle']}); an empty snapshot is never published")
    return ExportPlan(cut, cfg.version or cut, read_world_id(cfg.data), upstream, configs, dim, users, pins,
                np.sort(ads), retention)


def _last_activity(sources: SourceTables, cut_s: int, day_before: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"user_id": (sorted ids, latest ts of each), "pin_id": (...)} over the rows of `engagements`
    and `ad_events` strictly before the cut's start. Reads the two id columns and `ts` only, one
    day partition at a time (memory bounded by a day); per-id maxima are Arrow group-bys."""
    maxima: Dict[str, list] = {"user_id": [], "pin_id": []}
    for table in activity_tables(sources):
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
    activity_days = sorted(d for t in activity_tables(sources) for d in sources.days(t) if d <= day_before)
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
    # The retrieval catalogue: the ads, or every Pin of a world that has none (an imported
    # UserBehavior or MovieLens log: its items are what retrieval is for).
    catalogue = keep_pins & is_ad if is_ad.any() else keep_pins
    retention["catalogue"] = "ads" if is_ad.any() else "all pins (the source has no ads)"
    return (np.sort(user_ids[keep_users]), pin_ids[keep_pins], pin_ids[catalogue], retention)


# --- embed: each rank its own parts -----------------------------------------------------------

class Share(NamedTuple):
    """This rank's users and Pins in equal chunks (`rank_chunks`), and their features."""
    users: List[Chunk]
    pins: List[Chunk]
    joiner: FeatureJoiner


def _share(cfg: ExportConfig, plan: ExportPlan, sources: SourceTables, worker: derl_dist.Worker) -> Share:
    users = rank_chunks(plan.users, worker.rank, worker.world_size, cfg.batch_size)
    pins = rank_chunks(plan.pins, worker.rank, worker.world_size, cfg.batch_size)
    joiner = FeatureJoiner(sources)
    seq_len = max(c.seq_len for c in plan.configs.values())
    my_users = np.unique(np.concatenate([ids for ids, _ in users]))
    joiner.set_sequences(plan.cut, sequences_as_of(sources, plan.cut, seq_len, my_users))
    return Share(users, pins, joiner)


@torch.no_grad()
def _embed_part(path: Path, chunks: List[Chunk], embed, make_batch, device: torch.device,
                dim: int) -> Tuple[int, int]:
    """Embed the chunks and stream them into one part; returns (rows written, rows not finite)."""
    bad = 0
    with PartWriter(path, dim) as part:
        for ids, real in chunks:
            vectors = embed(make_batch(ids).to(device))[:real].float().cpu().numpy()
            bad += nonfinite_rows(vectors)
            part.write(ids[:real], vectors)
    return part.rows, bad


def _embed_domain(plan: ExportPlan, domain: str, share: Share, writer: SnapshotWriter,
                  worker: derl_dist.Worker) -> dict:
    """Collective. This rank's parts of the domain's users and Pins; the domain's manifest entry.
    Stops every rank, before anything is published, when any vector is not finite."""
    (run, ckpt, days), model_cfg = plan.runs[domain], plan.configs[domain]
    dmp, optimizer, _ = shard_model(DERM(model_cfg, table_device=torch.device("meta")), worker.device, OptimConfig())
    checkpoint.load(ckpt, dmp, optimizer)
    dmp.eval()
    start = time.perf_counter()
    users = _embed_part(writer.part(domain, "users", worker.rank), share.users,
                        lambda b: dmp.module.embed_users(b.sparse, b.dense),
                        lambda u: share.joiner.user_batch(u, plan.cut), worker.device, plan.dim)
    pins = _embed_part(writer.part(domain, "pins", worker.rank), share.pins,
                       lambda b: dmp.module.embed_pins(b.sparse, b.dense),
                       share.joiner.pin_batch, worker.device, plan.dim)
    counts = torch.tensor([users[0], pins[0], users[1], pins[1]], dtype=torch.long, device=worker.device)
    dist.all_reduce(counts)
    n_users, n_pins, bad_users, bad_pins = (int(c) for c in counts)
    if bad_users or bad_pins:
        raise NonFiniteError(f"--upstream {domain}={run}: {bad_users:,} of {n_users:,} user and {bad_pins:,} of "
                             f"{n_pins:,} Pin vectors are not finite (NaN or inf), from {ckpt}; nothing was published")
    seconds = time.perf_counter() - start
    return {
        "run": str(run),
        "domain": domain,  # the run's own (`upstream_runs` refuses a run of another)
        "checkpoint": str(ckpt),
        "train_days": list(days),
        "rows": {"users": n_users, "pins": n_pins},
        "entities_per_s": (n_users + n_pins) / seconds,
        "upstream_metrics": _headline(run),
        # What the dot means: retrieval by P(Pin | user) scores dot / temperature +
        # retrieval_prior_weight x log(the Pin's share of impressions), as the ads index
        # does (`ad_prior`); the dot alone is affinity, popularity left out at weight 1.
        "dot": {"temperature": model_cfg.temperature,
                "logq_strength": model_cfg.logq_strength,
                "retrieval_prior_weight": model_cfg.retrieval_prior_weight},
    }


def _headline(run: Path) -> dict:
    """The run's headline metrics; none for a run that stopped before writing its metrics."""
    try:
        return runs.headline(runs.read_metrics(run))
    except FileNotFoundError:
        return {}


# --- publish: rank 0, once every part is written ----------------------------------------------

def ad_prior(sources: SourceTables, days: Tuple[str, str], ad_ids: np.ndarray,
             temperature: float, weight: float) -> np.ndarray:
    """Per ad, temperature x weight x log(its share of the ad impressions in `days`): added to
    the dot, it ranks ads by dot / temperature + weight x log q (`UpstreamConfig.
    retrieval_prior_weight`). An ad never shown counts as half an impression. In a source
    without ad impressions the catalogue is its Pins, and q their share of the engagements."""
    table = "ad_events" if sources.has("ad_events") else "engagements"
    have = [d for d in sources.days(table) if days[0] <= d <= days[1]]
    shown = (sources.read(table, (have[0], have[-1]), columns=["pin_id"]).column("pin_id").to_numpy()
             if have else np.zeros(0, np.int64))
    counts = np.bincount(np.searchsorted(ad_ids, shown[np.isin(shown, ad_ids)]), minlength=len(ad_ids))
    share = np.maximum(counts, 0.5) / max(counts.sum(), 1)
    return (temperature * weight * np.log(share)).astype(np.float32)


def _publish(cfg: ExportConfig, plan: ExportPlan, sources: SourceTables, writer: SnapshotWriter,
             domains: Dict[str, dict], world_size: int, t0: float) -> dict:
    """Each domain's ad index (with its popularity prior where the model asks for one), then
    the manifest and the commit."""
    for domain, info in domains.items():
        model_cfg, prior = plan.configs[domain], None
        if model_cfg.retrieval_prior_weight:
            prior = ad_prior(sources, tuple(info["train_days"]), plan.ads, model_cfg.temperature,
                             model_cfg.retrieval_prior_weight)
        info["ads_index"] = writer.ads_index(domain, plan.ads, prior)
        info["rows"]["ads"] = info["ads_index"]["size"]
    manifest = writer.commit({
        "cut_day": plan.cut,
        "data": str(cfg.data),
        "world": plan.world,
        "dim": plan.dim,
        "normalised": True,
        **plan.retention,
        "domains": domains,
        "world_size": world_size,
        "wall_s": round(time.perf_counter() - t0, 2),
    }, replace=cfg.overwrite, reached=faults.reached)
    idle = plan.retention["dropped_idle"]
    print(f"snapshot {plan.version}: " + ", ".join(
        f"{d} {i['rows']['users']:,} users, {i['rows']['pins']:,} pins, {i['rows']['ads']:,} indexed as "
        f"{plan.retention['catalogue']} "
        f"({i['entities_per_s']:,.0f} entities/s)" for d, i in domains.items())
        + f"; idle over {plan.retention['retention_days']} days, left out: {idle['users']:,} users, "
        f"{idle['pins']:,} pins ({idle['ads']:,} ads) -> {writer.final}")
    return manifest
