"""Process groups and local multi-process launches, the same for every stage.

A stage's entry point runs under `torchrun`, under TorchX, or as a plain process. Plain with
`--nproc N > 1`, it launches N local workers itself through torch's elastic agent (what
`torchrun` uses) on a loopback rendezvous. Inside a worker `init()` reads the launcher's
environment; the backend follows the device: nccl with CUDA, gloo without.

Ranks fail together and say why once (docs/runs.md, "When a rank fails"): a collective waits at
most `DERL_COLLECTIVE_TIMEOUT` seconds, then fails naming its rank and step (`CollectiveTimeout`);
a rank whose collective fails because another rank left exits quietly (the one that left says
why); and a local launch re-raises the first rank's own error in the launching process, so that
the CLI prints the same one line as on one rank.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import tempfile
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_and_backend(local_rank: int, cuda: bool) -> Tuple[torch.device, str]:
    """Where a rank runs and how ranks talk, the one choice every stage makes: `cuda:LOCAL_RANK`
    and nccl with CUDA, the CPU and gloo without."""
    return (torch.device("cuda", local_rank), "nccl") if cuda else (torch.device("cpu"), "gloo")


TIMEOUT_ENV = "DERL_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def collective_timeout() -> float:
    """Seconds a collective waits for the other ranks (`DERL_COLLECTIVE_TIMEOUT`)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


class CollectiveTimeout(RuntimeError):
    """A collective waited past `DERL_COLLECTIVE_TIMEOUT`: another rank stalled (or was lost)."""


class PeerLeft(RuntimeError):
    """A collective failed because another rank left the run; that rank reports why."""


class RankFailed(RuntimeError):
    """A local rank ended without an error of its own to report (killed, or out of memory)."""


_TIMED_OUT = ("timed out",)
_LEFT = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


@contextmanager
def collectives(worker: "Worker", where: str) -> Iterator[None]:
    """Turn a failed collective inside the block into `CollectiveTimeout` naming the rank and
    `where` (e.g. "step 7"), or `PeerLeft`; other errors pass unchanged."""
    try:
        yield
    except (CollectiveTimeout, PeerLeft):
        raise
    except RuntimeError as e:
        text = str(e).lower()
        if any(w in text for w in _TIMED_OUT):
            raise CollectiveTimeout(
                f"rank {worker.rank}, {where}: a collective waited more than {collective_timeout():g} s "
                f"for the other ranks ({TIMEOUT_ENV}); one of them stalled or was lost") from None
        if any(w in text for w in _LEFT):
            raise PeerLeft(f"rank {worker.rank}, {where}: another rank left the run") from e
        raise


def init() -> Worker:
    """Join (or, alone, create) the default process group and pick this worker's device."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ValueError(f"OMP_NUM_THREADS must be a positive whole number of threads, got {threads!r}")
    device, backend = device_and_backend(local_rank, torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Ranks on one host share its cores; oversubscribing them slows everyone. OMP_NUM_THREADS,
        # where set (torchrun sets it, and so does `make test`, which runs two test workers), wins.
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout()))
        else:  # a plain single process: TorchRec still wants a process group
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
    return Worker(rank, world_size, local_rank, device)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def reduced(value: float, op: str, device: torch.device) -> float:
    """Collective: `value` combined over every rank (`op`: sum, max or min). The tensor lives
    on the worker's device, as nccl requires."""
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=_OPS[op])
    return float(t)


def agreed_steps(epochs: float, batches_per_epoch: float, device: torch.device) -> int:
    """Collective: the steps every rank takes (sharded steps are collective): `epochs` times the
    whole batches of an epoch, this rank's `batches_per_epoch` (not rounded) averaged over the
    ranks, so that the run reads as many rows as one rank would and two epochs are twice one.
    A rank with fewer wraps into its next epoch (the loops chain epochs) and one with more
    leaves its last batches unread; balanced shares (`sources.shard_units`) keep that below a
    row group. 0 where a rank has no batch."""
    if reduced(epochs * batches_per_epoch, "min", device) < 1:
        return 0
    return int(epochs * int(reduced(batches_per_epoch, "sum", device) / dist.get_world_size()))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_as_worker(body: Callable[[Any, Worker], Any], args: Any) -> Any:
    """A stage's per-rank entry: join the process group, run `body(args, worker)`, leave."""
    worker = init()
    try:
        with collectives(worker, "outside the training steps"):
            return body(args, worker)
    except PeerLeft:
        raise SystemExit(1) from None  # quietly: the rank that left says why
    finally:
        shutdown()


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def _worker(entry: Callable[..., Any], errors: str, *args: Any) -> Any:
    """A locally launched rank: its error is handed to the launching process (pickled, with
    its traceback) instead of printed here, so that the run reports it once."""
    try:
        return entry(*args)
    except Exception as e:
        tb = traceback.format_exc()
        try:
            data = pickle.dumps((e, tb))
            pickle.loads(data)
        except Exception:
            data = pickle.dumps((RuntimeError(f"{type(e).__name__}: {e}"), tb))
        (Path(errors) / f"rank-{os.environ.get('RANK', '0')}").write_bytes(data)
        raise SystemExit(2) from None


class _RemoteTraceback(Exception):
    """A rank's traceback, shown as the cause of its error where the error is not one line."""

    def __str__(self) -> str:
        return self.args[0]


def _first_error(failed: Exception, errors: Path) -> BaseException:
    """The error of the rank that failed first with one of its own, else which rank ended how."""
    reported = sorted(errors.glob("rank-*"), key=lambda p: p.stat().st_mtime)
    if reported:
        e, tb = pickle.loads(reported[0].read_bytes())
        e.__cause__ = _RemoteTraceback(f"\n\n{reported[0].name}:\n{tb}")
        return e
    rank, failure = failed.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    return RankFailed(f"rank {rank} ended with {how} and no error of its own (killed, or out of memory?)")


def launch(entry: Callable[..., Any], nproc: int, *args: Any) -> Any:
    """Run `entry(*args)` in `nproc` local workers (or inline, for one or under a launcher).

    Returns rank 0's return value. A worker that fails fails the launch (no restarts: a
    training run resumes from its checkpoint with `--resume`, explicitly), with the first
    failing rank's own error, raised here; torch's agent logs nothing of its own about it.
    """
    if nproc <= 1 or under_launcher():
        return entry(*args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"derl-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    errors = Path(tempfile.mkdtemp(prefix="derl-ranks-"))
    agent_log = logging.getLogger("torch.distributed.elastic")
    level: Optional[int] = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, _worker)(entry, str(errors), *args)[0]
    except ChildFailedError as failed:
        error = _first_error(failed, errors)
        raise error from error.__cause__
    finally:
        agent_log.setLevel(level)
        shutil.rmtree(errors, ignore_errors=True)
