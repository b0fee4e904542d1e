"""The `derl` command: one subcommand per stage, and the one entry module.

    derl <stage> ...  =  python -m derl.launchers.cli <stage> ...  =  torchrun ... -m derl.launchers.cli <stage> ...

The stages are those of the registry (`launchers/registry.py`). A stage's flags are generated
from its config dataclass (`launchers/runtime/settings.py`); the CLI parses them into the config, runs
the stage's `validate` before any worker starts, then its `run` on --nproc local ranks (or
inline, under torchrun / TorchX, which start the ranks themselves). No stage logic lives here,
and nothing imports this module: it sits at the top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from torch.distributed.elastic.multiprocessing.api import SignalException

from derl.datapipes.importers import FORMATS, ImportOptions, import_world, summary as import_summary
from derl.datapipes.snapshots import Snapshot, SnapshotError, catalogue, gc, latest, pinned
from derl.datapipes.sources import DataError, SourceTables
from derl.datapipes.world import WORLD_PRESETS, generate
from derl.launchers.stages import pipeline
from derl.launchers.runtime import quiet, runs
from derl.launchers.runtime.config import add_flags, from_args
from derl.launchers.runtime.dist import CollectiveTimeout, RankFailed, launch
from derl.launchers.registry import REGISTRY, StageSpec
from derl.models import checkpoint
from derl.models.sharding import ShardingError


@dataclass(frozen=True)
class StageCommand:
    """The handler of a registered stage's subcommand: its config from the flags, its checks
    before any worker starts, then its (per-rank) entry."""

    spec: StageSpec

    def __call__(self, args: argparse.Namespace) -> None:
        stage = self.spec.entry()
        cfg = from_args(self.spec.config_class(), args)
        stage.validate(cfg)
        if self.spec.distributed:
            launch(quiet.rank, cfg.nproc, stage.run, cfg)
        else:
            stage.run(cfg)


def _generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    cfg = dataclasses.replace(WORLD_PRESETS[args.preset], **_world_overrides(args))
    with tqdm(total=cfg.num_days, unit="day", desc=f"generate {args.preset}") as bar:
        def progress(line: str) -> None:
            bar.set_postfix_str(line)
            bar.update(1)

        meta = generate(args.out, cfg, seed=args.seed, overwrite=args.overwrite, progress=progress)
    rows = ", ".join(f"{k} {v:,}" for k, v in meta["rows"].items())
    print(f"wrote {args.out}: {rows}")
    print(f"ad CTR {meta['ctr']:.2%}, CVR given click {meta['cvr_given_click']:.1%}, "
          f"{meta['generate_seconds']} s")


def _world_overrides(args: argparse.Namespace) -> Dict[str, float]:
    """`derl generate`'s changes to the preset world: its drift and its share of new entities."""
    out: Dict[str, float] = {}
    if args.daily_drift is not None:
        if not (math.isfinite(args.daily_drift) and args.daily_drift >= 0):
            raise ValueError(f"--daily-drift must be 0 or more, got {args.daily_drift}")
        out["daily_drift"] = args.daily_drift
    if args.new_entity_share is not None:
        if not 0 <= args.new_entity_share < 1:
            raise ValueError(f"--new-entity-share must be at least 0 and below 1, got {args.new_entity_share}")
        out.update(cold_user_fraction=args.new_entity_share, cold_pin_fraction=args.new_entity_share)
    return out


def _import(args: argparse.Namespace) -> None:
    options = ImportOptions(sample_users=args.sample_users, seed=args.seed, from_day=args.from_day,
                            until=args.until, days=args.days, progress=True)
    report = import_world(args.format, args.input, args.out, overwrite=args.overwrite, options=options)
    print(f"wrote {args.out} ({args.format}):\n{import_summary(report)}")


def _inspect(args: argparse.Namespace) -> None:
    summary = SourceTables(args.source).inspect()
    if all(t.get("missing") for t in summary):
        raise DataError(f"{args.source} is not a world: it holds none of the tables "
                        f"{', '.join(t['table'] for t in summary)} (derl generate or derl import write them)")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"{'table':<16}{'files':>6}{'rows':>14}  {'days':<28}ids (min..max)")
    for t in summary:
        if t.get("missing"):
            print(f"{t['table']:<16}{'missing':>6}")
            continue
        ids = ", ".join(f"{c} {lo}..{hi}" for c, (lo, hi) in t["ids"].items())
        print(f"{t['table']:<16}{t['files']:>6}{t['rows']:>14,}  {t['days']:<28}{ids}")


