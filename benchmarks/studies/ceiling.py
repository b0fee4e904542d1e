"""Ceilings: how far the demo world's own information lets any upstream go on the three figures
issue targets are set in: the headroom benchmark's CTR NE, upstream recall@50 of saves and the
snapshot ranker's NE gain over `none`. Each row is an estimator handed part of the world's hidden
state (`datapipes.world.hidden_state`); `--rankers` also trains rankers on snapshots planted
from it (the rows and what bounds what: docs/results.md, "Ceilings").

    python -m derl.benchmarks.studies.ceiling --data W --out DIR [--rankers PRESET --nproc N]
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.dataset as ds

from derl.benchmarks import report
from derl.benchmarks.studies.headroom import _day, _logistic, probe_r2
from derl.datapipes import schema as S
from derl.datapipes import world as W
from derl.datapipes.snapshots import write_snapshot
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.launchers.stages import evaluate
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import check, setting, to_flags
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.launchers.runtime.processes import run_derl
from derl.launchers.runtime.settings import EvaluateConfig, TrainDownstreamConfig
from derl.launchers.runtime.upstream_eval import popular_pins
from derl.models.metrics import binary_metrics, bootstrap_ne_gain

K = 50


@dataclass(frozen=True)
class CeilingConfig:
    data: Path = setting(help="a generated world (derl generate)")
    out: Path = setting(help="folder for ceiling.json and ceiling.md")
    rankers: Optional[str] = setting(None, "also train `none` and rankers on snapshots planted from the hidden "
                                           "state with this preset's downstream settings and report their NE "
                                           "gain over `none`", choices=sorted(STAGE_PRESETS))
    nproc: int = setting(2, "ranks of each ranker run (default 2, as the pipeline's)")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",))
# `_table_vectors`' rounds: the demo world's figures settle by the third (docs/results.md,
# "Figures that sat in code comments").
TABLE_ROUNDS = 3
ACTION_WEIGHT = {S.Action.CLOSEUP: 1.0, S.Action.CLICK: 1.0, S.Action.LONG_CLICK: 2.0, S.Action.SAVE: 4.0,
                 S.Action.HIDE: -2.0}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _engagements(sources: SourceTables, days) -> Dict[str, np.ndarray]:
    t = sources.read("engagements", days, columns=["user_id", "pin_id", "action"])
    return {c: t.column(c).to_numpy() for c in ("user_id", "pin_id", "action")}


def _action_weights(actions: np.ndarray) -> np.ndarray:
    weight = np.zeros(max(ACTION_WEIGHT) + 1)
    for action, w in ACTION_WEIGHT.items():
        weight[action] = w
    return weight[actions]


def _history_users(eng: Dict[str, np.ndarray], pins: np.ndarray, num_users: int) -> np.ndarray:
    users = np.zeros((num_users, pins.shape[1]))
    np.add.at(users, eng["user_id"], _action_weights(eng["action"])[:, None] * pins[eng["pin_id"]])
    return users


def _table_vectors(sources: SourceTables, days, eng: Dict[str, np.ndarray], content: np.ndarray,
                   true_pins: np.ndarray, num_users: int) -> Tuple[np.ndarray, np.ndarray]:
    """(users [U, K], zero without an engagement, not normalised; Pins [P, K]) from the upstream
    days' tables (`eng`: their engagements, as `_engagements` reads them), read with the world's
    content model: a reference, not a bound. From the content
    posteriors, TABLE_ROUNDS times: each user the action-weighted mean of their engaged Pins'
    vectors; then each Pin with an engagement or an ad click the least-squares read-out (fitted on
    the true latents, as the content model is) of its content posterior and the mean of the users
    who engaged with or clicked it; a Pin with neither keeps its content posterior."""
    ads = sources.read("ad_events", days, columns=["user_id", "pin_id", "clicked"])
    clicked = ads.column("clicked").to_numpy() > 0
    ad_user, ad_pin = (ads.column(c).to_numpy()[clicked] for c in ("user_id", "pin_id"))
    weight = _action_weights(eng["action"])[:, None]
    pins = content
    for _ in range(TABLE_ROUNDS):
        users = _unit(_history_users(eng, pins, num_users))
        engagers = np.zeros_like(content)
        np.add.at(engagers, eng["pin_id"], weight * users[eng["user_id"]])
        np.add.at(engagers, ad_pin, users[ad_user])
        seen = np.linalg.norm(engagers, axis=1) > 0
        x = np.column_stack([content[seen], _unit(engagers[seen]), np.ones(int(seen.sum()))])
        coef, *_ = np.linalg.lstsq(x, true_pins[seen], rcond=None)
        pins = content.copy()
        pins[seen] = x @ coef
    return _history_users(eng, pins, num_users), pins


def _content_pins(data: Path, true_pins: np.ndarray) -> np.ndarray:
    """Posterior mean of each Pin's latent given its content embedding, the content model
    (projection and noise) fitted by least squares on the true latents: any content encoder's bound."""
    col = ds.dataset(data / "pins", format="parquet").to_table(columns=["content_emb"]).column("content_emb")
    content = col.combine_chunks().values.to_numpy().reshape(-1, S.CONTENT_DIM)
    projection, *_ = np.linalg.lstsq(true_pins, content, rcond=None)
    noise = (content - true_pins @ projection).var()
    prior = true_pins.var(axis=0).mean()
    precision = projection @ projection.T / noise + np.eye(true_pins.shape[1]) / prior
    return np.linalg.solve(precision, projection @ content.T / noise).T


