"""`derl bench --suite seqrec`: leave-one-out full-ranking benchmark of sequential recommenders
on public data, beside the published figures (docs/seqrec.md).

    derl bench --suite seqrec --out DIR [--dataset NAME[=PATH] ...]
        [--models popularity,sasrec,sasrec-ssm] [--epochs N] [--eval-every N] [--patience N]
        [--threads N] [--device auto|cpu|cuda] [model and training flags, below]
    python -m derl.benchmarks.studies.seqrec.suite ...   (the same, without --suite)

Datasets: a known NAME alone takes its default file (DATASETS: beauty, sports, ml-100k, under
../shared/data beside the repository); NAME=PATH reads any sequence-lines file, RecBole .inter,
MovieLens-100K u.data or MovieLens-1M ratings.dat (the format is detected from the content).
Default: every known dataset.

Each (dataset, model) run keeps its state in DIR/state/<dataset>-<model>.pt (saved at every
validation evaluation) and, when done, its result in DIR/results/<dataset>-<model>.json. A rerun
of the same command continues the unfinished runs and skips the finished ones (their results
kept; delete the result file to rerun one). After every run the suite rewrites, from every
result under DIR/results: DIR/bench.json (`seqrec.<dataset>.<model>`: test HR/NDCG@5/10/20,
the same on validation under `val`, train_s, train_examples_per_s, s_per_epoch, epochs,
best_epoch, and the command that reproduces the row), DIR/bench.md (a table per dataset
beside the published figures) and DIR/seqrec.png (validation NDCG@10 over epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from derl.benchmarks.studies.seqrec import metrics
from derl.benchmarks.studies.seqrec.data import Split, load
from derl.benchmarks.studies.seqrec.models import MODELS
from derl.benchmarks.studies.seqrec.train import SELECT, Settings, fit
from derl.launchers.runtime.config import add_flags

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"  # ../shared/data beside the repository
DATASETS = {
    "beauty": DATA / "amazon-seq" / "Beauty.txt",
    "sports": DATA / "amazon-seq" / "Sports_and_Outdoors.txt",
    "ml-100k": DATA / "movielens-100k" / "ml-100k.inter",
}
DEFAULT_MODELS = "popularity,sasrec,sasrec-ssm"

# Published figures under this protocol (leave-one-out, full ranking, history removed, max
# length 50): HR@10 (= Recall@10) and NDCG@10, test. Copied from ../shared/data/README.md.
S3REC = "S3-Rec repository README, all-item table (RUCAIBox/CIKM2020-S3Rec)"
TIGER = "TIGER (Rajput et al., NeurIPS 2023), Table 1"
ESASREC = "eSASRec (arXiv 2508.06450, RecSys 2025), Table 1"
PUBLISHED: Dict[str, Dict[str, Dict[str, object]]] = {
    "beauty": {
        "popularity": {"hr@10": 0.0152, "ndcg@10": 0.0068, "source": S3REC},
        "SASRec": {"hr@10": 0.0605, "ndcg@10": 0.0318, "source": S3REC},
        "BERT4Rec": {"hr@10": 0.0347, "ndcg@10": 0.0170, "source": S3REC},
        "S3-Rec": {"hr@10": 0.0647, "ndcg@10": 0.0327, "source": S3REC},
        "TIGER": {"hr@10": 0.0648, "ndcg@10": 0.0384, "source": TIGER},
        "SASRec, sampled softmax (256 negatives)": {"hr@10": 0.0921, "ndcg@10": 0.0531, "source": ESASREC},
        "eSASRec": {"hr@10": 0.0928, "ndcg@10": 0.0523, "source": ESASREC},
    },
    "sports": {
        "popularity": {"hr@10": 0.0094, "ndcg@10": 0.0053, "source": S3REC},
        "SASRec": {"hr@10": 0.0350, "ndcg@10": 0.0192, "source": S3REC},
        "BERT4Rec": {"hr@10": 0.0191, "ndcg@10": 0.0099, "source": S3REC},
        "S3-Rec": {"hr@10": 0.0385, "ndcg@10": 0.0204, "source": S3REC},
        "TIGER": {"hr@10": 0.0400, "ndcg@10": 0.0225, "source": TIGER},
        "SASRec, sampled softmax (256 negatives)": {"hr@10": 0.0569, "ndcg@10": 0.0314, "source": ESASREC},
        "eSASRec": {"hr@10": 0.0560, "ndcg@10": 0.0323, "source": ESASREC},
    },
}
# Our model -> its published counterpart (the gap columns of bench.md).
COUNTERPART = {"popularity": "popularity", "popularity-all": "popularity", "sasrec": "SASRec",
               "sasrec-ssm": "SASRec, sampled softmax (256 negatives)"}
KEEP = ("train_s", "train_examples_per_s", "s_per_epoch", "epochs", "best_epoch", "stopped",
        "eval_s", "positions_per_epoch", "params", "device", "threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=["seqrec"], default="seqrec", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, required=True, help="folder for the results and the state")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME[=PATH]",
                   help=f"repeat; known names: {', '.join(DATASETS)} (default: all of them)")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of {', '.join(MODELS)}")
    add_flags(p, Settings, unset="or the model's own")


def settings_for(model: str, args: argparse.Namespace) -> Settings:
    """Settings defaults, then the model's own, then the flags given."""
    values = dict(MODELS[model].defaults)
    for f in dataclasses.fields(Settings):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return Settings(**values)


