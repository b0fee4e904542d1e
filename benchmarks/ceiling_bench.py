"""Ceilings: how far the demo world's own information lets any upstream go on the two figures
issue targets are set in, the headroom benchmark's CTR NE and upstream recall@50 of saves.

    python -m derl.benchmarks.ceiling_bench --data W --out DIR

No model is trained. Each row is an estimator handed part of the world's hidden state
(`datapipes.world.hidden_state`); the true-latent rows and the world's expected saves are strict
bounds, the others references for a model that must learn the part it was not handed:
- CTR NE on the evaluation day (the logistic of `headroom_bench`, fitted on the downstream days)
  on the user·ad dot of: the true latents on the last upstream day (what a snapshot could know);
  a user as the action-weighted mean of the true
  latents of the Pins they engaged with in the upstream window (perfect Pin vectors, the user
  known only through behaviour); the true user with the ad known only through its content
  embedding (the posterior mean given the projection, fitted on the true latents);
- recall@50 of the validation day's saves, every Pin ranked: popularity (as `derl
  train-upstream` reports it); the true-latent dot plus log popularity, best of a few weights;
  and the world's own expected saves of the user for each Pin (impression probability x P(save)),
  which no ranking beats on average.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow.dataset as ds

from derl.benchmarks import report
from derl.benchmarks.headroom_bench import _day, _logistic
from derl.datapipes import schema as S
from derl.datapipes import world as W
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.launchers.upstream_eval import popular_pins
from derl.models.metrics import binary_metrics

K = 50
ACTION_WEIGHT = {S.Action.CLOSEUP: 1.0, S.Action.CLICK: 1.0, S.Action.LONG_CLICK: 2.0, S.Action.SAVE: 4.0,
                 S.Action.HIDE: -2.0}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _engagements(sources: SourceTables, days) -> Dict[str, np.ndarray]:
    t = sources.read("engagements", days, columns=["user_id", "pin_id", "action"])
    return {c: t.column(c).to_numpy() for c in ("user_id", "pin_id", "action")}


def _history_users(eng: Dict[str, np.ndarray], pins: np.ndarray, num_users: int) -> np.ndarray:
    weight = np.zeros(max(ACTION_WEIGHT) + 1)
    for action, w in ACTION_WEIGHT.items():
        weight[action] = w
    users = np.zeros((num_users, pins.shape[1]))
    np.add.at(users, eng["user_id"], weight[eng["action"]][:, None] * pins[eng["pin_id"]])
    return users


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


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a generated world (derl generate)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    meta = {**report.machine(), "command": f"python -m derl.benchmarks.ceiling_bench --data {args.data} --out {args.out}"}
    print(report.write(args.out, "ceiling", measure(args.data), meta).read_text())


if __name__ == "__main__":
    main()
