"""train-upstream end to end: sharded on 1 and 2 gloo ranks, killed and resumed, and learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from derl.datapipes.readers import ExampleReader
from derl.datapipes.sources import DataError
from derl.datapipes.windows import WindowConfig, WindowReader
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime.config import to_flags
from derl.launchers.runtime.presets import STAGE_PRESETS
from derl.launchers.runtime.runs import upstream_model_config
from derl.launchers.runtime.settings import TrainUpstreamConfig
from derl.models import checkpoint
from derl.models.sharding import OptimConfig, shard_model
from derl.models.upstream import DERM
from helpers import SMALL, derl


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def loss_worker(run: str, data: str) -> dict:
    """Rebuild a run's model on this many ranks, load its last checkpoint (DCP reshards it), and
    take one forward/backward on the same batch on every rank."""
    worker = derl_dist.init()
    try:
        torch.manual_seed(0)
        model = DERM(upstream_model_config(Path(run)), table_device=torch.device("meta"))
        dmp, optimizer, _ = shard_model(model, worker.device, OptimConfig())
        checkpoint.load(checkpoint.latest(Path(run) / "checkpoints"), dmp, optimizer)
        days = ("2026-01-03", "2026-01-03")
        reader = WindowReader(Path(data), [("engagements", days), ("ad_events", days)], 0, 1,  # one rank's batch
                              WindowConfig(batch_size=64, seq_len=model.cfg.seq_len, negatives=16, prefetch=0))
        batch = next(reader.batches(0))
        dmp.eval()  # no dropout: the same function on every world size
        loss, _ = dmp(batch)
        loss.backward()
        grads = [p.grad.norm() for n, p in dmp.named_parameters() if "tower" in n and p.grad is not None]
        return {"loss": float(loss), "dense_grad_norm": float(torch.stack(grads).norm())}
    finally:
        derl_dist.shutdown()


def test_world_size_1_and_2_give_the_same_loss_and_gradients(upstream_runs, tiny_world):
    run = str(upstream_runs["engagement"])
    one = derl_dist.launch(loss_worker, 1, run, str(tiny_world))
    two = derl_dist.launch(loss_worker, 2, run, str(tiny_world))
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["dense_grad_norm"] == pytest.approx(two["dense_grad_norm"], rel=1e-4)


def test_run_writes_plan_metrics_checkpoints_and_logs(upstream_runs):
    run = upstream_runs["engagement"]
    m = _metrics(run)
    assert m["steps"] == 3 and m["world_size"] == 1
    assert {"recall@50", "popularity_recall@50", "dot_auc_save", "dot_auc_click", "dot_auc_ad_click"} <= set(m)
    # Three steps barely train: measured dot AUCs 0.483-0.492 and recall@50 0.338, below
    # popularity's 0.468 (the learned run of test_the_model_learns_on_the_tiny_world beats it).
    for task in ("save", "click", "ad_click"):
        auc = m["eval"]["dot_auc"][task]
        assert auc["impressions"] > auc["positives"] > 0 and auc["auc"] == m[f"dot_auc_{task}"]
        assert abs(auc["auc"] - 0.5) < 0.1
    assert m["recall@10"] < m["recall@50"] < m["recall@100"] and m["recall@50"] < m["popularity_recall@50"]
    assert set(m["eval"]["tasks"]) == {"save", "click"}
    assert any("t_pin_id" in line for line in m["plan"])
    assert checkpoint.latest(run / "checkpoints").name == "step-000003"
    assert list((run / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_a_run_killed_mid_way_and_resumed_ends_like_an_uninterrupted_one(tiny_world, tmp_path):
    common = ["--data", str(tiny_world), "--nproc", "2", "--max-steps", "12",
              "--checkpoint-every", "6", *SMALL]
    derl("train-upstream", "--out", str(tmp_path / "straight"), *common)
    killed = derl("train-upstream", "--out", str(tmp_path / "killed"), *common,
                  env={"DERL_FAULT": "upstream-step:9"}, check=False)
    assert killed.returncode != 0
    assert checkpoint.latest(tmp_path / "killed" / "checkpoints").name == "step-000006"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    derl("train-upstream", "--out", str(tmp_path / "killed"), "--resume", *common)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert resumed["steps"] == straight["steps"] == 12
    for k, v in straight["final_losses"].items():
        assert resumed["final_losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert resumed["recall@50"] == pytest.approx(straight["recall@50"], abs=1e-3)


@pytest.mark.slow
def test_bad_configuration_fails_before_training(tiny_world, tmp_path):
    base = ["train-upstream", "--data", str(tiny_world), "--out", str(tmp_path / "r"), *SMALL]
    p = derl(*base, "--seq-len", "0", check=False)
    assert p.returncode == 2 and "--seq-len must be positive, got 0" in p.stderr
    p = derl(*base, "--resume", check=False)
    assert p.returncode == 2 and "--resume: " in p.stderr and "holds no run to continue" in p.stderr
    p = derl(*base, "--memory-per-rank-gb", "0.0001", "--max-steps", "1", check=False)
    assert p.returncode == 2 and "no sharding plan fits 1 rank(s)" in p.stderr and "t_pin_id" in p.stderr


@pytest.mark.slow
def test_a_run_whose_loss_turns_non_finite_stops_with_the_step_and_ships_nothing(tiny_world, tmp_path):
    """Learning rates of 1e30 blow the loss up at the second step: the run exits 2 naming the
    step and the losses, and writes no metrics (nor checkpoint) for export to pick up."""
    run = tmp_path / "run"
    p = derl("train-upstream", "--data", str(tiny_world), "--out", str(run), "--max-steps", "8",
             "--dense-lr", "1e30", "--embedding-lr", "1e30", *SMALL, check=False)
    assert p.returncode == 2 and "error: step 2: the loss is not finite (" in p.stderr
    assert not (run / "metrics.json").exists() and checkpoint.latest(run / "checkpoints") is None
    p = derl("train-upstream", "--data", str(tiny_world), "--out", str(run), "--max-steps", "8", *SMALL,
             check=False)
    assert p.returncode == 2 and "holds an earlier upstream run; pass --resume" in p.stderr


def test_more_ranks_than_row_groups_is_refused(tiny_world):
    with pytest.raises(DataError, match="row groups cannot be split between 1000 ranks"):
        ExampleReader(tiny_world, "ad_events", world_size=1000)


def test_the_model_learns_on_the_tiny_world(learned_upstream):
    """Measured: two epochs give recall@50 0.544 against popularity's 0.468 (+0.076), and a dot
    AUC of 0.636 among the held-out day's organic impressions for saves (0.5: no affinity). The
    assertions keep about half of each margin. (The session's engagement run, conftest.py, is
    the one the downstream tests build on.)"""
    m = _metrics(learned_upstream["engagement"])
    assert m["recall@50"] > m["popularity_recall@50"] + 0.035
    assert m["recall@100"] > m["recall@50"] > m["recall@10"] > m["popularity_recall@10"]  # 0.348 vs 0.261
    assert m["dot_auc_save"] > 0.57


def test_an_incremental_run_on_a_new_day_continues_from_the_checkpoint(learned_upstream, tiny_world, tmp_path):
    """The daily refresh's upstream step: `--resume --until DAY` on days after the run's window
    starts from its last checkpoint and keeps counting, so its checkpoint is the newest."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(learned_upstream["engagement"], run)
    before = checkpoint.latest(run / "checkpoints")
    derl("train-upstream", "--data", str(tiny_world), "--out", str(run), "--resume",
         "--from-day", "2026-01-06", "--until", "2026-01-06", "--max-steps", "3",
         *to_flags(TrainUpstreamConfig, STAGE_PRESETS["tiny"].upstream))
    m = _metrics(run)
    assert m["steps"] == int(before.name[5:]) + 3 and m["eval"]["day"] == "2026-01-07"
    assert checkpoint.latest(run / "checkpoints").name == f"step-{m['steps']:06d}"
