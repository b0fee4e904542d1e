"""The synthetic ads world: every source table (docs/data.md), drawn from one latent space in which
organic behaviour is rich and the ad signal sparse, the regime where decoupled upstream
embeddings pay off (the generative story: datapipes/README.md; its knobs: `WorldConfig`).
Generation is vectorised and streams day by day (memory: the static tables and one day of
events) into a hidden folder renamed into place (`place_world`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from derl.datapipes import schema as S
from derl.datapipes.sequences import SequenceBuffer

WORLD_META = "_world.json"
T = TypeVar("T")


def world_id(identity: dict) -> str:
    """A world's id (`_world.json`'s `world_id`): a digest of what made it, the generator's seed
    and config or the imported inputs' sha256 and the import's options, so the same world
    written twice has the same id and another world another. Every run, snapshot and ranker
    records the id of the world it came from, and the stages that hand over check it."""
    return "w" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_world_id(root: Path) -> Optional[str]:
    """The id of the world at `root`; a world written before derl recorded one gets the digest
    of its `_world.json`; None for a folder of tables without one (unidentified: not checked)."""
    path = Path(root) / WORLD_META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return meta.get("world_id") or world_id({"_world.json": meta})


@dataclass(frozen=True)
class WorldConfig:
    num_users: int
    num_pins: int
    num_days: int
    start_day: str = "2026-01-01"
    latent_dim: int = 16
    num_topics: int = 64
    num_categories: int = 16  # coarse: several topics share a category
    num_countries: int = 20
    pin_noise: float = 0.35  # spread of a Pin around its topic
    content_noise: float = 0.5  # noise of the content embedding's view of the Pin
    user_noise: float = 0.35  # spread of a user around their topic mix
    daily_drift: float = 0.05  # std of the daily random walk of user interests
    popularity_alpha: float = 1.05  # Zipf exponent of Pin popularity
    relevant_share: float = 0.6  # share of impressions drawn from the user's own topics
    mean_activity: float = 0.5  # mean probability that a user is active on a day
    organic_per_active_user: float = 15.0  # mean organic impressions per active user and day
    ad_fraction: float = 0.05  # share of Pins that are ads
    num_advertisers: int = 200
    campaigns_per_advertiser: int = 4
    ads_per_active_user: float = 3.0  # mean ad impressions per active user and day
    ad_targeting: float = 0.4  # share of ad impressions targeted at the user's topics
    click_affinity: float = 3.0  # weight of user-ad affinity in the click logit
    click_bias: float = -5.0
    click_noise: float = 0.7
    conversion_affinity: float = 2.5
    conversion_bias: float = -3.3
    cold_days: int = 2  # cold users and Pins appear on the last days only
    cold_user_fraction: float = 0.05
    cold_pin_fraction: float = 0.05
    sequence_length: int = 32
    row_group_size: int = 65_536


WORLD_PRESETS: Dict[str, WorldConfig] = {
    # Seconds to make; big enough that a model can tell signal from noise.
    "tiny": WorldConfig(num_users=2_000, num_pins=6_000, num_days=8, num_topics=32, num_advertisers=40,
                        ad_fraction=0.1, ads_per_active_user=6.0, row_group_size=4_096),
    # What `make demo` and the benchmarks use. Ad-heavy on purpose, so that the evaluation day
    # has enough conversions to tell a CVR gain from noise; more ad than organic impressions,
    # unlike a real feed, but the ad signal stays the sparse one: organic actions outnumber ad
    # clicks (tests/test_world.py checks both). The figures and the earlier preset this
    # replaced: docs/departures.md, "The demo world's ad volume".
    "demo": WorldConfig(num_users=20_000, num_pins=100_000, num_days=14, ad_fraction=0.08,
                        ads_per_active_user=20.0, click_bias=-4.5, conversion_bias=-1.8, row_group_size=16_384),
    # The freshness study's (benchmarks/studies/freshness.py): the demo world's ad volume over 19
    # days, so that vectors up to a week old and weekly retraining fit before the evaluation day,
    # with new users and Pins arriving over the last week rather than the last two days, and half
    # the demo world's users and Pins, so that its hundred-odd stages fit an hour on two cores.
    "freshness": WorldConfig(num_users=10_000, num_pins=50_000, num_days=19, ad_fraction=0.08,
                             ads_per_active_user=20.0, click_bias=-4.5, conversion_bias=-1.8, cold_days=7,
                             row_group_size=16_384),
    # Its test-sized twin: the tiny world over 12 days.
    "freshness-tiny": WorldConfig(num_users=2_000, num_pins=6_000, num_days=12, num_topics=32, num_advertisers=40,
                                  ad_fraction=0.1, ads_per_active_user=6.0, cold_days=4, row_group_size=4_096),
    # The scale check: >= 1M users, 5M Pins, 100M engagements, in bounded memory.
    "large": WorldConfig(num_users=1_000_000, num_pins=5_000_000, num_days=14, num_topics=256, num_categories=64,
                         num_advertisers=20_000, ad_fraction=0.02, row_group_size=262_144),
}

AGE_BUCKETS = 7
GENDERS = 3


def id_sizes(cfg: WorldConfig) -> Dict[str, int]:
    """The sizes of the id columns a world of `cfg` writes, without writing it: what its models'
    tables hold (`feature_vocab`), for planning a world too large to generate here."""
    return {"user_id": cfg.num_users, "country": cfg.num_countries, "age_bucket": AGE_BUCKETS,
            "gender": GENDERS, "pin_id": cfg.num_pins, "category": cfg.num_categories,
            "advertiser_id": cfg.num_advertisers,
            "campaign_id": cfg.num_advertisers * cfg.campaigns_per_advertiser}


SURFACE_PROBS = np.array([0.6, 0.25, 0.15])
SURFACE_ENGAGEMENT_BIAS = np.array([0.0, 0.4, 0.2])  # search and related Pins engage more
SURFACE_CLICK_BIAS = np.array([0.0, 0.5, 0.2])
MAIN_TOPIC_SHARE = 0.7  # of a user's topical organic impressions, the share from their first topic


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class _Entities:
    """The static latent state of the world (users drift in place, day by day)."""

    topic_centres: np.ndarray  # [T, K]
    user_latent: np.ndarray  # [U, K] float32, drifts
    user_topics: np.ndarray  # [U, 2]
    user_activity: np.ndarray  # [U]
    user_peak_hour: np.ndarray  # [U]
    user_intent: np.ndarray  # [U] propensity to convert
    user_signup_day: np.ndarray  # [U] day index (negative: before the window)
    pin_latent: np.ndarray  # [P, K]
    pin_topic: np.ndarray  # [P]
    pin_popularity: np.ndarray  # [P]
    pin_quality: np.ndarray  # [P]
    pin_created_day: np.ndarray  # [P]
    pin_is_ad: np.ndarray  # [P] bool
    pin_advertiser: np.ndarray  # [P] (-1 for organic)
    advertiser_quality: np.ndarray  # [A]


class _TopicSampler:
    """Draws Pins in proportion to popularity, from a given topic or from all of them.

    Pins are sorted by topic once, so a draw within topic t is a searchsorted into the slice of
    one cumulative array: vectorised over millions of draws.
    """

    def __init__(self, topic: np.ndarray, weight: np.ndarray, num_topics: int):
        self.order = np.argsort(topic, kind="stable")
        self.cum = np.cumsum(weight[self.order], dtype=np.float64)
        ends = np.searchsorted(topic[self.order], np.arange(num_topics), side="right")
        starts = np.concatenate([[0], ends[:-1]])
        self.lo = np.where(starts > 0, self.cum[np.maximum(starts - 1, 0)], 0.0)
        self.hi = np.where(ends > 0, self.cum[np.maximum(ends - 1, 0)], 0.0)

    def draw(self, rng: np.random.Generator, topics: Optional[np.ndarray], n: int) -> np.ndarray:
        if topics is None:
            lo, hi = np.zeros(n), np.full(n, self.cum[-1])
        else:
            lo, hi = self.lo[topics], self.hi[topics]
            empty = hi <= lo  # a topic with no live Pin falls back to the whole catalogue
            lo, hi = np.where(empty, 0.0, lo), np.where(empty, self.cum[-1], hi)
        r = lo + rng.random(n) * (hi - lo)
        idx = np.searchsorted(self.cum, r, side="right")
        return self.order[np.minimum(idx, len(self.order) - 1)]


def _make_entities(cfg: WorldConfig, rng: np.random.Generator) -> _Entities:
    K, T, U, P = cfg.latent_dim, cfg.num_topics, cfg.num_users, cfg.num_pins
    centres = _unit(rng.standard_normal((T, K)))
    topic_weight = rng.dirichlet(np.full(T, 2.0))

    pin_topic = rng.choice(T, size=P, p=topic_weight)
    pin_latent = _unit(centres[pin_topic] + cfg.pin_noise * rng.standard_normal((P, K)))
    rank = rng.permutation(P) + 1
    pin_popularity = rank ** (-cfg.popularity_alpha)
    pin_quality = 0.3 * rng.standard_normal(P)
    pin_created = np.where(
        rng.random(P) < cfg.cold_pin_fraction,
        rng.integers(cfg.num_days - cfg.cold_days, cfg.num_days, P),
        -rng.integers(1, 365, P),
    )
    is_ad = rng.random(P) < cfg.ad_fraction
    advertiser = np.where(is_ad, rng.integers(0, cfg.num_advertisers, P), -1)

    user_topics = np.stack(
        [rng.choice(T, size=U, p=topic_weight), rng.choice(T, size=U, p=topic_weight)], axis=1
    )
    mix = rng.uniform(0.55, 0.9, size=(U, 1))
    user_latent = _unit(
        mix * centres[user_topics[:, 0]]
        + (1 - mix) * centres[user_topics[:, 1]]
        + cfg.user_noise * rng.standard_normal((U, K))
    )
    activity = np.clip(rng.beta(1.2, 1.2 / cfg.mean_activity - 1.2, U), 0.02, 1.0)
    signup = np.where(
        rng.random(U) < cfg.cold_user_fraction,
        rng.integers(cfg.num_days - cfg.cold_days, cfg.num_days, U),
        -rng.integers(1, 1000, U),
    )
    return _Entities(
        topic_centres=centres,
        user_latent=user_latent.astype(np.float32),
        user_topics=user_topics,
        user_activity=activity,
        user_peak_hour=rng.integers(0, S.NUM_HOURS, U),
        user_intent=0.5 * rng.standard_normal(U),
        user_signup_day=signup,
        pin_latent=pin_latent.astype(np.float32),
        pin_topic=pin_topic,
        pin_popularity=pin_popularity,
        pin_quality=pin_quality,
        pin_created_day=pin_created,
        pin_is_ad=is_ad,
        pin_advertiser=advertiser,
        advertiser_quality=0.4 * rng.standard_normal(cfg.num_advertisers),
    )


def _write(table: pa.Table, path: Path, row_group_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def _dates(start_day: str, day_index: np.ndarray) -> pa.Array:
    """Day indices relative to the world's first day, as Arrow dates."""
    epoch_day = (S.parse_day(start_day) - dt.date(1970, 1, 1)).days
    return pa.array((epoch_day + day_index).astype(np.int32)).cast(pa.date32())