def _snapshots(args: argparse.Namespace) -> None:
    if args.action == "gc":
        if args.keep is None:
            raise ValueError("snapshots gc needs --keep N")
        done = gc(args.root, args.keep, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(done['removed'])} version(s): {', '.join(done['removed']) or '-'}; "
              f"kept {', '.join(done['kept']) or '-'} (pinned: {', '.join(done['pinned']) or '-'}); "
              f"{len(done['leftovers_removed'])} unfinished export folder(s) {verb}")
        for name, why in done["skipped"].items():
            print(f"skipped {name}: {why}")
        return
    if args.action == "list":
        newest, pins = latest(args.root), pinned(args.root)
        found, skipped = catalogue(args.root)
        for v, m in found:
            rows = ", ".join(f"{d}: {i['rows']['users']:,} users {i['rows']['pins']:,} pins"
                             for d, i in m["domains"].items())
            print(f"{v}{' (LATEST)' if v == newest else ''}{' (pinned)' if v in pins else ''}"
                  f"  cut {m['cut_day']}  dim {m['dim']}  {rows}")
        for name, why in skipped.items():
            print(f"not a version: {name} ({why})")
        return
    if args.action == "publish":
        return _publish(args)
    snap = Snapshot(args.root, args.version, check=args.action == "verify")
    if args.action == "verify":
        rows = ", ".join(f"{d} {i['rows']['users']:,} users {i['rows']['pins']:,} pins {i['rows']['ads']:,} ads"
                         for d, i in snap.manifest["domains"].items())
        print(f"{snap.path}: OK ({len(snap.manifest['files'])} files, sha256 verified; rows as stated, "
              f"vectors finite: {rows})")
    else:
        print(json.dumps({k: v for k, v in snap.manifest.items() if k != "files"}, indent=2))


def _publish(args: argparse.Namespace) -> None:
    from derl.datapipes.snapshots import redis_store

    if args.redis is None:
        raise ValueError("snapshots publish needs --redis redis://HOST:PORT[/DB]")
    client = redis_store.connect(args.redis)
    with Snapshot(args.root, args.version) as snap:
        done = redis_store.publish(snap, client, args.expire_after)
    users = ", ".join(f"{d} {n:,} users" for d, n in done["users"].items())
    moved = f"{redis_store.LATEST_KEY} -> {done['tag']}" if done["latest"] == done["tag"] else \
        f"{redis_store.LATEST_KEY} stays on {done['latest']} (cut later)"
    print(f"published {done['tag']} to {args.redis}: {users}; {moved}; "
          f"{len(done['expiring'])} older version(s) expire in {args.expire_after} s")


