"""Ceilings: how far the demo world's own information lets any upstream go on the three figures
issue targets are set in: the headroom benchmark's CTR NE, upstream recall@50 as `derl
train-upstream` reports it (saves and clicks) and the snapshot ranker's NE gain over `none`. Each
row is an estimator handed part of the world's hidden state (`datapipes.world.hidden_state`); the
world's own probabilities are strict bounds, the other rows references. `--rankers` also trains
rankers on snapshots planted from it (the rows and what bounds what: docs/results.md, "Ceilings").

    python -m derl.benchmarks.studies.ceiling --data W --out DIR [--from-day D] [--rankers PRESET --nproc N]
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F

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
from derl.launchers.runtime.upstream_eval import EVAL_TASKS, _positive_pairs, popular_pins
from derl.models.metrics import binary_metrics, bootstrap_ne_gain

K = 50


@dataclass(frozen=True)
class CeilingConfig:
    data: Path = setting(help="a generated world (derl generate)")
    out: Path = setting(help="folder for ceiling.json and ceiling.md")
    from_day: Optional[str] = setting(None, "first day of the upstream's training, as `derl train-upstream "
                                            "--from-day`: the popularity baseline of the recall rows counts "
                                            "from there (default: the split's first upstream day)")
    rankers: Optional[str] = setting(None, "also train `none` and rankers on snapshots planted from the hidden "
                                           "state with this preset's downstream settings and report their NE "
                                           "gain over `none`", choices=sorted(STAGE_PRESETS))
    nproc: int = setting(2, "ranks of each ranker run (default 2, as the pipeline's)")

    def __post_init__(self) -> None:
        check(self, positive=("nproc",), day=("from_day",))


# `_table_vectors`' rounds: the demo world's figures settle by the third (docs/results.md,
# "Figures that sat in code comments").
TABLE_ROUNDS = 3
ACTION_WEIGHT = {S.Action.CLOSEUP: 1.0, S.Action.CLICK: 1.0, S.Action.LONG_CLICK: 2.0, S.Action.SAVE: 4.0,
                 S.Action.HIDE: -2.0}
# `datapipes.world._draw_outcomes`' draws, each a Bernoulli of logit slope x affinity + offset (+ the
# Pin's quality where marked; the closeup also + its surface's bias); tests hold them to the world's.
OUTCOMES = {"hide": (-5.0, -3.0, False), "closeup": (4.0, -1.8, True), "save": (6.0, -3.0, False),
            "click": (2.5, -1.2, True), "long_click": (4.0, -1.5, False)}
ML_STEPS = 30  # L-BFGS iterations of the maximum-likelihood users: settled well before on the demo world

Vectors = Tuple[np.ndarray, np.ndarray]  # (users [U, K], zero where unknown; Pins [P, K])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _engagements(sources: SourceTables, days) -> Dict[str, np.ndarray]:
    t = sources.read("engagements", days, columns=["user_id", "pin_id", "action", "surface"])
    return {c: t.column(c).to_numpy() for c in ("user_id", "pin_id", "action", "surface")}


def _action_weights(actions: np.ndarray) -> np.ndarray:
    weight = np.zeros(max(ACTION_WEIGHT) + 1)
    for action, w in ACTION_WEIGHT.items():
        weight[action] = w
    return weight[actions]


def _history_users(eng: Dict[str, np.ndarray], pins: np.ndarray, num_users: int) -> np.ndarray:
    users = np.zeros((num_users, pins.shape[1]))
    np.add.at(users, eng["user_id"], _action_weights(eng["action"])[:, None] * pins[eng["pin_id"]])
    return users


def _action_log_probs(affinity: torch.Tensor, quality: torch.Tensor,
                      surface_bias) -> Dict[S.Action, torch.Tensor]:
    """log P(the impression's strongest action) under the world's outcome model (`OUTCOMES`): a
    hide overrides everything, a save a click, a long click a click."""
    on, off = {}, {}
    for name, (slope, offset, with_quality) in OUTCOMES.items():
        z = slope * affinity + offset + (quality if with_quality else 0.0)
        z = z + surface_bias if name == "closeup" else z
        on[name], off[name] = F.logsigmoid(z), F.logsigmoid(-z)
    shown = off["hide"]
    closeup = shown + on["closeup"]
    clicked = closeup + off["save"] + on["click"]
    return {S.Action.IMPRESSION: shown + off["closeup"], S.Action.CLOSEUP: closeup + off["save"] + off["click"],
            S.Action.CLICK: clicked + off["long_click"], S.Action.LONG_CLICK: clicked + on["long_click"],
            S.Action.SAVE: closeup + on["save"], S.Action.HIDE: on["hide"]}


def _ml_users(eng: Dict[str, np.ndarray], e, start: np.ndarray) -> np.ndarray:
    """[U, K] each user as the unit vector under which all their organic impressions in `eng`
    are likeliest, read with the world's outcome model and the true Pins (latent and quality);
    zero for a user without an impression. L-BFGS on v / |v| from `start` (users without one:
    the sum of the Pins they were shown)."""
    user = torch.from_numpy(eng["user_id"])
    pins = torch.from_numpy(e.pin_latent[eng["pin_id"]].astype(np.float64))
    quality = torch.from_numpy(e.pin_quality[eng["pin_id"]])
    bias = torch.from_numpy(W.SURFACE_ENGAGEMENT_BIAS[eng["surface"]])
    action = torch.from_numpy(eng["action"].astype(np.int64))
    shown = np.zeros_like(start)
    np.add.at(shown, eng["user_id"], e.pin_latent[eng["pin_id"]])
    seen = np.linalg.norm(shown, axis=1) > 0
    v = np.where(np.linalg.norm(start, axis=1, keepdims=True) > 0, start, shown)
    v = torch.tensor(np.where(seen[:, None], v, 1.0), requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=ML_STEPS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        affinity = ((v / v.norm(dim=1, keepdim=True))[user] * pins).sum(dim=1)
        log_p = _action_log_probs(affinity, quality, bias)
        log_p = torch.stack([log_p[a] for a in S.Action], dim=1)  # column = action code
        loss = -log_p.gather(1, action[:, None]).sum() / len(action)
        loss.backward()
        return loss

    opt.step(closure)
    users = (v / v.norm(dim=1, keepdim=True)).detach().numpy()
    return np.where(seen[:, None], users, 0.0)


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
    """Posterior mean of each Pin's latent given its content embedding and its category: the
    content model (projection and noise) fitted by least squares on the true latents, and a
    Gaussian prior per category, its Pins' true mean and spread. A reference read with the
    world's own model, not a bound: the true latent is a unit vector near a topic's centre."""
    table = ds.dataset(data / "pins", format="parquet").to_table(columns=["content_emb", "category"])
    content = table.column("content_emb").combine_chunks().values.to_numpy().reshape(-1, S.CONTENT_DIM)
    category = table.column("category").to_numpy()
    projection, *_ = np.linalg.lstsq(true_pins, content, rcond=None)
    noise = (content - true_pins @ projection).var()
    pins = np.zeros(true_pins.shape)
    for c in np.unique(category):
        mine = category == c
        mean, prior = true_pins[mine].mean(axis=0), true_pins[mine].var(axis=0).mean()
        precision = projection @ projection.T / noise + np.eye(true_pins.shape[1]) / prior
        pins[mine] = np.linalg.solve(precision, projection @ content[mine].T / noise + mean[:, None] / prior).T
    return pins


def references(data: Path) -> Dict[str, Vectors]:
    """The estimators' vectors from the upstream window's tables and part of the truth (a user
    without an engagement, or for "ml" an impression, is zero): "engaged", each user the
    action-weighted mean of their engaged Pins' true latents, true Pins; "ml", each user by
    maximum likelihood of their organic impressions (`_ml_users`), true Pins; "content", each
    Pin its content-and-category posterior and each user the same mean of those; "tables",
    `_table_vectors` (content and engagements). Pins do not drift, so neither do these."""
    sources = SourceTables(data)
    upstream = default_split(sources.days("ad_events")).upstream_days
    cfg, e = W.hidden_state(data, upstream[1])
    eng = _engagements(sources, upstream)
    history = _history_users(eng, e.pin_latent, cfg.num_users)
    content = _content_pins(data, e.pin_latent)
    return {"engaged": (history, e.pin_latent), "ml": (_ml_users(eng, e, history), e.pin_latent),
            "content": (_history_users(eng, content, cfg.num_users), content),
            "tables": _table_vectors(sources, upstream, eng, content, e.pin_latent, cfg.num_users)}


def _dot(users: np.ndarray, pins: np.ndarray) -> Callable[[Dict[str, np.ndarray]], np.ndarray]:
    u, p = _unit(users), _unit(pins)
    return lambda rows: np.einsum("ij,ij->i", u[rows["user_id"]], p[rows["pin_id"]])


def _ad_rows(data: Path, days: Sequence[str]) -> Dict[str, np.ndarray]:
    parts = [_day(data, d) for d in days]
    return {c: np.concatenate([r[c] for r in parts]) for c in parts[0]}


def _ctr_ne(data: Path, fit_days: List[str], eval_day: str, dot: Callable) -> float:
    """NE on `eval_day` of the headroom benchmark's logistic on `dot(ad rows)`, fitted on `fit_days`."""
    fit, rows = _ad_rows(data, fit_days), _ad_rows(data, [eval_day])
    p = _logistic(dot(fit)[:, None], fit["clicked"].astype(np.float64), dot(rows)[:, None])
    return binary_metrics(p, rows["clicked"])["ne"]


def _log_expected_events(cfg: W.WorldConfig, e, day_index: int, users: np.ndarray,
                         actions: Sequence[S.Action]) -> np.ndarray:
    """[len(users), Pins] log of each user's expected organic impressions of each Pin on the day
    that end in one of `actions` (each past a closeup): the world's expected saves
    (`log_expected_saves`) times those actions' odds against a save, in which the surface's
    share of the closeup cancels."""
    saves = W.log_expected_saves(cfg, e, day_index, users)
    affinity = torch.from_numpy(e.user_latent[users] @ e.pin_latent.T)
    log_p = _action_log_probs(affinity, torch.from_numpy(e.pin_quality.astype(np.float32)), 0.0)
    return saves + (torch.logsumexp(torch.stack([log_p[a] for a in actions]), dim=0) - log_p[S.Action.SAVE]).numpy()


def _recall(score_rows: Callable, users: np.ndarray, pins: np.ndarray, chunk: int = 128) -> float:
    """Share of (user, Pin) pairs whose Pin is in the user's top K of `score_rows(user ids)`."""
    queries, hits = np.unique(users), 0
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        top = np.argpartition(-score_rows(block), K, axis=1)[:, :K]
        mine = np.isin(users, block)
        hits += int((top[np.searchsorted(block, users[mine])] == pins[mine][:, None]).any(axis=1).sum())
    return hits / len(users)


def _with_mean(by_task: Dict[str, float]) -> Dict[str, float]:
    """recall@K per task and the mean over the tasks that `derl train-upstream` reports
    (`upstream_eval.evaluate_recall`)."""
    return {**by_task, "mean": float(np.mean(list(by_task.values())))}


def _reported_recall(score_rows_for: Callable, pairs) -> Dict[str, float]:
    """`score_rows_for(task)` ranks the catalogue for a task."""
    return _with_mean({task: _recall(score_rows_for(task), users, pins) for task, (users, pins) in pairs.items()})


def _recall_rows(data: Path, window: Tuple[str, str]) -> List[Dict[str, object]]:
    """recall@K of the day after the upstream window, for popularity over `window` (the
    upstream's baseline), the true-latent dot plus log popularity and the world's own ranking."""
    sources = SourceTables(data)
    day = default_split(sources.days("ad_events")).cut_day
    pairs = _positive_pairs(sources, day)
    popular = popular_pins(sources, window, K)
    eng = _engagements(sources, window)
    cfg, e = W.hidden_state(data, day)
    day_index = sources.days("engagements").index(day)
    count = np.bincount(eng["pin_id"][eng["action"] != S.Action.IMPRESSION], minlength=cfg.num_pins)
    prior = np.where(e.pin_created_day <= day_index, np.log(count + 1.0), -np.inf)  # the live catalogue
    by_weight = [_reported_recall(lambda task, w=w: lambda b: w * e.user_latent[b] @ e.pin_latent.T + prior, pairs)
                 for w in (2.0, 4.0, 8.0, 12.0)]
    recalls = {
        "popularity (the upstream's training days)":
            _with_mean({task: float(np.isin(pins, popular).mean()) for task, (_, pins) in pairs.items()}),
        "true-latent dot + log popularity (best weight)": max(by_weight, key=lambda r: r["mean"]),
        "the world's expected events of each task (Bayes)": _reported_recall(
            lambda task: lambda b: _log_expected_events(cfg, e, day_index, b, EVAL_TASKS[task]), pairs)}
    return [{"figure": f"recall@{K} ({task})", "estimator": name, "value": round(r[task], 4)}
            for name, r in recalls.items() for task in ("mean", *pairs)]


def measure(data: Path, window: Tuple[str, str], refs: Dict[str, Vectors]) -> List[Dict[str, object]]:
    """The rows that train no model (docs/results.md, "Ceilings")."""
    days = SourceTables(data).days("ad_events")
    split = default_split(days)
    fit_days = [d for d in days if split.downstream_days[0] <= d <= split.downstream_days[1]]
    cfg, e = W.hidden_state(data, split.upstream_days[1])
    quality = e.advertiser_quality[e.pin_advertiser]
    true_dot = _dot(e.user_latent, e.pin_latent)
    dots = {"true latents (last upstream day)": true_dot,
            "true latents and advertiser quality in one dot (click weight x dot + quality)":
                lambda r: cfg.click_affinity * true_dot(r) + quality[r["pin_id"]],
            "user from engaged Pins' true latents, true ad": _dot(*refs["engaged"]),
            "user by maximum likelihood of their organic impressions, true ad": _dot(*refs["ml"]),
            "true user, ad from content and category": _dot(e.user_latent, refs["content"][1])}
    rows = [{"figure": "CTR NE", "estimator": name, "value": round(_ctr_ne(data, fit_days, split.eval_day, dot), 4)}
            for name, dot in dots.items()]
    eval_rows = _ad_rows(data, [split.eval_day])
    rows.append({"figure": "CTR NE", "estimator": "the world's P(click) (Bayes)",
                 "value": round(binary_metrics(W.ad_truth(data, split.eval_day, eval_rows)["click"],
                                               eval_rows["clicked"])["ne"], 4)})
    active = np.flatnonzero(np.linalg.norm(refs["engaged"][0], axis=1) > 0)
    users = {"action-weighted mean of engaged Pins' true latents": refs["engaged"][0],
             "maximum likelihood of their organic impressions (true Pins)": refs["ml"][0],
             "action-weighted mean of engaged Pins' content posteriors": refs["content"][0],
             "from the tables (`_table_vectors`)": refs["tables"][0]}
    rows += [{"figure": "latent probe R² (users who engaged)", "estimator": name,
              "value": round(probe_r2(_unit(u[active]), e.user_latent[active]), 4)} for name, u in users.items()]
    pins = {"content and category (posterior mean)": refs["content"][1],
            "from the tables (`_table_vectors`)": refs["tables"][1]}
    rows += [{"figure": "latent probe R² (Pins)", "estimator": name, "value": round(probe_r2(p, e.pin_latent), 4)}
             for name, p in pins.items()]
    return rows + _recall_rows(data, window)


def _planted_snapshots(data: Path, work: Path, cut: str, refs: Dict[str, Vectors]) -> Dict[str, Path]:
    """A snapshot root per reference (`references`) and "truth" (every user's and Pin's true
    latent on `cut`), each version `cut` with engagement-domain vectors for every Pin created
    before `cut` and every user the reference knows."""
    sources = SourceTables(data)
    cfg, e = W.hidden_state(data, cut)
    pins = np.flatnonzero(e.pin_created_day < sources.days("engagements").index(cut))
    snapshots = {"truth": (np.arange(cfg.num_users), e.user_latent, e.pin_latent)}
    for name, (users, pin_vectors) in refs.items():
        known = np.flatnonzero(np.linalg.norm(users, axis=1) > 0)
        snapshots[name] = (known, _unit(users[known]), _unit(pin_vectors))
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
              "ml": "snapshot: user by maximum likelihood of their organic impressions, true Pin (user_pin)",
              "content": "snapshot: Pin from its content and category (posterior mean), user from their "
                         "engaged Pins' (user_pin)",
              "tables": "snapshot: Pin from its content and its engagers, user from their engaged Pins' (user_pin)",
              "bayes": "the world's own probabilities (Bayes)"}