def datasets_of(specs: Sequence[str]) -> Dict[str, Path]:
    if not specs:
        return dict(DATASETS)
    out = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            if name not in DATASETS:
                raise SystemExit(f"--dataset {name}: unknown name (known: {', '.join(DATASETS)}); use NAME=PATH")
            out[name] = DATASETS[name]
        else:
            out[name] = Path(path)
    return out


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    argv = list(sys.argv[1:] if argv is None else argv)
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="derl bench --suite seqrec", description=" ".join(intro.split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    add_arguments(p)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown} (known: {', '.join(MODELS)})")
    out: Path = args.out
    (out / "results").mkdir(parents=True, exist_ok=True)
    command = " ".join(["derl bench", *(argv if "--suite" in argv else ["--suite", "seqrec", *argv])])
    errors: Dict[str, str] = {}
    t0, load_start = time.time(), _load_avg()
    for name, path in datasets_of(args.dataset).items():
        todo = [m for m in models if not (out / "results" / f"{name}-{m}.json").is_file()]
        if not todo:
            print(f"seqrec {name}: every model done ({', '.join(models)})", flush=True)
            continue
        try:
            seqs = load(path)
            split = Split(seqs)
        except Exception as e:  # a bad dataset leaves the others measured
            errors[name] = f"{type(e).__name__}: {e}"
            print(f"seqrec {name}: FAILED to load {path}: {e}", flush=True)
            continue
        stats = split.stats()
        print(f"seqrec {name} ({seqs.fmt}, {path}): {stats}", flush=True)
        for m in todo:
            spec, settings = MODELS[m], settings_for(m, args)
            try:
                model = spec.build(split, settings)
                result = (spec.fit or fit)(model, split, settings, out / "state" / f"{name}-{m}.pt",
                                           trainable=spec.trainable, desc=f"{name}/{m}")
            except Exception:
                errors[f"{name}/{m}"] = traceback.format_exc()
                print(f"seqrec {name}/{m}: FAILED\n{errors[f'{name}/{m}']}", flush=True)
                continue
            result = {"dataset": name, "model": m, "path": str(path), "format": seqs.fmt,
                      "stats": stats, "label": spec.label, **result}
            (out / "results" / f"{name}-{m}.json").write_text(json.dumps(result, indent=1))
            t, v = result["test"], result["val"]
            print(f"seqrec {name}/{m}: test hr@10 {t['hr@10']:.4f} ndcg@10 {t['ndcg@10']:.4f} "
                  f"(val {v['ndcg@10']:.4f}), {result['epochs']} epochs (best {result['best_epoch']}), "
                  f"{result['s_per_epoch']} s/epoch", flush=True)
            write(out, command, errors, {"start": load_start, "end": _load_avg()}, time.time() - t0)
    return write(out, command, errors, {"start": load_start, "end": _load_avg()}, time.time() - t0)


def gather(out: Path) -> Dict[str, Dict[str, Dict[str, object]]]:
    """Every finished run under DIR/results: {dataset: {model: result}}."""
    found: Dict[str, Dict[str, Dict[str, object]]] = {}
    for f in sorted((out / "results").glob("*.json")):
        r = json.loads(f.read_text())
        found.setdefault(r["dataset"], {})[r["model"]] = r
    rank = {m: i for i, m in enumerate(MODELS)}  # the registry's order
    return {ds: dict(sorted(runs.items(), key=lambda kv: rank.get(kv[0], len(rank))))
            for ds, runs in found.items()}