def _users_table(cfg: WorldConfig, e: _Entities, rng: np.random.Generator) -> pa.Table:
    U = cfg.num_users
    # Profiles carry a little signal: country leans on the main topic, age on one latent axis.
    country = np.where(
        rng.random(U) < 0.3, e.user_topics[:, 0] % cfg.num_countries, rng.integers(0, cfg.num_countries, U)
    )
    age = np.clip(np.round(3 + 2 * e.user_latent[:, 0] + rng.normal(0, 1, U)), 0, AGE_BUCKETS - 1)
    return pa.table(
        {
            "user_id": pa.array(np.arange(U, dtype=np.int64)),
            "country": pa.array(country.astype(np.int32)),
            "age_bucket": pa.array(age.astype(np.int8)),
            "gender": pa.array(rng.integers(0, GENDERS, U).astype(np.int8)),
            "signup_ds": _dates(cfg.start_day, e.user_signup_day),
        },
        schema=S.USERS.schema,
    )


def _pins_table(cfg: WorldConfig, e: _Entities, rng: np.random.Generator) -> pa.Table:
    P = cfg.num_pins
    projection = rng.standard_normal((cfg.latent_dim, S.CONTENT_DIM)).astype(np.float32)
    projection /= np.sqrt(cfg.latent_dim)
    content = e.pin_latent @ projection
    content += cfg.content_noise * rng.standard_normal(content.shape).astype(np.float32)
    category = e.pin_topic * cfg.num_categories // cfg.num_topics
    campaign = np.where(
        e.pin_is_ad,
        e.pin_advertiser * cfg.campaigns_per_advertiser
        + rng.integers(0, cfg.campaigns_per_advertiser, P),
        -1,
    )
    return pa.table(
        {
            "pin_id": pa.array(np.arange(P, dtype=np.int64)),
            "category": pa.array(category.astype(np.int32)),
            "content_emb": pa.FixedSizeListArray.from_arrays(
                pa.array(content.astype(np.float32).ravel()), S.CONTENT_DIM
            ),
            "is_ad": pa.array(e.pin_is_ad),
            "advertiser_id": pa.array(e.pin_advertiser, mask=~e.pin_is_ad, type=pa.int64()),
            "campaign_id": pa.array(campaign, mask=~e.pin_is_ad, type=pa.int64()),
            "created_ds": _dates(cfg.start_day, e.pin_created_day),
        },
        schema=S.PINS.schema,
    )


