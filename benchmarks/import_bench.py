"""Import throughput and memory: `derl import taobao-ad` on synthetic Ali_Display_Ad_Click files
of growing size, each import a measured process of its own, and whether its memory grows with its
input (this prints the table and writes DIR/import.json and DIR/import.md; what each figure is:
docs/results.md, "Importing public data").

    python -m derl.benchmarks.import_bench --out DIR [--sizes 5000000,20000000] [--work FOLDER]
        [--seed 0] [--users N] [--keep] [--timeout 3600] [-- more derl import flags]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from derl.benchmarks import report
from derl.datapipes.importers.taobao_files import write_taobao_ad_files
from derl.launchers.runtime.config import check, setting
from derl.launchers.runtime.processes import DERL, StageFailed, run_derl

REPORT = "import_report.json"


@dataclass(frozen=True)
class ImportBenchConfig:
    out: Path = setting(help="where import.json and import.md go")
    sizes: Tuple[int, ...] = setting((5_000_000, 20_000_000), "behaviour rows per set, comma-separated")
    work: Optional[Path] = setting(None, "files and worlds (default: a temporary folder)")
    seed: int = setting(0, "seed of the written files")
    users: Optional[int] = setting(None, "users in every set (default: in the real proportion to the rows, so "
                                         "entities grow with rows; a fixed count measures rows alone)")
    keep: bool = setting(False, "keep each size's files and world")
    timeout: float = setting(3600.0, "seconds per import before it is killed")

    def __post_init__(self) -> None:
        check(self, positive=("users", "timeout"), non_negative=("seed",))


def _proc_kb(pid: int, field: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return None


def run_measured(argv: Sequence[str], log: Path, timeout: Optional[float] = None,
                 label: str = "", every_s: float = 10.0) -> Dict[str, object]:
    """`derl ARGV`, output into `log`, polled every 0.25 s: its wall_s, peak_rss_mb (docs/results.md),
    rss samples [(s, MB)] and load_1m at its start."""
    samples: List[tuple] = []
    hwm_kb, shown = 0, 0.0

    def watch(pid: int, seconds: float) -> None:
        nonlocal hwm_kb, shown
        rss, hwm = _proc_kb(pid, "VmRSS"), _proc_kb(pid, "VmHWM")
        if rss is not None:
            samples.append((round(seconds, 2), round(rss / 1024, 1)))
        hwm_kb = max(hwm_kb, hwm or 0)
        if seconds - shown >= every_s:
            shown = seconds
            print(f"  {label}import running {seconds:6.0f} s, rss {(rss or 0) / 1024:7.0f} MB,"
                  f" peak {hwm_kb / 1024:7.0f} MB", flush=True)

    done = run_derl(argv, log=log, timeout=timeout, watch=watch, poll_s=0.25)
    return {"wall_s": round(done.wall_s, 2), "peak_rss_mb": round(max(done.peak_rss_mb, hwm_kb / 1024), 1),
            "samples": samples, "load_1m": round(done.load_1m, 2)}


def _quartiles(samples: List[tuple]) -> List[float]:
    """The resident set (MB) at 25, 50 and 75 % of the run."""
    if not samples:
        return []
    end = samples[-1][0]
    return [next(mb for s, mb in samples if s >= q * end) for q in (0.25, 0.5, 0.75)]


def _peak_at(samples: List[tuple]) -> object:
    """When the polled resident set was highest, in % of the run ('-' without samples)."""
    if not samples:
        return "-"
    s, _ = max(samples, key=lambda x: x[1])
    return round(100 * s / max(samples[-1][0], 1e-9))


def import_report(world: Path) -> Dict[str, object]:
    """The world's import_report.json ({} when it wrote none)."""
    path = world / REPORT
    return json.loads(path.read_text()) if path.exists() else {}


