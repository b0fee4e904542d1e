"""`derl evaluate`: the downstream report — rankers side by side on the held-out day.

    derl evaluate --runs none=RUN_A snapshot=RUN_B coupled=RUN_C --data WORLD --snapshots SNAP --out DIR

Reads each ranker run's scored evaluation rows (RUN/predictions) and metrics, and writes
DIR/report.json, DIR/report.md and DIR/ne_over_steps.png:
- per run: CTR NE / ROC-AUC / PR-AUC / calibration, CVR (on clicked rows) NE / AUC, throughput;
- the relative NE gain of every run over the baseline run, on the same rows, with a 95 %
  paired-bootstrap interval (a gain whose interval excludes 0 is told apart from noise);
- what coupled costs: its train and scoring throughput against snapshot's, for its NE;
- cold start: the same metrics on impressions whose user, or whose ad, the snapshot live on the
  evaluation day does not hold (new on that day), and on the rest;
- ad retrieval: recall@K of the clicked ads through the snapshot's faiss index, per domain,
  against popularity (the K most clicked ads of the training days).

Refused before anything is written, naming the run: runs of different evaluation days, a run
whose predictions are not every impression of its day once (a rank's part lost, another day's or
world's rows: `_require_whole`), and a run of another world than --data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from derl.datapipes.snapshots import Snapshot, SnapshotJoin
from derl.datapipes.sources import SourceTables
from derl.launchers.runtime import runs as run_folder
from derl.launchers.runtime.settings import EvaluateConfig
from derl.launchers.runtime.upstream_eval import RECALL_KS
from derl.models.metrics import bootstrap_ne_gain, ranker_metrics



def validate(cfg: EvaluateConfig) -> None:
    _runs(cfg.runs)


def _runs(specs: Sequence[str]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        run = Path(path if sep else spec)
        name = name if sep else run.name
        if not (run / run_folder.METRICS).is_file():
            raise FileNotFoundError(f"--runs {spec}: {run} has no metrics.json (not a finished ranker run)")
        if name in found:
            raise ValueError(f"--runs: two runs named {name!r}")
        found[name] = run
    return found


def _scored_data(run: Path, given: Optional[Path]) -> Path:
    """The world a run scored: --data, once it is the run's own world, else the folder the run
    records (a score run: its --data, else its ranker's)."""
    config = run_folder.read_config(run)
    recorded = (config.get("data") or config["settings"].get("data")
                or run_folder.read_config(Path(config["ranker"]))["data"])
    if given is None:
        return Path(recorded)
    run_folder.require_world(f"--runs {run}", config.get("world"), recorded, given)
    return given


def _require_whole(name: str, run: Path, preds: Dict[str, np.ndarray], day: str, data: Path,
                   world_size: int) -> None:
    """A run's predictions are every impression of its evaluation day, each once: a lost
    rank's part, or rows of another day or world, are refused naming the run."""
    want = SourceTables(data).read("ad_events", (day, day), columns=["request_id"]).column("request_id").to_numpy()
    got = preds["request_id"]
    if len(got) == len(want) and np.array_equal(np.sort(got), np.sort(want)):
        return
    scored = int(np.isin(want, got).sum())
    parts = len(list((run / run_folder.PREDICTIONS).glob("part-*.parquet")))
    beyond = f", and {len(got) - scored:,} rows beyond them" if len(got) > scored else ""
    raise ValueError(f"--runs {name}={run}: its predictions hold {scored:,} of the {len(want):,} impressions "
                     f"of its evaluation day {day} in {data}{beyond} ({parts} prediction part(s) from "
                     f"{world_size} rank(s)); score the run again (derl score)")


def _aligned(preds: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Dict[str, np.ndarray]]:
    """Every run's rows in one request_id order; runs scored on other rows are refused."""
    out = {}
    reference = None
    for name, p in preds.items():
        order = np.argsort(p["request_id"], kind="stable")
        p = {k: v[order] for k, v in p.items()}
        if reference is None:
            reference = p["request_id"]
        elif not np.array_equal(reference, p["request_id"]):
            raise ValueError(f"run {name!r} was scored on other impressions than the others: "
                             "compare runs evaluated on the same day of the same data")
        out[name] = p
    return out


def cold_masks(snapshots: Path, day: str, rows: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Impressions whose user / ad the snapshot live on `day` does not hold."""
    join = SnapshotJoin(snapshots, ("engagement/users", "engagement/pins"))
    snap = join.snapshot(join.version_on(day))
    new_user = snap.table("engagement", "users").lookup(rows["user_id"])[1]
    new_ad = snap.table("engagement", "pins").lookup(rows["pin_id"])[1]
    return {"new_user": new_user, "new_ad": new_ad, "warm": ~new_user & ~new_ad}


def ad_retrieval(snapshots: Path, data: Path, day: str, train_days) -> Dict[str, object]:
    """recall@K of each clicked (user, ad) pair of `day` through the faiss ad index of the
    version live that day, per domain, and of the most clicked ads of the training days."""
    sources = SourceTables(data)
    events = sources.read("ad_events", (day, day), columns=["user_id", "pin_id", "clicked"])
    clicked = events.column("clicked").to_numpy() > 0
    users, ads = events.column("user_id").to_numpy()[clicked], events.column("pin_id").to_numpy()[clicked]
    past = sources.read("ad_events", tuple(train_days), columns=["pin_id", "clicked"])
    ids, counts = np.unique(past.column("pin_id").to_numpy()[past.column("clicked").to_numpy() > 0],
                            return_counts=True)
    popular = ids[np.argsort(-counts, kind="stable")[:max(RECALL_KS)]]
    version = SnapshotJoin(snapshots, ("engagement/users",)).version_on(day)
    snap = Snapshot(snapshots, version)
    out: Dict[str, object] = {"version": version, "pairs": int(len(users)),
                              "popularity": {f"recall@{k}": float(np.isin(ads, popular[:k]).mean()) if len(ads) else 0.0
                                             for k in RECALL_KS}}
    for domain in snap.domains:
        top, _, missing = snap.retrieve_ads(domain, users, max(RECALL_KS))
        known = ~missing
        hits = top[known] == ads[known, None]
        out[domain] = {"users_in_snapshot": int(known.sum()),
                       **{f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) if known.any() else 0.0
                          for k in RECALL_KS}}
    return out


def run(cfg: EvaluateConfig) -> Dict[str, object]:
    runs = _runs(cfg.runs)
    metrics = {n: run_folder.read_metrics(r) for n, r in runs.items()}
    days = {m["eval_day"] for m in metrics.values()}
    if len(days) != 1:
        raise ValueError(f"runs were evaluated on different days: {sorted(days)}")
    day = days.pop()
    preds = {n: run_folder.read_predictions(r) for n, r in runs.items()}
    for name, run in runs.items():
        _require_whole(name, run, preds[name], day, _scored_data(run, cfg.data), metrics[name]["world_size"])
    preds = _aligned(preds)
    rows = next(iter(preds.values()))
    # CVR where every ranker has a CVR head (a source without conversions trains none).
    tasks = ("ctr", "cvr") if all("cvr" in m["eval"] for m in metrics.values()) else ("ctr",)
    report: Dict[str, object] = {"eval_day": day, "rows": int(len(rows["clicked"])),
                                 "clicks": int(rows["clicked"].sum()),
                                 "conversions": int(rows["converted"].sum()), "tasks": list(tasks), "runs": {}}
    for name, m in metrics.items():
        report["runs"][name] = {
            "path": str(runs[name]), "upstream": m["upstream"], "vectors": m["vectors"],
            "projection_dim": m.get("projection_dim"), "world_size": m["world_size"],
            "train_versions": m["snapshot_versions"], "eval_versions": m["eval_versions"],
            "train_examples_per_s": m["train_examples_per_s"],
            "score_examples_per_s": m["score_examples_per_s"], **m["eval"]}
    if cfg.baseline in preds:
        base = preds[cfg.baseline]
        report["ne_gain_over_baseline"] = {
            "baseline": cfg.baseline,
            **{name: {task: bootstrap_ne_gain(*_task_rows(p, base, task), resamples=cfg.resamples)
                      for task in tasks}
               for name, p in preds.items() if name != cfg.baseline}}
    # Each mode's representative run: the one named after it, else its first (the pipeline also
    # runs the vector ablation in snapshot mode, under other names).
    by_mode: Dict[str, str] = {}
    for name, m in metrics.items():
        if name == m["upstream"] or m["upstream"] not in by_mode:
            by_mode[m["upstream"]] = name
    report["modes"] = {
        mode: {"run": name, "ctr_ne": report["runs"][name]["ctr"]["ne"],
               "ctr_auc": report["runs"][name]["ctr"]["auc"],
               **{f"cvr_{k}": report["runs"][name]["cvr"][k] for k in ("ne", "auc") if "cvr" in tasks},
               "train_examples_per_s": report["runs"][name]["train_examples_per_s"]}
        for mode, name in by_mode.items()}
    gains = report.get("ne_gain_over_baseline", {}).get(by_mode.get("snapshot", ""), {})
    if by_mode.get("none") == cfg.baseline and gains:  # the headline: snapshot over none
        for task in tasks:
            report[f"{task}_ne_gain"] = gains[task]["gain"]
            report[f"{task}_ne_gain_ci_low"] = gains[task]["ci_low"]
            report[f"{task}_ne_gain_ci_high"] = gains[task]["ci_high"]
    if "coupled" in by_mode and "snapshot" in by_mode:
        s, c = report["runs"][by_mode["snapshot"]], report["runs"][by_mode["coupled"]]
        report["coupled_vs_snapshot"] = {
            "train_throughput_ratio": c["train_examples_per_s"] / s["train_examples_per_s"],
            "score_throughput_ratio": c["score_examples_per_s"] / s["score_examples_per_s"],
            "ctr_ne_delta": c["ctr"]["ne"] - s["ctr"]["ne"]}
    if cfg.snapshots is not None:
        masks = cold_masks(cfg.snapshots, day, rows)
        report["cold_start"] = {
            seg: {"rows": int(mask.sum()), "clicks": int(rows["clicked"][mask].sum()),
                  **{name: ranker_metrics(p, mask)["ctr"] for name, p in preds.items()}}
            for seg, mask in masks.items()}
        if cfg.data is not None:
            train_days = next(iter(metrics.values()))["train_days"]
            report["ad_retrieval"] = ad_retrieval(cfg.snapshots, cfg.data, day, train_days)
    cfg.out.mkdir(parents=True, exist_ok=True)
    run_folder.write_json(cfg.out / "report.json", report)
    curves = {n: json.loads((r / run_folder.TRAIN_NE).read_text()) for n, r in runs.items()
              if (r / run_folder.TRAIN_NE).is_file()}
    plot_ne(curves, cfg.out / "ne_over_steps.png")
    (cfg.out / "report.md").write_text(render(report))
    print((cfg.out / "report.md").read_text())
    return report


def _task_rows(p: Dict[str, np.ndarray], base: Dict[str, np.ndarray], task: str):
    """(labels, predictions, baseline predictions) of a task on its rows."""
    if task == "ctr":
        return p["clicked"], p["p_ctr"], base["p_ctr"]
    on_click = p["clicked"] > 0
    return p["converted"][on_click], p["p_cvr"][on_click], base["p_cvr"][on_click]


def plot_ne(curves: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in curves.items():
        ax.plot([h["step"] for h in history], [h["ctr_window_ne"] for h in history], label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("CTR normalised entropy (training window)")
    ax.set_title("CTR NE over training, per ranker")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v: Optional[float], digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render(report: Dict[str, object]) -> str:
    """report.md: the tables a person reads."""
    lines = [f"# Downstream evaluation on {report['eval_day']}", "",
             f"{report['rows']:,} impressions, {report['clicks']:,} clicks, "
             f"{report['conversions']:,} conversions."
             + ("" if "cvr" in report["tasks"] else " No conversions: the rankers have no CVR head, "
                "CTR is all there is to compare."), "",
             "| run | upstream | vectors | scored with | CTR NE | CTR AUC | CTR PR-AUC | CTR calibration "
             "| CVR NE | CVR AUC | train ex/s | score ex/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['upstream']} | {r['vectors'] or '–'}"
                     f"{' →' + str(r['projection_dim']) if r.get('projection_dim') else ''} "
                     f"| {', '.join(r['eval_versions']) or '–'} | {_f(r['ctr'].get('ne'))} | {_f(r['ctr'].get('auc'))} "
                     f"| {_f(r['ctr'].get('pr_auc'))} "
                     f"| {_f(r['ctr'].get('calibration'), 3)} | {_f(r.get('cvr', {}).get('ne'))} "
                     f"| {_f(r.get('cvr', {}).get('auc'))} "
                     f"| {r['train_examples_per_s']:,.0f} | {r['score_examples_per_s']:,.0f} |")
    gains = report.get("ne_gain_over_baseline")
    if gains:
        lines += ["", f"Relative NE gain over `{gains['baseline']}` (positive is better; 95 % paired "
                      "bootstrap interval over impressions):", "",
                  "| run | CTR NE gain | interval | CVR NE gain | interval |", "|---|---|---|---|---|"]
        for name, g in gains.items():
            if name == "baseline":
                continue
            cells = [f"{t['gain']:+.2%} | [{t['ci_low']:+.2%}, {t['ci_high']:+.2%}]{' *' if t['significant'] else ''}"
                     if t else "– | –" for t in (g["ctr"], g.get("cvr"))]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines.append("\n\\* the interval excludes 0.")
    cost = report.get("coupled_vs_snapshot")
    if cost:
        lines += ["", f"Coupled against snapshot: {cost['train_throughput_ratio']:.2f}x the training "
                      f"throughput and {cost['score_throughput_ratio']:.2f}x the scoring throughput, "
                      f"for a CTR NE difference of {cost['ctr_ne_delta']:+.4f} (negative: coupled better)."]
    cold = report.get("cold_start")
    if cold:
        names = list(report["runs"])
        lines += ["", "CTR NE by segment (new: not in the snapshot live on the evaluation day):", "",
                  "| segment | rows | clicks | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for seg, s in cold.items():
            lines.append(f"| {seg} | {s['rows']:,} | {s['clicks']:,} | "
                         + " | ".join(_f(s[n].get('ne')) for n in names) + " |")
    ret = report.get("ad_retrieval")
    if ret:
        lines += ["", f"Ad retrieval through the faiss index of snapshot {ret['version']} "
                      f"({ret['pairs']:,} clicked pairs):", "",
                  "| source | " + " | ".join(f"recall@{k}" for k in RECALL_KS) + " |",
                  "|---|" + "---|" * len(RECALL_KS)]
        for src in [d for d in ret if d not in ("version", "pairs")]:
            lines.append(f"| {src} | " + " | ".join(_f(ret[src][f'recall@{k}'], 3) for k in RECALL_KS) + " |")
    lines += ["", "![CTR NE over training steps](ne_over_steps.png)", ""]
    return "\n".join(lines)