def _p_hide(affinity: np.ndarray) -> np.ndarray:
    return _sigmoid(-5.0 * affinity - 3.0)


def _p_closeup(affinity: np.ndarray, quality: np.ndarray, surface_bias) -> np.ndarray:
    return _sigmoid(4.0 * affinity + quality + surface_bias - 1.8)


def _p_save_given_closeup(affinity: np.ndarray) -> np.ndarray:
    return _sigmoid(6.0 * affinity - 3.0)


def _draw_outcomes(rng: np.random.Generator, affinity: np.ndarray, quality: np.ndarray,
                   surface: np.ndarray) -> np.ndarray:
    """The strongest action per impression; each action answers affinity differently."""
    n = len(affinity)
    hide = rng.random(n) < _p_hide(affinity)
    closeup = rng.random(n) < _p_closeup(affinity, quality, SURFACE_ENGAGEMENT_BIAS[surface])
    save = closeup & (rng.random(n) < _p_save_given_closeup(affinity))
    click = closeup & (rng.random(n) < _sigmoid(2.5 * affinity + quality - 1.2))
    long_click = click & (rng.random(n) < _sigmoid(4.0 * affinity - 1.5))
    action = np.full(n, S.Action.IMPRESSION, dtype=np.int8)
    action[closeup] = S.Action.CLOSEUP
    action[click] = S.Action.CLICK
    action[long_click] = S.Action.LONG_CLICK
    action[save] = S.Action.SAVE
    action[hide] = S.Action.HIDE
    return action