def _retrieve(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    snap = Snapshot(args.snapshots, args.version)
    pins, scores, missing = snap.retrieve_ads(args.domain, [args.user], args.k)
    if missing[0]:
        raise SnapshotError(f"user {args.user} is not in snapshot {snap.version} ({args.domain})")
    # A world without ads (an imported UserBehavior or MovieLens log) indexes all its Pins.
    what = "ads" if snap.manifest.get("catalogue", "ads") == "ads" else "pins"
    fewer = f" (the catalogue holds only {pins.shape[1]} {what})" if pins.shape[1] < args.k else ""
    print(f"top {pins.shape[1]} {what} for user {args.user} ({args.domain}, snapshot {snap.version}){fewer}:")
    for rank, (pin, value) in enumerate(zip(pins[0], scores[0]), 1):
        print(f"{rank:>4}  pin {pin:<10} score {value:.4f}")


def _plan(args: argparse.Namespace) -> None:
    from derl.launchers.stages.plan import cluster_plan, render

    for flag in ("hosts", "gpus_per_host"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 < args.hbm_gb < float("inf"):
        raise ValueError(f"--hbm-gb must be a positive number, got {args.hbm_gb}")
    print(render(cluster_plan(args.preset, args.hosts, args.gpus_per_host, args.hbm_gb), args.preset))


def _bench(args: argparse.Namespace) -> None:
    from derl.benchmarks import bench  # here, not at the top: `derl --help` stays fast

    bench.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="derl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help=REGISTRY["generate"].help)
    p.add_argument("--out", type=Path, required=True, help="source folder to create")
    p.add_argument("--preset", choices=sorted(WORLD_PRESETS), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--daily-drift", type=float, help="std of the daily random walk of the users' interests "
                                                     "(default: the preset's)")
    p.add_argument("--new-entity-share", type=float, help="share of the users, and of the Pins, that are new "
                                                          "on the world's last days (default: the preset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_generate)

    p = sub.add_parser("import", help="write a public data set's files as a source folder (docs/importing.md)")
    p.add_argument("format", choices=list(FORMATS))
    p.add_argument("--input", type=Path, action="append", required=True, help="a file or a folder of them; repeatable")
    p.add_argument("--out", type=Path, required=True, help="source folder to create")
    p.add_argument("--sample-users", type=float, help="keep this fraction of the users (hashed with --seed)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--from-day", help="import only days from this one (YYYY-MM-DD, the world's clock)")
    p.add_argument("--until", help="import only days up to this one")
    p.add_argument("--days", type=int, default=8, help="seq-lines: days to lay each user's items over")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")
    p.set_defaults(handler=_import)

    for spec in REGISTRY.values():
        if spec.config is not None:  # the others' flags are written here by hand
            p = sub.add_parser(spec.name, help=spec.help)
            add_flags(p, spec.config_class())
            p.set_defaults(handler=StageCommand(spec))

    # The suite's own parser reads its flags (`derl bench --help`): every argument goes to it.
    p = sub.add_parser("bench", help=REGISTRY["bench"].help, add_help=False, prefix_chars="+")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_bench)

    p = sub.add_parser("snapshots", help="list, show, verify, gc or publish (to Redis) embedding snapshots")
    p.add_argument("action", choices=["list", "show", "verify", "gc", "publish"])
    p.add_argument("root", type=Path, help="snapshot root (derl export --out)")
    p.add_argument("--version", help="default: LATEST")
    p.add_argument("--keep", type=int, help="gc: how many newest versions to keep (at least 1; newest by "
                   "cut day, then creation)")
    p.add_argument("--dry-run", action="store_true", help="gc: say what would go")
    p.add_argument("--redis", help="publish: the Redis to put the version's user vectors in, redis://HOST:PORT[/DB]")
    p.add_argument("--expire-after", type=int, default=3600,
                   help="publish: seconds the older versions stay in Redis (default: 3600)")
    p.set_defaults(handler=_snapshots)

    p = sub.add_parser("retrieve", help="top-K ads (every Pin, in a world without ads) for a user "
                                        "through a snapshot's faiss index")
    p.add_argument("--snapshots", type=Path, required=True, help="snapshot root")
    p.add_argument("--version", help="default: LATEST")
    p.add_argument("--domain", default="engagement")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("-k", type=int, default=10, help="how many ads (at least 1; at most the catalogue)")
    p.set_defaults(handler=_retrieve)

    p = sub.add_parser("plan", help="the sharding plan of a preset world's models on a GPU cluster, made "
                                    "here in dry run (docs/architecture.md)")
    p.add_argument("--preset", choices=sorted(WORLD_PRESETS), default="large")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--gpus-per-host", type=int, default=8)
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per rank the planner may use")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("inspect", help="summarise a source folder: tables, rows, days, id ranges")
    p.add_argument("source", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_inspect)
    return parser


def _after_interrupt(args: argparse.Namespace) -> str:
    """What a stopped command kept and how to go on from there (docs/runs.md)."""
    cmd = args.command
    if cmd in ("generate", "import"):
        return f"{args.out} is as it was (a world is put in place whole): run the same command again"
    if cmd == "train-upstream":
        kept = checkpoint.latest(args.out / runs.CHECKPOINTS)
        if kept is None:
            return f"{args.out} holds no checkpoint yet: start again with --overwrite"
        return f"{args.out} keeps checkpoint {kept.name}: continue with the same command and --resume"
    if cmd in ("train-downstream", "score"):
        return f"{args.out} is unfinished (no {runs.METRICS}): run the same command with --overwrite"
    if cmd == "export":
        return (f"the versions in {args.out} and its LATEST are whole; the unfinished export's hidden "
                f"folder goes with `derl snapshots gc {args.out} --keep N`: run the same command again")
    if cmd == "pipeline":
        return f"the finished stages in {args.workdir} are kept: run the same command again to continue"
    if cmd == "serve":
        return "the service stopped after its requests in flight and unpinned its version: run the same command " \
               "to serve again"
    return "run the same command again"


def _end(line: str, code: int, now: bool = False) -> None:
    """End derl with its one line (stderr) and `code`; `now` at once (`quiet.leave`), for an
    interrupt or a full disk, where the libraries' exit hooks would fail again and print. Under
    torchrun (TorchX starts ranks with it) the line also goes to the reply file the launcher
    reads (TORCHELASTIC_ERROR_FILE), so that TorchX's final status names derl's error."""
    quiet.end_bars()
    print(line, file=sys.stderr)
    reply = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if reply:
        Path(reply).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if now:
        quiet.leave(code)
    raise SystemExit(code) from None


# Errors that are the user's to fix, each said in one line.
USER_ERRORS = (DataError, SnapshotError, FileExistsError, FileNotFoundError, ValueError, ShardingError,
               pipeline.StageFailed, CollectiveTimeout, RankFailed)


def main(argv: Optional[List[str]] = None) -> None:
    quiet.apply()
    quiet.interruptible()
    args = build_parser().parse_args(argv)
    say = f"derl {args.command}:"
    try:
        args.handler(args)
    except BaseException as e:
        # First: a full disk may surface wrapped in any error, or (`disk_full`) in none it names.
        where = getattr(args, "out", None) or getattr(args, "workdir", None)
        explained = isinstance(e, (KeyboardInterrupt, SignalException, *USER_ERRORS))
        full = quiet.disk_full(e, None if explained else where)
        if full is not None:
            _end(f"{say} error: no space left on device writing {full.filename or where}; free some and "
                 f"run the same command again", 2, now=True)
        if isinstance(e, (KeyboardInterrupt, SignalException)):
            # Ctrl-C, or a signal that stopped derl's own launch of local ranks (torch's agent).
            signum = getattr(e, "sigval", signal.SIGINT)
            how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            # Local ranks may have been stopped mid-bar (a rank blocked in a collective cannot
            # end its bar): the line starts on one of its own.
            fresh = "\n" if getattr(args, "nproc", 1) > 1 else ""
            _end(f"{fresh}{say} {how}; {_after_interrupt(args)}", 128 + signum, now=True)
        if isinstance(e, USER_ERRORS):
            _end(f"{say} error: {e}", 2)
        raise


if __name__ == "__main__":
    main()
