"""Headroom: how much of the synthetic world's ad signal a snapshot's vectors carry, against
the world's own answer: their dots' correlation with the true affinity, the NE of logistic
regressions on them and on the truth, and a linear probe of the true latents (this prints the
table and writes DIR/headroom.{json,md}; what each figure is: docs/results.md, "Headroom").

    python -m derl.benchmarks.studies.headroom --data W --snapshots SNAP --out DIR [--version V]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.dataset as ds
import torch

from derl.benchmarks import report
from derl.datapipes.snapshots import SnapshotJoin
from derl.datapipes.sources import SourceTables
from derl.datapipes.splits import default_split
from derl.datapipes.world import ad_truth, latent_state
from derl.launchers.runtime.config import setting
from derl.models.metrics import binary_metrics

COLUMNS = ["user_id", "pin_id", "surface", "position", "clicked", "converted"]


@dataclass(frozen=True)
class HeadroomConfig:
    data: Path = setting(help="a generated world (derl generate)")
    snapshots: Path = setting(help="snapshot root of that world's upstream")
    out: Path = setting(help="folder for headroom.json and headroom.md")
    version: Optional[str] = setting(None, "one version for every day (default: each day's live one)")


def _day(data: Path, day: str) -> Dict[str, np.ndarray]:
    t = ds.dataset(data / "ad_events" / f"ds={day}", format="parquet").to_table(columns=COLUMNS)
    return {c: t.column(c).to_numpy() for c in COLUMNS}


def _features(data: Path, join: SnapshotJoin, days: List[str]) -> Dict[str, np.ndarray]:
    """Labels, the snapshot's dots and found flags, the world's truth and the ad, for `days`' ads."""
    parts = []
    for day in days:
        rows, snap = _day(data, day), join.snapshot(join.version_on(day))
        truth = ad_truth(data, day, rows)
        f = {"clicked": rows["clicked"].astype(np.float64), "converted": rows["converted"].astype(np.float64),
             "affinity": truth["affinity"], "p_click": truth["click"], "p_conversion": truth["conversion"],
             "pin_id": rows["pin_id"]}
        for domain in snap.domains:
            users, no_user = snap.table(domain, "users").lookup(rows["user_id"])
            pins, no_pin = snap.table(domain, "pins").lookup(rows["pin_id"])
            found = ~no_user & ~no_pin
            f[f"dot_{domain}"] = np.where(found, np.einsum("ij,ij->i", users, pins), 0.0)
            f[f"found_{domain}"] = found.astype(np.float64)
        parts.append(f)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _logistic(x: np.ndarray, y: np.ndarray, x_eval: np.ndarray) -> np.ndarray:
    """P(y = 1) on x_eval of a logistic regression fitted on (x, y) by L-BFGS: standardised
    features and a unit Gaussian prior on their weights, so that a flag which happens to
    separate a few hundred training conversions does not run off to infinity."""
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-12)

    def design(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.column_stack([np.ones(len(a)), (a - mean) / std]), dtype=torch.float64)

    X, Xe, Y = design(x), design(x_eval), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(X @ w, Y, reduction="sum")
                + 0.5 * (w[1:] ** 2).sum()) / len(Y)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.sigmoid(Xe @ w).detach().numpy()


def probe_r2(features: np.ndarray, truth: np.ndarray) -> float:
    """R² of `truth` [n, k] from `features` [n, d] by least squares with an intercept: the share
    of the truth's variance a linear read-out of the features recovers."""
    x = np.column_stack([features.astype(np.float64), np.ones(len(features))])
    coef, *_ = np.linalg.lstsq(x, truth, rcond=None)
    return float(1.0 - ((truth - x @ coef) ** 2).sum() / ((truth - truth.mean(axis=0)) ** 2).sum())


def _probes(data: Path, snap, ads: np.ndarray) -> Dict[str, Dict[str, float]]:
    """Per domain: the linear probe's R² for users, Pins, and the Pins among `ads`."""
    truth = dict(zip(("users", "pins"), latent_state(data, snap.manifest["cut_day"])))
    out = {}
    for domain in snap.domains:
        r2 = {}
        for entity in ("users", "pins"):
            table = snap.table(domain, entity)
            r2[entity] = round(probe_r2(table.vectors, truth[entity][table.ids]), 4)
        pins = snap.table(domain, "pins")
        shown = np.isin(pins.ids, ads)
        r2["ad_pins"] = round(probe_r2(pins.vectors[shown], truth["pins"][pins.ids[shown]]), 4)
        out[domain] = r2
    return out


def measure(data: Path, snapshots: Path,
            version: Optional[str] = None) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    split = default_split(SourceTables(data).days("ad_events"))
    first, last = split.downstream_days
    train_days = [d for d in SourceTables(data).days("ad_events") if first <= d <= last]
    join = SnapshotJoin(snapshots, (), version)
    domains = join.snapshot(join.version_on(split.eval_day)).domains
    train, test = _features(data, join, train_days), _features(data, join, [split.eval_day])
    snapshot_cols = [f"dot_{d}" for d in domains]  # 0 where a vector is missing
    correlation = {}
    for d in domains:
        found = test[f"found_{d}"] > 0
        correlation[d] = float(np.corrcoef(test[f"dot_{d}"][found], test["affinity"][found])[0, 1])

    rows = []
    for task, label, truth in (("ctr", "clicked", "p_click"), ("cvr", "converted", "p_conversion")):
        fit = np.ones(len(train["clicked"]), bool) if task == "ctr" else train["clicked"] > 0
        score = np.ones(len(test["clicked"]), bool) if task == "ctr" else test["clicked"] > 0
        y_fit, y = train[label][fit], test[label][score]
        preds = {"base rate": np.full(len(y), y_fit.mean())}
        for name, cols in (("snapshot dots", snapshot_cols), ("true affinity", ["affinity"])):
            x_fit = np.column_stack([train[c][fit] for c in cols])
            preds[name] = _logistic(x_fit, y_fit, np.column_stack([test[c][score] for c in cols]))
        preds["true probability"] = test[truth][score]
        for name, p in preds.items():
            m = binary_metrics(p, y)
            rows.append({"task": task, "predictor": name, "rows": m["rows"], "positives": m["positives"],
                         "ne": f"{m['ne']:.4f}", "auc": f"{m['auc']:.4f}"})  # 4 decimals in the table too
    versions = {day: join.version_on(day) for day in [*train_days, split.eval_day]}
    meta = {"versions": versions, "fit_days": f"{first}..{last}", "eval_day": split.eval_day,
            "dot_true_affinity_correlation": {d: round(c, 4) for d, c in correlation.items()},
            "eval_rows_with_vectors": round(float(np.mean(test[f"found_{domains[0]}"])), 4),
            "latent_probe_r2": _probes(data, join.snapshot(versions[split.eval_day]),
                                       np.unique(test["pin_id"]))}
    return rows, meta


def main(argv: Optional[List[str]] = None) -> None:
    config = report.parse_config(HeadroomConfig, argv, __doc__)
    rows, meta = measure(config.data, config.snapshots, config.version)
    meta = {**report.machine(), **meta, "command": report.command("derl.benchmarks.studies.headroom", config)}
    print(report.write(config.out, "headroom", rows, meta).read_text())


if __name__ == "__main__":
    main()
