"""Ranking metrics for the CTR/CVR heads: TorchRec's own metrics, plus bootstrap intervals.

Point estimates (normalised entropy, ROC-AUC, PR-AUC, calibration) come from `torchrec.metrics`.
Intervals come from a paired bootstrap over impressions: two models scored on the same rows are
resampled together, so the interval of their NE difference excludes the noise they share. The
bootstrap needs NE thousands of times, so it has a vectorised NumPy NE of its own, which a test
holds equal to TorchRec's.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import torch
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.auprc import AUPRCMetric
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric

# Our name -> (torchrec metric, the name its results carry).
_METRICS = {"ne": (NEMetric, "ne"), "auc": (AUCMetric, "auc"), "pr_auc": (AUPRCMetric, "auprc"),
            "calibration": (CalibrationMetric, "calibration")}
_EPS = 1e-12  # TorchRec's NE clamps probabilities the same way


def binary_metrics(pred: np.ndarray, label: np.ndarray, task: str = "task") -> Dict[str, float]:
    """NE, ROC-AUC, PR-AUC and calibration of `pred` against 0/1 `label`, by torchrec.metrics
    (the whole array as one window, computed locally even inside a process group); plus rows
    and positives."""
    pred_t = torch.as_tensor(np.asarray(pred, dtype=np.float64))
    label_t = torch.as_tensor(np.asarray(label, dtype=np.float64))
    out: Dict[str, float] = {"rows": int(len(label_t)), "positives": int(label_t.sum())}
    if not len(label_t):
        return out
    info = [RecTaskInfo(name=task, label_name="label", prediction_name="pred", weight_name="w")]
    for name, (cls, key_name) in _METRICS.items():
        # Local: the arrays are the whole data set, so never sync with other ranks.
        metric = cls(world_size=1, my_rank=0, batch_size=len(label_t), tasks=info,
                     window_size=len(label_t) + 1, sync_on_compute=False)
        metric.update(predictions={task: pred_t}, labels={task: label_t},
                      weights={task: torch.ones_like(label_t)})
        values = metric.compute()
        key = next(k for k in values if k.endswith(("lifetime_" + key_name, "window_" + key_name)))
        out[name] = float(values[key])
    return out


def normalized_entropy(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """NE along the last axis: cross entropy over that of predicting the mean label. Works on
    [n] or [resamples, n] arrays (the bootstrap)."""
    p = np.clip(pred, _EPS, 1 - _EPS)
    ce = -(label * np.log(p) + (1 - label) * np.log(1 - p)).mean(axis=-1)
    base = np.clip(label.mean(axis=-1), _EPS, 1 - _EPS)
    return ce / -(base * np.log(base) + (1 - base) * np.log(1 - base))


def bootstrap_ne_gain(label: np.ndarray, pred: np.ndarray, baseline: np.ndarray,
                      resamples: int = 1000, seed: int = 0, chunk: int = 100) -> Dict[str, float]:
    """Relative NE gain of `pred` over `baseline` on the same rows, (NE_base − NE) / NE_base,
    with a 95 % paired-bootstrap interval. Positive: `pred` is better."""
    rng = np.random.default_rng(seed)
    n = len(label)
    gains = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        base = normalized_entropy(baseline[idx], label[idx])
        gains.append((base - normalized_entropy(pred[idx], label[idx])) / base)
    gains = np.concatenate(gains)
    point = normalized_entropy(baseline, label)
    point = (point - normalized_entropy(pred, label)) / point
    lo, hi = np.percentile(gains, [2.5, 97.5])
    return {"gain": float(point), "ci_low": float(lo), "ci_high": float(hi),
            "resamples": resamples, "significant": bool(lo > 0 or hi < 0)}


def ranker_metrics(rows: Mapping[str, np.ndarray], mask: Optional[np.ndarray] = None) -> Dict[str, Dict[str, float]]:
    """CTR metrics on all impressions; with a CVR head (a `p_cvr` column), CVR (pCVR vs
    converted) on clicked impressions and CTCVR (pCTR·pCVR vs converted) on all. `rows`:
    columns p_ctr, clicked, converted and, from a ranker with a CVR head, p_cvr."""
    keep = np.ones(len(rows["clicked"]), dtype=bool) if mask is None else mask
    clicked = rows["clicked"][keep]
    p_ctr = rows["p_ctr"][keep]
    out = {"ctr": binary_metrics(p_ctr, clicked, "ctr")}
    if "p_cvr" in rows:
        converted, p_cvr = rows["converted"][keep], rows["p_cvr"][keep]
        on_click = clicked > 0
        out["cvr"] = binary_metrics(p_cvr[on_click], converted[on_click], "cvr")
        out["ctcvr"] = binary_metrics(p_ctr * p_cvr, converted, "ctcvr")
    return out
