"""Benchmarks: the upstream step-time breakdown measures something and adds up."""

from __future__ import annotations

from derl.benchmarks import upstream_bench
from derl.launchers import dist as derl_dist


def test_upstream_worker_times_and_breaks_down_a_plain_step(tiny_world, tmp_path):
    argv = ["--data", str(tiny_world), "--out", str(tmp_path), "--batch-size", "64",
            "--embedding-dim", "16", "--seq-layers", "1", "--tower-dims", "32", "--seq-len", "8"]
    spec = {"argv": argv, "seq_len": 8, "loop": "plain", "steps": 1, "warmup": 1,
            "profile_steps": 1}
    r = derl_dist.launch(upstream_bench._worker, 1, spec)
    assert r["seconds"] > 0 and 0 < r["mean_seq"] <= 8 and r["peak_rss_mb"] > 0
    shares = [r[k] for k in ("embedding_%", "transformer_%", "data_%", "rest_%")]
    assert r["embedding_%"] > 0 and r["transformer_%"] > 0 and min(shares) >= 0
    assert abs(sum(shares) - 100) < 1e-6
