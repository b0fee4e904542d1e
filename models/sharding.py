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
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            apply_optimizer_in_backward(RowWiseAdagrad, m.parameters(), {"lr": optim.embedding_lr})
    tables = _tables(model)
    constraints = None
    if device.type == "cpu":
        constraints = {t: ParameterConstraints(sharding_types=CPU_SHARDING_TYPES) for t in tables}
    cap = memory_per_rank or memory_per_rank_bytes(local_world_size)
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=local_world_size,
        **({"hbm_cap": cap} if device.type == "cuda" else {"ddr_cap": cap}),
    )
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    try:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    except PlannerError as e:
        biggest = max(tables.items(), key=lambda kv: kv[1][0] * kv[1][1])
        rows, dim = biggest[1]
        raise ShardingError(
            f"no sharding plan fits {world_size} rank(s) with {cap / 2**30:.1f} GiB each; the "
            f"largest table {biggest[0]!r} is {rows:,} x {dim} "
            f"({rows * dim * 4 / 2**30:.1f} GiB of fp32 weights before optimizer state). "
            f"Use more ranks, a smaller embedding dim or a hashed vocabulary. Planner: {e}"
        ) from None
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=optim.dense_lr),
    )
    # Adam creates its state lazily; a zero-gradient step creates it now (moving nothing), so
    # that a checkpoint's optimizer state has somewhere to load into.
    dense.init_state()
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), plan


def describe_plan(plan: ShardingPlan) -> List[str]:
    """One line per table: where it went and how."""
    lines = []
    for module, params in plan.plan.items():
        for table, p in params.items():
            ranks = sorted({r for r in (p.ranks or [])})
            lines.append(f"{module}.{table}: {p.sharding_type} on ranks {ranks} ({p.compute_kernel})")
    return lines