def source_version() -> str:
    """The repository's commit, `-dirty` when the working tree has changes (the importer may)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def startup_s(work: Path) -> float:
    """Wall time of `derl import --help`: the interpreter's and the CLI's imports."""
    t0 = time.perf_counter()
    subprocess.run([*DERL, "import", "--help"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    return round(time.perf_counter() - t0, 2)


def measure(rows: int, work: Path, seed: int = 0, timeout: Optional[float] = None, keep: bool = False,
            extra: Sequence[str] = (), users: Optional[int] = None) -> Dict[str, object]:
    """One size: write the files, import them, measure (docs/results.md); the table row and the
    RSS samples."""
    folder, world = work / f"taobao-{rows}", work / f"world-{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(world, ignore_errors=True)
    print(f"{rows:,} behaviour rows: writing the files into {folder} ...", flush=True)
    last = [0.0]

    def progress(line: str) -> None:
        if time.perf_counter() - last[0] > 5:
            last[0] = time.perf_counter()
            print("  " + line, flush=True)

    written = write_taobao_ad_files(folder, rows, seed=seed, users=users, progress=progress)
    n = written["rows"]
    input_mb = sum(Path(p).stat().st_size for p in written["paths"].values()) / 2**20
    print(f"  written in {written['seconds']:.1f} s ({input_mb:,.0f} MB: {n}); importing ...", flush=True)
    proc = run_measured(["import", "taobao-ad", "--input", folder, "--out", world, *extra],
                        work / f"import-{rows}.log", timeout=timeout, label=f"{rows:,}: ")
    rep = import_report(world)
    out = rep.get("rows", {})
    total = sum(n.values())
    row = {
        "behaviour_rows": n["behavior_log"],
        "users": written["sizes"]["users"],
        "impression_rows": n["raw_sample"],
        "ads": n["ad_feature"],
        "profiles": n["user_profile"],
        "input_mb": round(input_mb, 1),
        "write_s": written["seconds"],
        "import_s": proc["wall_s"],
        "rows_per_s": round(total / proc["wall_s"], 1),
        "behaviour_rows_per_s": round(n["behavior_log"] / proc["wall_s"], 1),
        "finish_s": rep.get("finish_seconds", "-"),
        "peak_rss_mb": proc["peak_rss_mb"],
        "rss_quartiles_mb": "/".join(f"{v:.0f}" for v in _quartiles(proc["samples"])),
        "peak_at_%": _peak_at(proc["samples"]),
        "load_1m": proc["load_1m"],
        "out_rows": ", ".join(f"{k} {v:,}" for k, v in out.items()) or "-",
    }
    print(f"  imported in {row['import_s']:.1f} s: {row['rows_per_s']:,.0f} rows/s, peak RSS "
          f"{row['peak_rss_mb']:,.0f} MB; out {row['out_rows']}", flush=True)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(world, ignore_errors=True)
    step = max(1, len(proc["samples"]) // 200)  # the RSS curve, at most ~200 points
    return {"row": row, "out_tables": out, "dropped": rep.get("dropped"), "repaired": rep.get("repaired"),
            "rss_samples": proc["samples"][::step] + proc["samples"][-1:],
            "sizes": written["sizes"], "ctr": round(written["ctr"], 4)}


def verdict(rows: List[Dict[str, object]]) -> Optional[Dict[str, object]]:
    """Peak RSS at the largest size over the smallest, against the ratios of their behaviour
    rows and users. It grows when its log ratio passes a quarter of the rows' (1.41x for 4x)."""
    if len(rows) < 2:
        return None
    small, big = min(rows, key=lambda r: r["behaviour_rows"]), max(rows, key=lambda r: r["behaviour_rows"])
    rows_ratio = big["behaviour_rows"] / small["behaviour_rows"]
    rss_ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    return {"rows_ratio": round(rows_ratio, 2), "users_ratio": round(big["users"] / small["users"], 2),
            "peak_rss_ratio": round(rss_ratio, 2),
            "rss_grows_with_rows": bool(math.log(rss_ratio) > 0.25 * math.log(rows_ratio))}


def verdict_line(v: Optional[Dict[str, object]]) -> str:
    if not v:
        return "One size only: no memory verdict."
    line = (f"Peak RSS grew {v['peak_rss_ratio']}x while the behaviour rows grew {v['rows_ratio']}x "
            f"and the users {v['users_ratio']}x: ")
    if not v["rss_grows_with_rows"]:
        return line + "the import's memory stays about flat (it streams its rows)."
    if v["users_ratio"] > 1.2:
        return line + ("the import's memory grows with its input; the users (and Pins) grew with the rows, "
                       "so per-entity state is part of it: a run with a fixed --users separates the two.")
    return line + "the import's memory grows with its rows at a fixed number of users (it does not stream)."


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: List[str] = []
    if "--" in argv:  # `derl import` flags, passed on unparsed: no config field can hold them
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    config = report.parse_config(ImportBenchConfig, argv, __doc__)
    work = config.work or Path(tempfile.mkdtemp(prefix="derl-import-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    meta: Dict[str, object] = {**report.machine(threads=False, cores=True),
                               "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                               "command": " ".join(["derl import taobao-ad --input FILES --out WORLD", *extra]),
                               "commit": source_version(), "seed": config.seed,
                               "users": config.users or "in proportion to rows",
                               "startup_s": startup_s(work),
                               "load_1m_start": round(os.getloadavg()[0], 2)}
    results, errors = [], {}
    for rows in config.sizes:
        try:
            results.append(measure(rows, work, config.seed, config.timeout, config.keep, extra, config.users))
        except StageFailed as e:
            print(str(e), flush=True)
            errors[str(rows)] = str(e)
    meta["load_1m_end"] = round(os.getloadavg()[0], 2)
    rows = [r["row"] for r in results]
    meta["memory"] = verdict(rows)
    if errors:
        meta["errors"] = errors
    if not config.work and not config.keep:
        shutil.rmtree(work, ignore_errors=True)
    config.out.mkdir(parents=True, exist_ok=True)
    if rows:
        md = report.write(config.out, "import", rows, meta)
        # import.json: the table's rows plus what does not fit a table (per-size detail).
        data = json.loads((config.out / "import.json").read_text())
        data["detail"] = [{k: v for k, v in r.items() if k != "row"} for r in results]
        (config.out / "import.json").write_text(json.dumps(data, indent=2))
        lines = ["", "## Memory", "", verdict_line(meta["memory"])]
        lines += ["", "rss_quartiles_mb: the resident set at 25/50/75 % of the import's wall time; "
                  "peak_at_%: when the polled resident set was highest. "
                  f"startup_s ({meta['startup_s']} s, `derl import --help`) is part of every import_s."]
        if errors:
            lines += ["", "## Failed", ""] + [f"- {k} rows: {e.splitlines()[0]}" for k, e in errors.items()]
        md.write_text(md.read_text() + "\n".join(lines) + "\n")
        print(md.read_text())
    else:
        (config.out / "import.json").write_text(json.dumps({"meta": meta, "rows": []}, indent=2))
    return {"meta": meta, "rows": rows, "errors": errors}


def main() -> None:
    report.exit_on_errors(run())


if __name__ == "__main__":
    main()