def _ctr_ne(data: Path, fit_days: List[str], eval_day: str, users: np.ndarray, pins: np.ndarray) -> float:
    def dots(days):
        rows = [_day(data, d) for d in days]
        u, p = (np.concatenate([r[c] for r in rows]) for c in ("user_id", "pin_id"))
        y = np.concatenate([r["clicked"] for r in rows]).astype(np.float64)
        return np.einsum("ij,ij->i", _unit(users)[u], _unit(pins)[p])[:, None], y

    (x_fit, y_fit), (x, y) = dots(fit_days), dots([eval_day])
    return binary_metrics(_logistic(x_fit, y_fit, x), y)["ne"]


def _recall(score_rows, users: np.ndarray, saves_user: np.ndarray, saves_pin: np.ndarray, chunk: int = 500) -> float:
    """Share of (user, saved Pin) pairs whose Pin is in the user's top K of `score_rows(users)`."""
    hits = 0
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        top = np.argpartition(-score_rows(block), K, axis=1)[:, :K]
        row = np.searchsorted(block, saves_user)
        mine = np.isin(saves_user, block)
        hits += int((top[row[mine]] == saves_pin[mine][:, None]).any(axis=1).sum())
    return hits / len(saves_user)


def measure(data: Path) -> List[Dict[str, object]]:
    sources = SourceTables(data)
    split = default_split(sources.days("ad_events"))
    days = sources.days("engagements")
    first, last = split.downstream_days
    fit_days = [d for d in days if first <= d <= last]
    upstream = split.upstream_days
    val_day = split.cut_day  # the day after the upstream window, where upstream recall is measured
    cfg, e = W.hidden_state(data, split.upstream_days[1])
    eng = _engagements(sources, upstream)
    history = _history_users(eng, e.pin_latent, cfg.num_users)
    content = _content_pins(data, e.pin_latent)
    rows = [{"figure": "CTR NE", "estimator": name, "value": round(_ctr_ne(data, fit_days, split.eval_day, u, p), 4)}
            for name, u, p in (("true latents (last upstream day)", e.user_latent, e.pin_latent),
                               ("user from engaged Pins' true latents, true ad", history, e.pin_latent),
                               ("true user, ad from content", e.user_latent, content))]
    active = np.flatnonzero(np.linalg.norm(history, axis=1) > 0)
    from_content = _history_users(eng, content, cfg.num_users)
    table_users, table_pins = _table_vectors(sources, upstream, eng, content, e.pin_latent, cfg.num_users)
    rows += [{"figure": f"latent probe R² ({entity})", "estimator": name, "value": round(probe_r2(x, y), 4)}
             for entity, name, x, y in (
                 ("users", "action-weighted mean of engaged Pins' true latents (users who engaged)",
                  _unit(history[active]), e.user_latent[active]),
                 ("users", "action-weighted mean of engaged Pins' content posteriors (users who engaged)",
                  _unit(from_content[active]), e.user_latent[active]),
                 ("users", "from the tables (`_table_vectors`; users who engaged)",
                  _unit(table_users[active]), e.user_latent[active]),
                 ("Pins", "content embedding (posterior mean, the projection known)", content, e.pin_latent),
                 ("Pins", "from the tables (`_table_vectors`)", table_pins, e.pin_latent))]

    count = np.bincount(eng["pin_id"][eng["action"] != S.Action.IMPRESSION], minlength=cfg.num_pins)
    val = _engagements(sources, (val_day, val_day))
    saved = val["action"] == S.Action.SAVE
    saves_user, saves_pin = val["user_id"][saved], val["pin_id"][saved]
    users = np.unique(saves_user)
    rows.append({"figure": f"recall@{K}", "estimator": "popularity",
                 "value": round(float(np.isin(saves_pin, popular_pins(sources, upstream, K)).mean()), 4)})
    _, ev = W.hidden_state(data, val_day)
    log_count = np.log(count + 1.0)
    best = max(_recall(lambda b, w=w: w * ev.user_latent[b] @ ev.pin_latent.T + log_count, users, saves_user, saves_pin)
               for w in (2.0, 4.0, 8.0, 12.0))
    rows.append({"figure": f"recall@{K}", "estimator": "true-latent dot + log popularity (best weight)",
                 "value": round(best, 4)})
    rows.append({"figure": f"recall@{K}", "estimator": "the world's expected saves (Bayes)",
                 "value": round(_recall(lambda b: W.log_expected_saves(cfg, ev, days.index(val_day), b),
                                        users, saves_user, saves_pin), 4)})
    return rows


