"""Ranks that finish together: a reader's early stop never blocks, shares balanced by rows, as
many rows trained on 2 ranks as on 1, docs/usage.md's TorchX walkthrough to the end, and one rank's
data error as the same one line as on one rank."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from derl.datapipes.readers import prefetched
from derl.datapipes.sources import DataError, SourceTables, shard_units
from derl.datapipes.splits import default_split
from derl.launchers.runtime import dist as derl_dist
from helpers import DOWN, damage, derl

REPO = Path(__file__).resolve().parents[1]
USAGE = REPO / "docs" / "usage.md"  # its TorchX walkthrough is run as written


@pytest.mark.parametrize("last", ["end", "error"])
def test_closing_aprefetched_stream_never_blocks(last):
    """The consumer stops after one item while the producer, done, waits to hand over its end
    marker (or its error) to a full queue."""
    finished = threading.Event()

    def make():
        yield 1
        yield 2
        finished.set()  # reached once item 2 is in the queue: the queue is full
        if last == "error":
            raise DataError("late")

    closed = threading.Event()

    def consume():
        stream = prefetched(make, 1)
        next(stream)
        finished.wait(10)
        stream.close()
        closed.set()

    threading.Thread(target=consume, daemon=True).start()
    assert closed.wait(10), "closing the prefetched stream blocked"


@pytest.mark.parametrize("world_size", [2, 3])
def test_shares_are_balanced_by_rows(tiny_world, world_size):
    """Every rank's share is within one row group of every other's, whatever the row groups'
    order (the tiny world's files are a full row group or more, then a small remainder)."""
    for table in ("ad_events", "engagements"):
        units = SourceTables(tiny_world).units(table)
        rows = [sum(u.num_rows for u in shard_units(units, r, world_size)) for r in range(world_size)]
        assert max(rows) - min(rows) <= max(u.num_rows for u in units), (table, rows)


@pytest.mark.slow
def test_a_two_rank_ranker_trains_on_as_many_rows_as_one_rank(tiny_world, tmp_path):
    """--batch-size is per rank: 2 ranks take half the steps of twice the rows, at most one
    step's rows short of 1 rank's (the mean of the ranks' rows, rounded down)."""
    one = _steps_x_ranks(tiny_world, tmp_path / "one", 1)
    two = _steps_x_ranks(tiny_world, tmp_path / "two", 2)
    assert one - 2 <= two <= one, (one, two)


def _steps_x_ranks(world: Path, out: Path, nproc: int) -> int:
    """Batches a ranker trained on (each of --batch-size rows), over every rank."""
    derl("train-downstream", "--data", str(world), "--out", str(out), "--upstream", "none",
         "--nproc", str(nproc), *DOWN)
    m = json.loads((out / "metrics.json").read_text())
    return m["steps"] * m["world_size"]


def _usage_torchx_commands(work: Path) -> list:
    """docs/usage.md's `torchx run -s local_cwd` walkthrough, as (component, args), `work/` in `work`."""
    section = USAGE.read_text().split("## Launching on a cluster (TorchX)")[1]
    block = section.split("```bash")[1].split("\n\n")[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        args = shlex.split(line)
        if args[:4] != ["torchx", "run", "-s", "local_cwd"]:
            continue
        component = args[4].replace("launchers/components.py", str(REPO / "launchers" / "components.py"))
        commands.append((component, [re.sub(r"(^|=)work/", rf"\g<1>{work}/", a) for a in args[5:]]))
    return commands


def test_the_usage_pages_torchx_walkthrough_runs_to_the_end(local_runner, tmp_path):
    from torchx.specs import AppState

    commands = _usage_torchx_commands(tmp_path)
    assert [c.rsplit(":", 1)[1] for c, _ in commands] == [
        "generate", "train_upstream", "export", "train_downstream", "evaluate"]
    for i, (component, args) in enumerate(commands):
        handle = local_runner.run_component(component, args, "local_cwd", cfg={"log_dir": str(tmp_path / f"logs{i}")})
        deadline = time.monotonic() + 300
        while not (status := local_runner.status(handle)) or not status.is_terminal():
            if time.monotonic() > deadline:
                local_runner.cancel(handle)
                raise AssertionError(f"{component} {' '.join(args)}: still running after 300 s")
            time.sleep(0.5)
        assert status.state == AppState.SUCCEEDED, (component, status)
    assert json.loads((tmp_path / "tw-report" / "report.json").read_text())["runs"]["snap"]["world_size"] == 2


def _damage_rank_1(world: Path) -> None:
    """Labels outside {0, 1} in every ad row group that rank 1 of 2 reads for the ranker's days
    (only the reading rank checks labels)."""
    sources = SourceTables(world)
    days = default_split(sources.days("engagements")).downstream_days
    for unit in shard_units(sources.units("ad_events", days), 1, 2):
        start = 4096 * unit.row_group  # the tiny world's row groups: 4096 rows, then the rest
        damage(unit.path, "clicked", list(range(start, start + unit.num_rows)), 2)


ONE_LINE = r"derl train-downstream: error: \S+: column 'clicked' has \d+ labels outside \{0, 1\}"


def _one_error_line(proc: subprocess.CompletedProcess) -> None:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(ONE_LINE + "$", errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_one_ranks_data_error_is_one_line_as_on_one_rank(world_copy, tmp_path):
    _damage_rank_1(world_copy)
    flags = ["--data", str(world_copy), "--upstream", "none", "--max-steps", "4", *DOWN]
    _one_error_line(derl("train-downstream", *flags, "--out", str(tmp_path / "one"), check=False))
    _one_error_line(derl("train-downstream", *flags, "--out", str(tmp_path / "two"), "--nproc", "2",
                         check=False))


@pytest.mark.slow
def test_one_ranks_data_error_under_torchrun_is_one_line(world_copy, tmp_path):
    """Under derl's torchrun (what the TorchX components start): the failing rank's one line,
    its exit code, and nothing from torchrun or the other rank."""
    _damage_rank_1(world_copy)
    proc = subprocess.run(
        [sys.executable, "-m", "derl.launchers.runtime.torchrun", "--nproc_per_node", "2", "-m", "derl.launchers.cli",
         "train-downstream", "--data", str(world_copy), "--upstream", "none", "--max-steps", "4",
         "--out", str(tmp_path / "run"), *DOWN],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(ONE_LINE + "$", errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def _stall_rank_1(_: object) -> None:
    """Rank 1 stalls; rank 0 waits for it in a collective at "step 3"."""
    worker = derl_dist.init()
    try:
        if worker.rank == 1:
            time.sleep(120)
        with derl_dist.collectives(worker, "step 3"):
            derl_dist.reduced(1.0, "sum", worker.device)
    finally:
        derl_dist.shutdown()


@pytest.mark.slow
def test_a_collective_that_waits_past_the_bound_fails_naming_rank_and_step(monkeypatch):
    """Rank 1 wakes after 120 s and would then complete the collective: the error itself shows
    that the bound, not the stall's end, stopped rank 0 (no wall-clock assertion needed)."""
    monkeypatch.setenv(derl_dist.TIMEOUT_ENV, "3")
    with pytest.raises(derl_dist.CollectiveTimeout, match=r"^rank 0, step 3: a collective waited more than 3 s"):
        derl_dist.launch(_stall_rank_1, 2, None)