def _timestamps(rng: np.random.Generator, peak_hour: np.ndarray, day0: int) -> np.ndarray:
    hour = (peak_hour + np.round(rng.normal(0, 3, len(peak_hour))).astype(np.int64)) % S.NUM_HOURS
    return day0 + hour * 3600 + rng.integers(0, 3600, len(peak_hour))


def _drift(cfg: WorldConfig, e: _Entities, rng: np.random.Generator) -> None:
    """A day's random walk of the user interests: the first draw of the day's generator."""
    e.user_latent += (cfg.daily_drift * rng.standard_normal(e.user_latent.shape)).astype(np.float32)
    e.user_latent /= np.linalg.norm(e.user_latent, axis=1, keepdims=True)


def _ad_logits(cfg: WorldConfig, e: _Entities, user: np.ndarray, pin: np.ndarray,
               surface: np.ndarray, position: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user·ad affinity, click logit before its noise, conversion-given-click logit) of ad
    impressions."""
    affinity = np.einsum("ij,ij->i", e.user_latent[user], e.pin_latent[pin])
    advertiser = e.advertiser_quality[e.pin_advertiser[pin]]
    click = (cfg.click_affinity * affinity + advertiser + SURFACE_CLICK_BIAS[surface]
             - 0.08 * position + cfg.click_bias)
    conversion = cfg.conversion_affinity * affinity + e.user_intent[user] + advertiser + cfg.conversion_bias
    return affinity, click, conversion


def hidden_state(root: Path, day: str) -> Tuple[WorldConfig, _Entities]:
    """A generated world's config and hidden state as they were on `day`, rebuilt from its seed."""
    if not (Path(root) / WORLD_META).is_file():
        raise ValueError(f"{root}: no {WORLD_META}, not a world made by `derl generate`; only a "
                         f"synthetic world knows its hidden state")
    meta = json.loads((Path(root) / WORLD_META).read_text())
    if meta.get("source") == "import":
        raise ValueError(f"{root} was imported from {meta['format']}: it has no generator, so no "
                         f"latent truth")
    if day not in meta["days"]:
        raise ValueError(f"{root}: day {day} is not one of the world's days "
                         f"{meta['days'][0]}..{meta['days'][-1]}")
    cfg, seed = WorldConfig(**meta["config"]), meta["seed"]
    e = _make_entities(cfg, np.random.default_rng([seed, 0]))
    for d in range(meta["days"].index(day) + 1):
        _drift(cfg, e, np.random.default_rng([seed, 1, d]))
    return cfg, e