def _planted_snapshots(data: Path, work: Path, cut: str) -> Dict[str, Path]:
    """Four snapshot roots, each version `cut` with engagement-domain vectors for every Pin created
    before `cut`: "truth", every Pin's and every user's true latent on that day; "engaged", true
    Pins and each user with an engagement in the upstream window as the action-weighted mean of
    their engaged Pins' true latents (perfect Pin vectors, the user known by behaviour);
    "content", each Pin as its content embedding's posterior mean and each user as the same
    mean of their engaged Pins' posteriors (what the content shows, read with the world's own
    content model); "tables", the users and Pins of `_table_vectors` (content and engagements)."""
    sources = SourceTables(data)
    cfg, e = W.hidden_state(data, cut)
    pins = np.flatnonzero(e.pin_created_day < sources.days("engagements").index(cut))
    split = default_split(sources.days("ad_events"))
    eng = _engagements(sources, split.upstream_days)
    content = _content_pins(data, e.pin_latent)
    table_users, table_pins = _table_vectors(sources, split.upstream_days, eng, content, e.pin_latent,
                                             cfg.num_users)
    snapshots = {"truth": (np.arange(cfg.num_users), e.user_latent, e.pin_latent)}
    for name, users, pin_vectors in (("engaged", _history_users(eng, e.pin_latent, cfg.num_users), e.pin_latent),
                                     ("content", _history_users(eng, content, cfg.num_users), content),
                                     ("tables", table_users, table_pins)):
        active = np.flatnonzero(np.linalg.norm(users, axis=1) > 0)
        snapshots[name] = (active, _unit(users[active]), _unit(pin_vectors))
    roots = {}
    for name, (user_ids, users, pin_vectors) in snapshots.items():
        roots[name] = work / f"snapshots-{name}"
        write_snapshot(roots[name], cut, cut, {"engagement/users": (user_ids, users),
                                               "engagement/pins": (pins, pin_vectors[pins])},
                       dim=cfg.latent_dim, temperature=1.0 / cfg.click_affinity, normalised=True)
    return roots


