"""launchers/runtime/processes.py, the one runner of `derl` children: a timeout kills the child's whole
process group, a failure names its log's tail, output is captured, the peak resident set is the
child's. The child here is a short Python script standing in for `derl` (DERL patched), so
that each test takes a second, not torch's start-up."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from derl.launchers.runtime import processes
from derl.launchers.runtime.processes import StageFailed, run_derl

pytestmark = pytest.mark.slow  # starts processes (docs/testing.md)


def _as_derl(monkeypatch, script: str) -> None:
    """Make `derl ARGV` run `script` (ARGV in its sys.argv[1:])."""
    monkeypatch.setattr(processes, "DERL", (sys.executable, "-c", script))


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_timeout_kills_the_child_and_what_it_started(monkeypatch, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    _as_derl(monkeypatch, "import subprocess, sys, time\n"
                          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                          f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                          "time.sleep(60)\n")
    t0 = time.perf_counter()
    with pytest.raises(StageFailed, match=r"^derl train-upstream timed out after 2 s, killed \(log "):
        run_derl(["train-upstream", "--epochs", "1"], log=tmp_path / "run.log", timeout=2)
    assert time.perf_counter() - t0 < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; the kernel may take a moment to show it
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild), "the child's own child outlived the timeout"


def test_a_failure_names_the_subcommand_and_ends_with_its_logs_tail(monkeypatch, tmp_path):
    _as_derl(monkeypatch, "import sys\nprint('\\n'.join(f'line {i}' for i in range(40)), flush=True)\n"
                          "sys.exit('the real error')")
    log = tmp_path / "logs" / "import.log"
    with pytest.raises(StageFailed) as failed:
        run_derl(["import", "taobao-ad", "--input", tmp_path], log=log)
    message = str(failed.value)
    assert message.startswith(f"derl import taobao-ad exited 1 (log {log}):\n")
    assert message.endswith("line 39\nthe real error\n") and "line 15\n" not in message  # the last 25 lines
    assert log.read_text().startswith(f"$ derl import taobao-ad --input {tmp_path}\n")


def test_without_check_a_failure_is_returned_with_its_output_captured(monkeypatch):
    _as_derl(monkeypatch, "import sys\nprint('out', *sys.argv[1:])\n"
                          "sys.stderr.write('bar 1\\rbar 2\\r\\n')\nsys.exit(3)")
    done = run_derl(["evaluate", "--runs", "a=b"], capture=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out evaluate --runs a=b\n", "bar 1\nbar 2\n")
    with pytest.raises(StageFailed, match=r"^derl evaluate --runs a=b exited 3$"):
        run_derl(["evaluate", "--runs", "a=b"], capture=True)


def test_the_peak_resident_set_is_the_childs(monkeypatch):
    _as_derl(monkeypatch, "x = b'x' * (300 * 2**20)")
    done = run_derl(["generate"], own_group=False)
    assert done.returncode == 0 and done.peak_rss_mb > 300
    assert set(done.figures()) == {"wall_s", "peak_rss_mb", "load_1m"}