def latent_state(root: Path, day: str) -> Tuple[np.ndarray, np.ndarray]:
    """([users, K], [Pins, K]) unit latents of a generated world as they were on `day`, rows in
    id order: the ground truth no model sees (a user·Pin dot is the affinity that drives every
    outcome), rebuilt from the world's seed for tests and benchmarks to measure against."""
    _, e = hidden_state(root, day)
    return e.user_latent, e.pin_latent


def ad_truth(root: Path, day: str, ads: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The world's own answer for ad impressions of `day` (arrays user_id, pin_id, surface,
    position, as in ad_events): the user·ad "affinity", P("click") with the click noise
    integrated out, and P("conversion") given a click. No model can beat these probabilities
    on average: they are the ceiling a benchmark measures the rankers against."""
    cfg, e = hidden_state(root, day)
    user, pin = np.asarray(ads["user_id"]), np.asarray(ads["pin_id"])
    affinity, click, conversion = _ad_logits(cfg, e, user, pin, np.asarray(ads["surface"]), np.asarray(ads["position"]))
    # E[sigmoid(z + noise·N(0, 1))] by Gauss-Hermite quadrature (probabilists' weights sum to sqrt(2 pi)).
    nodes, weights = np.polynomial.hermite_e.hermegauss(32)
    p_click = _sigmoid(click[:, None] + cfg.click_noise * nodes[None, :]) @ (weights / weights.sum())
    return {"affinity": affinity, "click": p_click, "conversion": _sigmoid(conversion)}


def log_expected_saves(cfg: WorldConfig, e: _Entities, day_index: int, users: np.ndarray) -> np.ndarray:
    """[len(users), Pins] log of each user's expected organic saves of each Pin on a day whose
    state `e` is (`hidden_state`): P(the Pin is shown) x P(save | shown), surfaces averaged. The
    world's own ranking for retrieval, which no model's beats on average."""
    live = e.pin_created_day <= day_index
    pop = e.pin_popularity * live
    topic_pop = np.bincount(e.pin_topic, weights=pop, minlength=cfg.num_topics)[e.pin_topic]
    topic = e.pin_topic[None, :]
    topical = (MAIN_TOPIC_SHARE * (topic == e.user_topics[users, :1])
               + (1 - MAIN_TOPIC_SHARE) * (topic == e.user_topics[users, 1:]))
    shown = cfg.relevant_share * topical * pop / topic_pop + (1 - cfg.relevant_share) * pop / pop.sum()
    a = e.user_latent[users] @ e.pin_latent.T
    closeup = sum(p * _p_closeup(a, e.pin_quality, bias) for p, bias in zip(SURFACE_PROBS, SURFACE_ENGAGEMENT_BIAS))
    return np.log(shown * closeup * _p_save_given_closeup(a) * (1 - _p_hide(a)) + 1e-30)


def _simulate_day(cfg: WorldConfig, e: _Entities, campaign: np.ndarray, day_index: int,
                  day0: int, rng: np.random.Generator, request_id_base: int):
    """One day's organic engagements and ad events, as Arrow tables, plus the active users."""
    _drift(cfg, e, rng)

    live_pin = e.pin_created_day <= day_index
    organic = _TopicSampler(e.pin_topic, e.pin_popularity * live_pin, cfg.num_topics)
    ads = _TopicSampler(e.pin_topic, e.pin_popularity * (live_pin & e.pin_is_ad), cfg.num_topics)

    signed_up = e.user_signup_day <= day_index
    active = np.flatnonzero(signed_up & (rng.random(cfg.num_users) < e.user_activity))

    # Organic: many impressions per active user, a mix of relevant and popular Pins.
    n_org = rng.poisson(cfg.organic_per_active_user * (0.5 + e.user_activity[active]))
    user = np.repeat(active, n_org)
    topic = e.user_topics[user, (rng.random(len(user)) > MAIN_TOPIC_SHARE).astype(np.int64)]
    relevant = rng.random(len(user)) < cfg.relevant_share
    pin = np.where(relevant, organic.draw(rng, topic, len(user)), organic.draw(rng, None, len(user)))
    surface = rng.choice(S.NUM_SURFACES, size=len(user), p=SURFACE_PROBS)
    affinity = np.einsum("ij,ij->i", e.user_latent[user], e.pin_latent[pin])
    action = _draw_outcomes(rng, affinity, e.pin_quality[pin], surface)
    ts = _timestamps(rng, e.user_peak_hour[user], day0)
    order = np.argsort(ts, kind="stable")
    engagements = pa.table(
        {
            "user_id": user[order].astype(np.int64),
            "pin_id": pin[order].astype(np.int64),
            "action": action[order],
            "ts": ts[order],
            "surface": surface[order].astype(np.int8),
        },
        schema=S.ENGAGEMENTS.schema,
    )

    # Ads: few impressions, rare noisy clicks, rarer conversions.
    n_ad = rng.poisson(cfg.ads_per_active_user, len(active))
    ad_user = np.repeat(active, n_ad)
    m = len(ad_user)
    targeted = rng.random(m) < cfg.ad_targeting
    ad_topic = e.user_topics[ad_user, 0]
    ad_pin = np.where(targeted, ads.draw(rng, ad_topic, m), ads.draw(rng, None, m))
    ad_surface = rng.choice(S.NUM_SURFACES, size=m, p=SURFACE_PROBS)
    position = np.minimum(rng.geometric(0.25, m) - 1, 31)
    advertiser = e.pin_advertiser[ad_pin]
    _, click_logit, conv_logit = _ad_logits(cfg, e, ad_user, ad_pin, ad_surface, position)
    click_logit = click_logit + cfg.click_noise * rng.standard_normal(m)
    clicked = rng.random(m) < _sigmoid(click_logit)
    converted = clicked & (rng.random(m) < _sigmoid(conv_logit))
    ad_ts = _timestamps(rng, e.user_peak_hour[ad_user], day0)
    order = np.argsort(ad_ts, kind="stable")
    ad_events = pa.table(
        {
            "request_id": request_id_base + np.arange(m, dtype=np.int64),
            "user_id": ad_user[order].astype(np.int64),
            "pin_id": ad_pin[order].astype(np.int64),
            "advertiser_id": advertiser[order].astype(np.int64),
            "campaign_id": campaign[ad_pin[order]],
            "ts": ad_ts[order],
            "surface": ad_surface[order].astype(np.int8),
            "position": position[order].astype(np.int16),
            "clicked": clicked[order].astype(np.int8),
            "converted": converted[order].astype(np.int8),
        },
        schema=S.AD_EVENTS.schema,
    )
    day_users = np.union1d(np.unique(user), np.unique(ad_user))
    return engagements, ad_events, day_users