def in_progress(out: Path, done: Dict[str, Dict[str, object]]) -> List[Dict[str, object]]:
    """Unfinished runs' latest state (epoch, best validation), from DIR/state."""
    import torch

    rows = []
    for f in sorted((out / "state").glob("*.pt")) if (out / "state").is_dir() else []:
        ds, model = _split_name(f.stem)
        if model in done.get(ds, {}):
            continue
        try:
            st = torch.load(f, map_location="cpu", weights_only=False)
        except Exception:
            continue
        rows.append({"dataset": ds, "model": model, "epoch": st["epoch"],
                     "best_val_" + SELECT: st["best"]["value"], "best_epoch": st["best"]["epoch"],
                     "s_per_epoch": round(st["train_s"] / max(st["epoch"], 1), 3), "curve": st["curve"]})
    return rows


def _split_name(stem: str) -> tuple:
    """'<dataset>-<model>' -> (dataset, model); model names may hold dashes."""
    for m in sorted(MODELS, key=len, reverse=True):
        if stem.endswith("-" + m):
            return stem[: -len(m) - 1], m
    ds, _, m = stem.rpartition("-")
    return ds, m


def write(out: Path, command: str, errors: Dict[str, str], load: Dict[str, float],
          wall_s: float) -> Dict[str, object]:
    from derl.benchmarks.report import machine

    import torch

    found = gather(out)
    running = in_progress(out, found)
    bench = {
        "suite": "seqrec", "command": command, "machine": machine(cores=True),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_1m": load, "wall_s": round(wall_s, 1), "select": "val " + SELECT,
        "seqrec": {ds: {m: {**r["test"], "val": r["val"], **{k: r.get(k) for k in KEEP},
                            "command": row_command(out, r)}
                        for m, r in runs.items()} for ds, runs in found.items()},
        "datasets": {ds: {"path": next(iter(runs.values()))["path"], **next(iter(runs.values()))["stats"]}
                     for ds, runs in found.items()},
        "in_progress": [{k: v for k, v in r.items() if k != "curve"} for r in running],
        "published": PUBLISHED, "errors": errors,
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=1))
    (out / "bench.md").write_text(markdown(bench, found))
    plot(found, running, out / "seqrec.png")
    return bench


def row_command(out: Path, result: Dict[str, object]) -> str:
    """The `derl bench` command that reproduces one result: its dataset and model, and every
    setting it ran with that is not that model's default, the derl_* ones for derl only (the
    result records its settings, so the command holds for rows measured by any invocation)."""
    defaults = dataclasses.asdict(Settings(**MODELS[result["model"]].defaults))
    name, path = result["dataset"], Path(result["path"])
    dataset = name if DATASETS.get(name) == path else f"{name}={path}"
    flags = []
    for key, value in result["settings"].items():
        if value == defaults.get(key, value) or (key.startswith("derl_") and result["model"] != "derl"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag}={shlex.quote(str(value))}" if str(value).startswith("-") or " " in str(value)
                         else f"{flag} {value}")
    return " ".join(["derl bench --suite seqrec --out", shlex.quote(str(out)), "--dataset", shlex.quote(dataset),
                     "--models", result["model"], *flags])


def _gap(measured: float, published: Optional[float]) -> str:
    return "-" if not published else f"{100 * (measured / published - 1):+.1f} %"