def _train_ranker(data: Path, out: Path, preset: str, nproc: int, **overrides) -> None:
    flags = to_flags(TrainDownstreamConfig, {"data": data, "out": out, "seed": 0, **overrides,
                                             **STAGE_PRESETS[preset].downstream})
    argv = ["train-downstream", *flags, "--nproc", str(nproc)]
    print("[ceiling] derl " + " ".join(argv), flush=True)
    run_derl(argv, own_group=False)


def _bayes_gains(data: Path, none_run: Path) -> Dict[str, Dict[str, float]]:
    """NE gain over `none` of the world's own P(click) and P(conversion | click), on its rows."""
    pred = runs.read_predictions(none_run)
    day = runs.read_metrics(none_run)["eval_day"]
    table = SourceTables(data).read("ad_events", (day, day),
                                    columns=["request_id", "user_id", "pin_id", "surface", "position"])
    rows = {c: table.column(c).to_numpy() for c in table.column_names}
    at = np.argsort(rows["request_id"])
    at = at[np.searchsorted(rows["request_id"], pred["request_id"], sorter=at)]
    truth = W.ad_truth(data, day, {k: rows[k][at] for k in ("user_id", "pin_id", "surface", "position")})
    clicked = pred["clicked"] > 0
    return {"CTR": bootstrap_ne_gain(pred["clicked"], truth["click"], pred["p_ctr"]),
            "CVR": bootstrap_ne_gain(pred["converted"][clicked], truth["conversion"][clicked], pred["p_cvr"][clicked])}


ESTIMATORS = {"truth": "snapshot: true user, true Pin (user_pin; the preset's ranker)",
              "engaged": "snapshot: user from engaged Pins' true latents, true Pin (user_pin)",
              "content": "snapshot: Pin from its content (posterior mean), user from their engaged Pins' (user_pin)",
              "tables": "snapshot: Pin from its content and its engagers, user from their engaged Pins' (user_pin)",
              "bayes": "the world's own probabilities (Bayes)"}


def ranker_ceiling(data: Path, preset: str, nproc: int) -> List[Dict[str, object]]:
    """The NE-gain rows (module docstring); the rankers are trained in a temporary folder."""
    cut = default_split(SourceTables(data).days("ad_events")).cut_day
    with tempfile.TemporaryDirectory(prefix="derl-ceiling-") as tmp:
        work = Path(tmp)
        _train_ranker(data, work / "none", preset, nproc, upstream="none")
        for name, root in _planted_snapshots(data, work, cut).items():
            _train_ranker(data, work / name, preset, nproc, upstream="snapshot", vectors="user_pin", snapshots=root)
        planted = ("truth", "engaged", "content", "tables")
        evaluation = evaluate.run(EvaluateConfig(runs=tuple(f"{n}={work / n}" for n in ("none", *planted)),
                                             out=work / "evaluate"))
        gains = {n: {t.upper(): g for t, g in evaluation["ne_gain_over_baseline"][n].items()} for n in planted}
        gains["bayes"] = _bayes_gains(data, work / "none")
    return [{"figure": f"{task} NE gain over none (%)", "estimator": ESTIMATORS[name],
             "value": round(100 * by_task[task]["gain"], 3),
             "interval": f"[{100 * by_task[task]['ci_low']:+.2f}, {100 * by_task[task]['ci_high']:+.2f}]"}
            for task in ("CTR", "CVR") for name, by_task in gains.items()]


def main(argv: Optional[List[str]] = None) -> None:
    config = report.parse_config(CeilingConfig, argv, __doc__)
    rows = [{**r, "interval": "–"} for r in measure(config.data)]
    if config.rankers:
        rows += ranker_ceiling(config.data, config.rankers, config.nproc)
    meta = {**report.machine(), "command": report.command("derl.benchmarks.studies.ceiling", config)}
    print(report.write(config.out, "ceiling", rows, meta).read_text())


if __name__ == "__main__":
    main()