def generate(out: Path, cfg: WorldConfig, seed: int, overwrite: bool = False,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the world into `out`: into a hidden folder beside it, renamed into place once
    complete (`place_world`)."""
    return place_world(out, overwrite, lambda tmp: _write_world(tmp, cfg, seed, progress))


def place_world(out: Path, overwrite: bool, write: Callable[[Path], T]) -> T:
    """Run `write(tmp)` on a hidden folder beside `out`, then rename it into place: nothing
    half-written is ever at `out`. `overwrite` replaces only a world (a folder holding
    `_world.json`, generated or imported) or an empty folder, and the old world goes only once
    the new one is in place; a failed `write` leaves the old one whole and nothing beside it."""
    out = Path(out).resolve()  # `--out .` names no folder to write beside
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        if not (out.is_dir() and ((out / WORLD_META).is_file() or not any(out.iterdir()))):
            raise FileExistsError(f"--overwrite: {out} holds no {WORLD_META}, so it is not a world "
                                  f"`derl generate` or `derl import` wrote; refusing to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return result


def _write_world(tmp: Path, cfg: WorldConfig, seed: int,
                 progress: Optional[Callable[[str], None]]) -> dict:
    """Every table and `_world.json` into `tmp`, day by day."""
    t0 = time.time()
    rng = np.random.default_rng([seed, 0])
    e = _make_entities(cfg, rng)
    users = _users_table(cfg, e, rng)
    pins = _pins_table(cfg, e, rng)
    _write(users, tmp / "users" / "part-0.parquet", cfg.row_group_size)
    _write(pins, tmp / "pins" / "part-0.parquet", cfg.row_group_size)
    campaign = pins.column("campaign_id").to_numpy(zero_copy_only=False)
    campaign = np.nan_to_num(campaign.astype(np.float64), nan=-1).astype(np.int64)
    del users, pins

    seqs = SequenceBuffer(cfg.num_users, cfg.sequence_length)
    start = S.parse_day(cfg.start_day)
    counts = {"engagements": 0, "ad_events": 0, "user_sequences": 0, "clicks": 0, "conversions": 0}
    request_id = 0
    for d in range(cfg.num_days):
        day = start + dt.timedelta(days=d)
        ds = f"ds={day:%Y-%m-%d}"
        day_rng = np.random.default_rng([seed, 1, d])
        eng, ad_table, day_users = _simulate_day(
            cfg, e, campaign, d, S.day_start_ts(day), day_rng, request_id
        )
        request_id += ad_table.num_rows
        # Sequences as of the day's start: written before the day's events enter the buffer.
        seq_table = seqs.rows(day_users)
        _write(eng, tmp / "engagements" / ds / "part-0.parquet", cfg.row_group_size)
        _write(ad_table, tmp / "ad_events" / ds / "part-0.parquet", cfg.row_group_size)
        _write(seq_table, tmp / "user_sequences" / ds / "part-0.parquet", cfg.row_group_size)
        positive = eng.column("action").to_numpy() != S.Action.IMPRESSION
        seqs.append(
            eng.column("user_id").to_numpy()[positive],
            eng.column("pin_id").to_numpy()[positive],
            eng.column("action").to_numpy()[positive],
            eng.column("ts").to_numpy()[positive],
        )
        counts["engagements"] += eng.num_rows
        counts["ad_events"] += ad_table.num_rows
        counts["user_sequences"] += seq_table.num_rows
        counts["clicks"] += int(pc.sum(ad_table.column("clicked")).as_py() or 0)
        counts["conversions"] += int(pc.sum(ad_table.column("converted")).as_py() or 0)
        if progress:
            progress(f"{day:%Y-%m-%d}: {eng.num_rows:,} engagements, {ad_table.num_rows:,} ad events")

    meta = {
        "world_id": world_id({"seed": seed, "config": dataclasses.asdict(cfg)}),
        "seed": seed,
        "config": dataclasses.asdict(cfg),
        "days": [f"{start + dt.timedelta(days=d):%Y-%m-%d}" for d in range(cfg.num_days)],
        "rows": {"users": cfg.num_users, "pins": cfg.num_pins, **counts},
        "ctr": counts["clicks"] / max(counts["ad_events"], 1),
        "cvr_given_click": counts["conversions"] / max(counts["clicks"], 1),
        "generate_seconds": round(time.time() - t0, 1),
    }
    (tmp / WORLD_META).write_text(json.dumps(meta, indent=2))
    return meta
