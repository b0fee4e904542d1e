"""`derl plan`: the sharding plan a world's upstream and ranker would get on a GPU cluster,
made here, on CPU, before the first GPU hour.

TorchRec's planner runs in dry run (no process group, no device) on the topology a cluster
launch would have: `--hosts` x `--gpus-per-host` ranks, `--hbm-gb` of HBM each, compute device
cuda, so row-wise sharding is open to it as it is on a real GPU run (`models/sharding.py`). The
models are those the stages build: each upstream domain with its defaults, and the ranker on
all four snapshot vectors, over the id tables a world of the preset holds (`id_sizes`: the
world is not generated). Every rank's device and backend come from `dist.device_and_backend`,
the function every stage's ranks call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torchrec.distributed.types import ShardingPlan

from derl.datapipes.batch import feature_vocab
from derl.datapipes.domains import DOMAINS, VECTOR_SETS
from derl.datapipes.world import WORLD_PRESETS, id_sizes
from derl.launchers.runtime.dist import device_and_backend
from derl.models.downstream import Ranker, RankerConfig
from derl.models.sharding import dry_run_plan, sharded_bytes_per_rank
from derl.models.upstream import DERM, UpstreamConfig


@dataclass(frozen=True)
class ClusterPlan:
    """What a launch on the cluster would be: each rank's device and backend, each model's plan."""

    world_size: int
    devices: List[str]  # rank -> device
    backend: str
    plans: Dict[str, ShardingPlan]  # model -> its plan
    hbm_bytes: int  # per rank


def models(preset: str) -> Dict[str, torch.nn.Module]:
    """The upstream of each domain and the all-vector ranker on a `preset` world, tables on meta."""
    vocab = feature_vocab(id_sizes(WORLD_PRESETS[preset]))
    meta = torch.device("meta")
    out: Dict[str, torch.nn.Module] = {
        f"upstream-{d}": DERM(UpstreamConfig.for_domain(d, vocab), table_device=meta) for d in DOMAINS
    }
    dim = UpstreamConfig.for_domain("engagement", vocab).embedding_dim
    ranker = RankerConfig(num_embeddings=vocab, upstream="snapshot", vectors=VECTOR_SETS["all"],
                          upstream_dim=dim, dot_temperatures=(1.0, 1.0))
    out["ranker"] = Ranker(ranker, meta, {})
    return out


def cluster_plan(preset: str, hosts: int, gpus_per_host: int, hbm_gb: float) -> ClusterPlan:
    world_size = hosts * gpus_per_host
    placed = [device_and_backend(r % gpus_per_host, cuda=True) for r in range(world_size)]
    hbm = int(hbm_gb * 2**30)
    plans = {name: dry_run_plan(model, "cuda", world_size, gpus_per_host, hbm)
             for name, model in models(preset).items()}
    return ClusterPlan(world_size, [str(d) for d, _ in placed], placed[0][1], plans, hbm)


def render(plan: ClusterPlan, preset: str) -> str:
    """The plan as text: each sharded table on a line, the small replicated ones on one."""
    lines = [f"{preset} world on {plan.world_size} GPU ranks ({plan.backend}; rank 0 on {plan.devices[0]}, "
             f"rank {plan.world_size - 1} on {plan.devices[-1]})"]
    for name, sharding in plan.plans.items():
        most = max(sharded_bytes_per_rank(sharding).values())
        lines.append(f"{name}: sharded tables' weights at most {most / 2**30:.2f} GiB on a rank "
                     f"(of {plan.hbm_bytes / 2**30:.0f} GiB HBM)")
        replicated = []
        for module, params in sharding.plan.items():
            for table, p in params.items():
                if p.sharding_type == "data_parallel":
                    replicated.append(table)
                else:
                    lines.append(f"  {module}.{table}: {p.sharding_type} on ranks {sorted(set(p.ranks))} "
                                 f"({p.compute_kernel})")
        if replicated:
            lines.append(f"  data_parallel on every rank: {', '.join(replicated)}")
    return "\n".join(lines)
