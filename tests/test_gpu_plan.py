"""Before the first GPU hour: the `large` world's models planned for 2 hosts x 8 GPUs, on CPU.

TorchRec's planner in dry run with compute device cuda and an HBM cap per rank: the plan must
exist, put the big id tables row-wise (a 5M-row table on one GPU is what a CPU-only plan would
do), keep every rank under its cap, and place rank r on cuda:(r mod 8) with nccl through the
function every stage's ranks use.
"""

import pytest
import torch

from derl.launchers.runtime.dist import device_and_backend
from derl.launchers.stages.plan import cluster_plan, models, render
from derl.models.sharding import ShardingError, dry_run_plan, sharded_bytes_per_rank

HOSTS, GPUS, HBM_GB = 2, 8, 80


@pytest.fixture(scope="module")
def plan():
    return cluster_plan("large", HOSTS, GPUS, HBM_GB)


def test_ranks_get_cuda_devices_and_nccl(plan):
    assert plan.world_size == 16 and plan.backend == "nccl"
    assert plan.devices == [f"cuda:{r % GPUS}" for r in range(16)]
    assert device_and_backend(3, cuda=False) == (torch.device("cpu"), "gloo")


def test_big_tables_are_sharded_row_wise(plan):
    assert set(plan.plans) == {"upstream-engagement", "upstream-conversion", "ranker"}
    for name, sharding in plan.plans.items():
        kinds = {table: p.sharding_type for params in sharding.plan.values() for table, p in params.items()}
        for big in ("t_user_id", "t_pin_id"):  # 1M users, 5M Pins
            assert kinds[big] in ("row_wise", "table_row_wise"), (name, big, kinds[big])


def test_every_rank_fits_its_hbm(plan):
    for sharding in plan.plans.values():
        held = sharded_bytes_per_rank(sharding)
        assert set(held) <= set(range(16))
        assert 0 < max(held.values()) < HBM_GB * 2**30


def test_the_plan_renders_one_line_per_table(plan):
    text = render(plan, "large")
    assert text.startswith("large world on 16 GPU ranks (nccl")
    assert "sequence_ec.t_pin_id: row_wise on ranks [0, 1," in text


def test_a_cap_too_small_names_the_largest_table():
    upstream = models("large")["upstream-engagement"]
    with pytest.raises(ShardingError, match="largest table 't_pin_id' is 5,000,000 x"):
        dry_run_plan(upstream, "cuda", 2, 2, 2**20)
