"""Starting `derl` as a child process. The pipeline's stages, the benchmarks' measured runs and
the tests' commands all start it here, so that a failure, a timeout and what a run cost (wall
time, peak resident set) mean the same wherever the run comes from.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

DERL = (sys.executable, "-m", "derl.launchers.cli")  # this interpreter's derl, whatever PATH holds
LOG_TAIL_LINES = 25  # of a failed run's log, in its StageFailed
# What `subprocess.run` gives a child that shares our Ctrl-C before it kills it.
INTERRUPT_GRACE_S = 0.25


class StageFailed(RuntimeError):
    """A `derl` child process exited non-zero or ran past its timeout; its own error is in its
    output (the terminal, or its log, whose tail the message ends with)."""


@dataclass(frozen=True)
class Finished:
    """A `derl` child that ended: its exit code, its output where captured, and what it cost."""

    argv: Tuple[str, ...]
    returncode: int
    wall_s: float
    peak_rss_mb: float  # the largest resident set of the child and every descendant it waited for (its ranks)
    load_1m: float  # the host's 1-minute load average when it started
    stdout: str = ""
    stderr: str = ""

    def figures(self) -> Dict[str, float]:
        """wall_s, peak_rss_mb and load_1m, rounded as a benchmark's row records them."""
        return {"wall_s": round(self.wall_s, 1), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "load_1m": round(self.load_1m, 2)}


def run_derl(argv: Sequence[object], *, log: Optional[Path] = None, capture: bool = False,
             env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
             own_group: bool = True, check: bool = True,
             watch: Optional[Callable[[int, float], None]] = None, poll_s: float = 0.2) -> Finished:
    """Run `derl ARGV` and wait for it.

    Output: into `log` (after a `$ derl ARGV` line), else captured into the result (`capture`),
    else this process's own. `own_group` starts it in a session of its own, so that a timeout, an
    exception here or its end kills every process it started (its ranks too); without it, it
    stays in our process group, so that a Ctrl-C at the terminal reaches it as it reaches us (the
    pipeline's stages). Past `timeout` seconds it is killed and StageFailed raised; a non-zero
    exit raises StageFailed where `check`. `watch(pid, seconds)` is called every `poll_s` while it
    runs (a benchmark's memory samples)."""
    argv = tuple(map(str, argv))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with _output(log, capture, argv) as (stdout, stderr):
        proc = subprocess.Popen([*DERL, *argv], stdout=stdout, stderr=stderr, start_new_session=own_group,
                                env={**os.environ, **(env or {})})
        blocking = timeout is None and watch is None
        timed_out = False
        try:
            while True:  # wait4 reports the rusage of the finished process tree
                pid, status, usage = os.wait4(proc.pid, 0 if blocking else os.WNOHANG)
                if pid:
                    break
                elapsed = time.perf_counter() - t0
                if watch is not None:
                    watch(proc.pid, elapsed)
                if timeout is not None and elapsed > timeout and not timed_out:
                    timed_out = True
                    _kill(proc, own_group)
                time.sleep(poll_s)
        except BaseException:
            if not own_group:  # it got the same Ctrl-C: a moment to end by itself, as subprocess.run gives
                try:
                    proc.wait(INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            _kill(proc, own_group)
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        if own_group:
            _kill(proc, own_group)  # anything of its session left behind
        out, err = (_read(stdout), _read(stderr)) if capture else ("", "")
    done = Finished(argv, proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024, load, out, err)
    if timed_out or (check and done.returncode != 0):
        why = f"timed out after {timeout:.0f} s, killed" if timed_out else f"exited {done.returncode}"
        raise StageFailed(_failure(done, why, log))
    return done


@contextmanager
def _output(log: Optional[Path], capture: bool, argv: Tuple[str, ...]) -> Iterator[tuple]:
    """The child's stdout and stderr: the log (both, after the command line), two temporary
    files (captured: a pipe would fill while we poll), or ours (None)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write("$ derl " + " ".join(argv) + "\n")
            f.flush()
            yield f, subprocess.STDOUT
    elif capture:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            yield out, err
    else:
        yield None, None


def _read(f: IO[bytes]) -> str:
    """A captured output as text, newlines translated as `subprocess.run(text=True)` does (a
    progress bar's carriage returns become line ends)."""
    f.seek(0)
    return f.read().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _kill(proc: subprocess.Popen, own_group: bool) -> None:
    """SIGKILL to the child's whole session where it has its own, else to the child alone."""
    try:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _failure(done: Finished, why: str, log: Optional[Path]) -> str:
    """`derl SUBCOMMAND WHY (log L):` and the log's tail (SUBCOMMAND: the words before the first
    flag, `import taobao-ad`); without a log, the whole command line (its output went to the
    terminal or to the caller)."""
    if log is None:
        return f"derl {' '.join(done.argv)} {why}"
    subcommand = " ".join(itertools.takewhile(lambda a: not a.startswith("-"), done.argv))
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
    return f"derl {subcommand} {why} (log {log}):\n{tail}"

