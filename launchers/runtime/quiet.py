"""What a user sees on the terminal besides derl's own lines, in one place.

- Library warnings a derl user cannot act on (TorchRec's planner and torch deprecations about
  their own internals) are dropped, each by its message, so that any other warning still shows.
  `DERL_VERBOSE=1` keeps them all (docs/configuration.md).
- A progress bar ends its line before an error is printed (`end_bars`).
- On Ctrl-C one process says what was kept (the CLI, docs/runs.md); every other rank leaves at
  once and quietly, exit 130 (`rank`); and no library swallows the signal (`interruptible`).

`apply` runs at the CLI's entry and `rank` at each rank's: spawned ranks start a fresh
interpreter, so the filters are set again there.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

VERBOSE_ENV = "DERL_VERBOSE"
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# Python warnings, by the start of their message.
_WARNINGS = (
    "HeuristicalStorageReservation is known to cause issues",  # TorchRec planner's default reserve
    "`broadcast_buffers` is deprecated",  # TorchRec's own DistributedDataParallel call
    "Please use DTensor instead and we are deprecating ShardedTensor",  # DCP on TorchRec's tensors
)
# Log records, by logger and the start of their message.
_LOGS = {
    "torchrec.distributed.planner.types": ("The topology was constructed directly",),
    "torchrec.distributed.planner.storage_reservations": ("There is a known issue with TorchRec's dense tensor",),
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true",),
    # torchrec's planner on its replicated tables, through the root logger (`derl plan`).
    "root": ("Sharding spec not found for",),
    # torch's agent of derl's local launch, on Ctrl-C: the CLI says what was kept.
    "torch.distributed.elastic.agent.server.api": ("Received 2 death signal",),
}


class _Drop(logging.Filter):
    """Drops a logger's records that start with one of `starts`."""

    def __init__(self, starts: tuple):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def apply() -> None:
    """Silence the warnings above in this process (idempotent), unless DERL_VERBOSE is set."""
    if verbose():
        return
    for start in _WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start))
    # The resource tracker (a process of its own, reading this variable) counts the semaphores of
    # a rank that left on Ctrl-C without closing them, and removes them itself.
    tracker = "ignore:resource_tracker:UserWarning"
    if tracker not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), tracker)))
    for name, starts in _LOGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in log.filters):
            log.addFilter(_Drop(starts))


def interruptible() -> None:
    """Ctrl-C as Python's own KeyboardInterrupt everywhere: pyarrow otherwise takes SIGINT over
    while it reads a CSV and can let the read finish with the signal lost."""
    import pyarrow

    pyarrow.enable_signal_handlers(False)


def end_bars() -> None:
    """Close this process's open tqdm bars, so that what is printed next starts a line."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(tqdm.tqdm._instances):
            bar.close()


def disk_full(e: BaseException, where: Optional[Path] = None) -> Optional[OSError]:
    """The full-disk OSError behind `e`, if any: in its chain, or among the ranks' failures that
    torch's checkpointing gathers (`CheckpointException.failures`, not an `Exception`). Some
    writers fail on a full disk without saying so (torch's serializer: a RuntimeError "unexpected
    pos"), so such an error, or one that is not an `Exception`, counts as one where the disk
    under `where` has no space left."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and (x.errno in (errno.ENOSPC, errno.EDQUOT)
                                       or "No space left on device" in str(x)):
            return x
        todo += [x.__cause__, x.__context__]
        # torch's checkpointing gathers (exception, traceback) pairs; torch's agent, process records
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(x, "failures", {}).values()]
        todo += [f for f in failures if isinstance(f, BaseException)]
    if where is None or isinstance(e, (KeyboardInterrupt, SystemExit)) or (
            isinstance(e, Exception) and not isinstance(e, RuntimeError)):
        return None
    folder = Path(where).absolute()
    while not folder.exists():
        folder = folder.parent
    if os.statvfs(folder).f_bavail == 0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    return None


def leave(code: int) -> None:
    """End this process now with `code`, bars closed and output flushed: no exception travels
    on, so nothing waits on the other ranks and no thread prints at shutdown."""
    end_bars()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank(run: Callable[[Any], Any], cfg: Any) -> Any:
    """A rank's entry, around a stage's `run(cfg)`: quiet, and on Ctrl-C gone at once without a
    word where another process reports it: every rank that derl's own launch spawned (the
    launching process reports), and under torchrun or TorchX every rank but 0. Bars end before
    an error leaves the rank, and a full disk leaves it as the OSError that says so."""
    apply()
    if multiprocessing.parent_process() is not None or os.environ.get("RANK", "0") != "0":
        signal.signal(signal.SIGINT, lambda signum, frame: leave(INTERRUPTED))
    try:
        return run(cfg)
    except BaseException as e:
        end_bars()
        full = disk_full(e, getattr(cfg, "out", None))
        if full is not None and full is not e:
            raise full from None  # the one error to report, whatever wrapped it
        raise