def ranker_ceiling(data: Path, preset: str, nproc: int, refs: Dict[str, Vectors]) -> List[Dict[str, object]]:
    """The NE-gain rows (module docstring); the rankers are trained in a temporary folder."""
    cut = default_split(SourceTables(data).days("ad_events")).cut_day
    with tempfile.TemporaryDirectory(prefix="derl-ceiling-") as tmp:
        work = Path(tmp)
        _train_ranker(data, work / "none", preset, nproc, upstream="none")
        roots = _planted_snapshots(data, work, cut, refs)
        for name, root in roots.items():
            _train_ranker(data, work / name, preset, nproc, upstream="snapshot", vectors="user_pin", snapshots=root)
        planted = tuple(roots)
        evaluation = evaluate.run(EvaluateConfig(runs=tuple(f"{n}={work / n}" for n in ("none", *planted)),
                                             out=work / "evaluate"))
        gains = {n: {t.upper(): g for t, g in evaluation["ne_gain_over_baseline"][n].items()} for n in planted}
        gains["bayes"] = _bayes_gains(data, work / "none")
    return [{"figure": f"{task} NE gain over none (%)", "estimator": ESTIMATORS[name],
             "value": round(100 * by_task[task]["gain"], 3),
             "interval": f"[{100 * by_task[task]['ci_low']:+.2f}, {100 * by_task[task]['ci_high']:+.2f}]"}
            for task in ("CTR", "CVR") for name, by_task in gains.items()]


def _training_window(data: Path, from_day: Optional[str]) -> Tuple[str, str]:
    """The upstream's training days, `--from-day` to the last upstream day of the split."""
    first, last = default_split(SourceTables(data).days("ad_events")).upstream_days
    if from_day is not None and not first <= from_day <= last:
        raise SystemExit(f"--from-day {from_day} is not one of {data}'s upstream days {first}..{last}")
    return from_day or first, last


def main(argv: Optional[List[str]] = None) -> None:
    config = report.parse_config(CeilingConfig, argv, __doc__)
    window = _training_window(config.data, config.from_day)
    refs = references(config.data)
    rows = [{**r, "interval": "–"} for r in measure(config.data, window, refs)]
    if config.rankers:
        rows += ranker_ceiling(config.data, config.rankers, config.nproc, refs)
    meta = {**report.machine(), "command": report.command("derl.benchmarks.studies.ceiling", config)}
    print(report.write(config.out, "ceiling", rows, meta).read_text())


if __name__ == "__main__":
    main()