def markdown(bench: Dict[str, object], found: Dict[str, Dict[str, Dict[str, object]]]) -> str:
    m = bench["machine"]
    lines = ["# derl bench (seqrec suite)", "", f"Last invocation: `{bench['command']}`; each row's own "
             "command is under its table.", "",
             f"{bench['device']} ({m['cpu']}, {m['cores']} cores, torch {m['torch']}), {m['date']}; "
             f"1-minute load average {bench['loadavg_1m']['start']} at start, {bench['loadavg_1m']['end']} "
             f"at the end of this invocation. Leave-one-out, full ranking over every item, the user's "
             f"earlier items removed, history capped at the model's max_len; model selection and early "
             f"stopping on validation NDCG@10; figures are test unless marked val.", ""]
    for ds, runs in found.items():
        first = next(iter(runs.values()))
        st = first["stats"]
        trained = next((r for r in runs.values() if r.get("positions_per_epoch")), None)
        pub = PUBLISHED.get(ds, {})
        lines += [f"## {ds}", "",
                  f"{st['users']:,} users, {st['items']:,} items, {st['interactions']:,} interactions "
                  + (f"({trained['positions_per_epoch']:,} training positions per epoch, history "
                     f"capped at {trained['settings']['max_len']})." if trained else "."), "",
                  "| model | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | val NDCG@10 "
                  "| published HR@10 / NDCG@10 "
                  "| gap HR@10 / NDCG@10 | epochs (best) | s/epoch | positions/s |",
                  "|" + "---|" * 13]
        for name, r in runs.items():
            t = r["test"]
            ref = pub.get(COUNTERPART.get(name, ""), {})
            published = f"{ref['hr@10']:.4f} / {ref['ndcg@10']:.4f}" if ref else "-"
            gap = f"{_gap(t['hr@10'], ref.get('hr@10'))} / {_gap(t['ndcg@10'], ref.get('ndcg@10'))}" if ref else "-"
            speed = r.get("train_examples_per_s")
            lines.append(f"| {name} | " + " | ".join(f"{t[k]:.4f}" for k in metrics.NAMES)
                         + f" | {r['val']['ndcg@10']:.4f} | {published} | {gap} | {r['epochs']} ({r['best_epoch']}) | "
                         + (f"{r['s_per_epoch']:.2f}" if r.get("s_per_epoch") else "-") + " | "
                         + (f"{speed:,.0f}" if speed else "-") + " |")
        lines += ["", "Each row's command (a rerun skips a row whose DIR/results/<dataset>-<model>.json is "
                  "there: delete it to rerun the row):", "", "```",
                  *(bench["seqrec"][ds][name]["command"] for name in runs), "```"]
        if pub:
            lines += ["", "Published (test HR@10 / NDCG@10): "
                      + "; ".join(f"{k} {v['hr@10']:.4f} / {v['ndcg@10']:.4f}" for k, v in pub.items())
                      + ". Sources: " + "; ".join(dict.fromkeys(str(v["source"]) for v in pub.values())) + "."]
        if "sasrec" in runs and "SASRec" in pub:
            t = runs["sasrec"]["test"]
            lines += ["", f"**sasrec vs the published SASRec: HR@10 {_gap(t['hr@10'], pub['SASRec']['hr@10'])}, "
                          f"NDCG@10 {_gap(t['ndcg@10'], pub['SASRec']['ndcg@10'])}** (the yardstick: within "
                          f"±15 %)."]
        lines.append("")
    if bench["in_progress"]:
        lines += ["## Unfinished runs (latest saved state)", "",
                  "| dataset | model | epoch | best val NDCG@10 | at epoch | s/epoch |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['model']} | {r['epoch']} | {r['best_val_' + SELECT]:.4f} | "
                  f"{r['best_epoch']} | {r['s_per_epoch']:.2f} |" for r in bench["in_progress"]]
        lines.append("")
    lines += ["s/epoch and positions/s: the training loop only (evaluation and checkpoints excluded); a "
              "position is one training target scored (one user's next item at one step of their "
              "window). When the load average is above the core count other processes shared the "
              "cores: the speeds are then lower bounds.", ""]
    if bench["errors"]:
        lines += ["## Failed runs", ""] + [f"- {k}: {v.strip().splitlines()[-1]}" for k, v in bench["errors"].items()]
        lines.append("")
    lines.append("Plot: `seqrec.png` (validation NDCG@10 over epochs).")
    return "\n".join(lines) + "\n"


def plot(found: Dict[str, Dict[str, Dict[str, object]]], running: List[Dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: Dict[str, Dict[str, List[Dict[str, object]]]] = {}
    for ds, runs in found.items():
        for m, r in runs.items():
            curves.setdefault(ds, {})[m] = r.get("curve", [])
    for r in running:
        curves.setdefault(r["dataset"], {})[r["model"] + " (running)"] = r["curve"]
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    key = "val_" + SELECT
    for ax, (ds, runs) in zip(axes[0], curves.items()):
        for i, (m, curve) in enumerate(runs.items()):
            pts = [(c["epoch"], c[key]) for c in curve if key in c]
            if len(pts) == 1 and pts[0][0] == 0:  # not trained: a level
                ax.axhline(pts[0][1], color=f"C{i}", ls="--", lw=1, label=m)
            elif pts:
                ax.plot(*zip(*pts), color=f"C{i}", lw=1.3, label=m)
        for j, (name, v) in enumerate(PUBLISHED.get(ds, {}).items()):
            if name in ("SASRec", "SASRec, sampled softmax (256 negatives)"):
                ax.axhline(v["ndcg@10"], color="grey", ls=":", lw=0.8)
                ax.annotate(f"published {name} (test)", (0, v["ndcg@10"]), fontsize=6, color="grey",
                            textcoords="offset points", xytext=(2, 2))
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    result = run(argv)
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
