"""The benchmark suite at its smallest: the scaling harness on a 10^4-row table, and `derl bench`
running the downstream modes (2 steps each) and the scaling stage into bench.json / bench.md."""

from __future__ import annotations

import json

import pytest
import torch

from derl.benchmarks import bench, downstream_bench, scaling_bench
from derl.datapipes.sources import SourceTables
from derl.launchers import cli
from derl.models.blocks import native_bf16


@pytest.mark.slow
def test_scaling_trains_and_exports_a_small_sharded_table(tmp_path):
    r = scaling_bench.measure(10_000, tmp_path, dim=16, batch_size=256, steps=2, warmup=1, export_batch=4096)
    assert r["rows"] == 10_000 and r["exported"] == 10_000 and r["world_size"] == 1
    assert r["train_examples_per_s"] == pytest.approx(256 * r["train_steps_per_s"], rel=1e-4)  # rounded
    # 10^4 rows x 16 random float32 are 0.61 MiB of vectors; ids and Parquet's framing add a little.
    assert 0.6 < r["export_part_mb"] < 1.0
    assert r["peak_rss_mb"] >= r["train_peak_rss_mb"] > 100  # torch and torchrec alone take more
    assert "t_ids" in r["plan"]
    assert not list((tmp_path / "scaling-10000").glob("*.parquet"))  # the part is removed after


def test_ratios_are_snapshot_over_coupled_per_world_size():
    rows = [{"mode": "snapshot", "world_size": 1, "train_examples_per_s": 300.0, "score_examples_per_s": 900.0},
            {"mode": "coupled", "world_size": 1, "train_examples_per_s": 100.0, "score_examples_per_s": 450.0},
            {"mode": "coupled", "world_size": 2, "train_examples_per_s": 1.0, "score_examples_per_s": 1.0}]
    assert downstream_bench.ratios(rows) == {"decoupled_vs_coupled_ratio": 3.0,
                                             "decoupled_vs_coupled_scoring_ratio": 2.0}
    assert downstream_bench.ratios(rows[:1])["decoupled_vs_coupled_ratio"] is None


@pytest.mark.slow
def test_derl_bench_runs_the_stack_at_its_smallest_and_writes_its_reports(tiny_world, tmp_path):
    """upstream (2 steps per domain) -> export -> the three downstream modes (2 steps each), and
    the scaling stage, through `derl bench` itself."""
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "quick", "--out", str(out), "--data", str(tiny_world),
            "--stages", "upstream,export,downstream,scaling", "--upstream-steps", "2",
            "--downstream-steps", "2", "--scaling-rows", "10000"]
    cli.main(argv)  # exits non-zero if a stage failed
    result = json.loads((out / "bench.json").read_text())
    assert result["suite"] == "quick" and result["command"] == "derl " + " ".join(argv)
    assert result["device"] == result["machine"]["device"] and result["errors"] == {}
    # The headline ratios are snapshot over coupled throughput (checked exactly below); which is
    # faster is a measurement (results.md), not asserted here.
    assert result["decoupled_vs_coupled_ratio"] > 0
    assert result["decoupled_vs_coupled_scoring_ratio"] > 0
    stages = result["stages"]
    assert [r["domain"] for r in stages["upstream"]["rows"]] == ["engagement", "conversion"]
    assert all(r["steps"] == 2 for r in stages["upstream"]["rows"])
    # The upstream benchmark's headline at the tiny world's length: both rows measured, and each
    # ratio the quotient of its rows' rates: the transformer's over the plain matmul's (in the
    # dtype the encoder's projections run in here), the pipeline's over the reference SASRec's.
    limits = stages["upstream"]["limits"]
    assert [r["loop"] for r in limits] == ["pipeline", "plain"]
    pipeline, plain = limits
    up = result["upstream"]
    assert up["seq_len"] == pipeline["seq_len"] and up["examples_per_s"] > 0
    fraction = plain["transformer_gflop_s"] / plain["matmul_gflop_s"]
    assert up["fraction_of_matmul_peak"] == round(fraction, 4) > 0
    assert plain["matmul_dtype"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")
    assert result["upstream_vs_sasrec_ratio"] == round(
        pipeline["examples_per_s"] / plain["sasrec_examples_per_s"], 3)
    assert "Upstream at sequence length" in (out / "bench.md").read_text()
    assert [r["domain"] for r in stages["export"]["rows"]] == ["engagement", "conversion"]
    users = len(SourceTables(tiny_world).read("users", columns=["user_id"]))
    assert all(0 < r["users"] <= users for r in stages["export"]["rows"])
    assert result["snapshots"] == str(out / "snapshots")
    down = stages["downstream"]["rows"]
    assert [r["mode"] for r in down] == list(downstream_bench.MODES)
    for r in down:
        assert r["world_size"] == 1 and r["steps"] == 2 and r["peak_rss_mb"] > 100
    snap, coupled = down[1], down[2]
    assert result["decoupled_vs_coupled_ratio"] == round(
        snap["train_examples_per_s"] / coupled["train_examples_per_s"], 3)
    scaling = stages["scaling"]["rows"]
    assert [r["rows"] for r in scaling] == [10_000]
    assert {r["stage"] for r in result["table"]} == {"upstream", "export", "downstream", "scaling"}
    md = (out / "bench.md").read_text()
    assert "derl " + " ".join(argv) in md and "decoupled_vs_coupled_ratio" in md
    assert "| downstream | train-downstream coupled, all vectors, 2 steps | 1 |" in md
    assert set(result["plots"]) == {"bench-throughput.png", "bench-downstream.png", "bench-scaling.png"}
    for png in result["plots"]:
        assert (out / png).stat().st_size > 0
    assert set(bench.BENCH_STAGES) >= set(stages)
