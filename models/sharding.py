"""Sharding a derl model with TorchRec: planner, DistributedModelParallel, fused optimizers.

Every embedding table gets a row-wise Adagrad applied in backward (fused into the embedding
kernels, so the big tables never get a dense gradient); the dense parameters get Adam. The two
are combined into one `CombinedOptimizer`, with the fused parameters filtered out of the dense
one so a checkpoint holds each parameter's state once.

On CPU the plan is restricted to what the CPU kernels shard (table-wise, column-wise,
table-column-wise; row-wise needs CUDA); on GPU the planner is free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

CPU_SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
]


class ShardingError(ValueError):
    """The model cannot be placed on the ranks (a table too large, no valid plan)."""


@dataclass
class OptimConfig:
    embedding_lr: float = 0.05  # row-wise Adagrad, fused in backward
    dense_lr: float = 1e-3  # Adam


def memory_per_rank_bytes(local_world_size: int) -> int:
    """What the planner may use per rank: this host's memory shared by its ranks (CPU), or the
    device's memory (GPU)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(local_world_size, 1)


def _tables(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """table name -> (rows, dim) of every embedding module in the model."""
    out = {}
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            configs = m.embedding_bag_configs()
        elif isinstance(m, EmbeddingCollection):
            configs = m.embedding_configs()
        else:
            continue
        out.update({c.name: (c.num_embeddings, c.embedding_dim) for c in configs})
    return out


def _fuse_optimizers(model: nn.Module, optim: OptimConfig) -> Dict[str, Tuple[int, int]]:
    """Give every embedding table its fused row-wise Adagrad (the sharders read it, and the
    planner counts its state); returns table name -> (rows, dim)."""
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            apply_optimizer_in_backward(RowWiseAdagrad, m.parameters(), {"lr": optim.embedding_lr})
    return _tables(model)


def _planner(tables: Dict[str, Tuple[int, int]], compute_device: str, world_size: int,
             local_world_size: int, cap: int) -> EmbeddingShardingPlanner:
    """The planner for a topology: on CPU restricted to the sharding types its kernels have; on
    GPU free (row-wise included), `cap` bytes of HBM per rank."""
    constraints = None
    if compute_device == "cpu":
        constraints = {t: ParameterConstraints(sharding_types=CPU_SHARDING_TYPES) for t in tables}
    topology = Topology(
        world_size=world_size,
        compute_device=compute_device,
        local_world_size=local_world_size,
        **({"hbm_cap": cap} if compute_device == "cuda" else {"ddr_cap": cap}),
    )
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints)


def _sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def _planned(make_plan, tables: Dict[str, Tuple[int, int]], world_size: int, cap: int) -> ShardingPlan:
    """`make_plan()`, a planner failure turned into a `ShardingError` that names the largest table."""
    try:
        return make_plan()
    except PlannerError as e:
        biggest = max(tables.items(), key=lambda kv: kv[1][0] * kv[1][1])
        rows, dim = biggest[1]
        raise ShardingError(
            f"no sharding plan fits {world_size} rank(s) with {cap / 2**30:.1f} GiB each; the "
            f"largest table {biggest[0]!r} is {rows:,} x {dim} "
            f"({rows * dim * 4 / 2**30:.1f} GiB of fp32 weights before optimizer state). "
            f"Use more ranks, a smaller embedding dim or a hashed vocabulary. Planner: {str(e).splitlines()[0]}"
        ) from None


def shard_model(
    model: nn.Module,
    device: torch.device,
    optim: OptimConfig,
    memory_per_rank: Optional[int] = None,
) -> Tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan]:
    """Plan, shard and wrap `model` (built with its tables on the meta device) over the default
    process group; returns the sharded model, its combined optimizer and the plan."""
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    tables = _fuse_optimizers(model, optim)
    cap = memory_per_rank or memory_per_rank_bytes(local_world_size)
    planner = _planner(tables, device.type, world_size, local_world_size, cap)
    sharders = _sharders()
    plan = _planned(lambda: planner.collective_plan(model, sharders, dist.GroupMember.WORLD),
                    tables, world_size, cap)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=optim.dense_lr),
    )
    # Adam creates its state lazily; a zero-gradient step creates it now (moving nothing), so
    # that a checkpoint's optimizer state has somewhere to load into.
    dense.init_state()
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


def dry_run_plan(model: nn.Module, compute_device: str, world_size: int, local_world_size: int,
                 memory_per_rank: int, optim: Optional[OptimConfig] = None) -> ShardingPlan:
    """The plan `shard_model` would make on a topology this process is not on (no process
    group, no device): a cluster launch checked before its first GPU hour."""
    tables = _fuse_optimizers(model, optim or OptimConfig())
    planner = _planner(tables, compute_device, world_size, local_world_size, memory_per_rank)
    return _planned(lambda: planner.plan(model, _sharders()), tables, world_size, memory_per_rank)


def describe_plan(plan: ShardingPlan) -> List[str]:
    """One line per table: where it went and how."""
    lines = []
    for module, params in plan.plan.items():
        for table, p in params.items():
            ranks = sorted({r for r in (p.ranks or [])})
            lines.append(f"{module}.{table}: {p.sharding_type} on ranks {ranks} ({p.compute_kernel})")
    return lines


def sharded_bytes_per_rank(plan: ShardingPlan, bytes_per_value: int = 4) -> Dict[int, int]:
    """rank -> bytes of the sharded tables' weights it holds (fp32; replicated data-parallel
    tables and optimizer state not counted): how evenly a plan spreads the big tables."""
    held: Dict[int, int] = {}
    for params in plan.plan.values():
        for p in params.values():
            for shard in (p.sharding_spec.shards if p.sharding_spec else []):
                rows, dim = shard.shard_sizes
                held[shard.placement.rank()] = held.get(shard.placement.rank(), 0) + rows * dim * bytes_per_value
    return held
