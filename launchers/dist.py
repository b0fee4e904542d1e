"""Process groups and local multi-process launches, the same for every stage.

A stage's entry point runs under `torchrun`, under TorchX, or as a plain process. Plain with
`--nproc N > 1`, it launches N local workers itself through torch's elastic agent (what
`torchrun` uses) on a loopback rendezvous. Inside a worker `init()` reads the launcher's
environment; the backend follows the device: nccl with CUDA, gloo without.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable

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


def init() -> Worker:
    """Join (or, alone, create) the default process group and pick this worker's device."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads and not (threads.isdigit() and int(threads) > 0):
        raise ValueError(f"OMP_NUM_THREADS must be a positive whole number of threads, got {threads!r}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Ranks on one host share its cores; oversubscribing them slows everyone. OMP_NUM_THREADS,
        # where set (torchrun sets it, and so does `make test`, which runs two test workers), wins.
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
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


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_as_worker(body: Callable[[Any, Worker], Any], args: Any) -> Any:
    """A stage's per-rank entry: join the process group, run `body(args, worker)`, leave."""
    worker = init()
    try:
        return body(args, worker)
    finally:
        shutdown()


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def launch(entry: Callable[..., Any], nproc: int, *args: Any) -> Any:
    """Run `entry(*args)` in `nproc` local workers (or inline, for one or under a launcher).

    Returns rank 0's return value. A worker that fails fails the launch (no restarts: a
    training run resumes from its checkpoint with `--resume`, explicitly).
    """
    if nproc <= 1 or under_launcher():
        return entry(*args)
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
    return elastic_launch(config, entry)(*args)[0]
