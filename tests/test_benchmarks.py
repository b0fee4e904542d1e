"""Benchmarks: the upstream step-time breakdown; the headroom table orders its predictors."""

from __future__ import annotations

import pytest

from derl.benchmarks import upstream_bench
from derl.launchers.runtime import dist as derl_dist
from derl.launchers.runtime.presets import SMALL_UPSTREAM


def test_upstream_worker_times_and_breaks_down_a_plain_step(tiny_world, tmp_path):
    config = {**SMALL_UPSTREAM, "data": tiny_world, "out": tmp_path, "batch_size": 64, "seq_len": 8,
              "max_steps": 2}
    spec = {"config": config, "seq_len": 8, "loop": "plain", "steps": 1, "warmup": 1,
            "profile_steps": 1}
    r = derl_dist.launch(upstream_bench._worker, 1, spec)
    assert 0 < r["mean_seq"] <= 8 and r["peak_rss_mb"] > 100  # torch and torchrec alone take more
    # The breakdown's behaviour, not its figures (those move with the machine's load): both model
    # scopes were reached, and the scopes are disjoint, so their shares and the rest (towers,
    # loss, optimizer) split the profiled step, none below 0.
    shares = {scope: r[f"{scope}_%"] for scope in ("embedding", "transformer", "data", "rest")}
    assert shares["embedding"] > 0 and shares["transformer"] > 0 and r["profiled_step_ms"] > 0
    assert all(0 <= share <= 100 for share in shares.values()), shares
    assert sum(shares.values()) == pytest.approx(100)


def test_headroom_sets_the_snapshot_between_base_rate_and_the_world_truth(tiny_pipeline, tmp_path):
    """The headroom table on the tiny pipeline: every predictor of both tasks, scored on the
    evaluation day; the world's true click probability beats the base rate and the learned
    vectors' dot correlates with the true affinity."""
    import json

    from derl.benchmarks.studies import headroom

    headroom.main(["--data", str(tiny_pipeline / "world"), "--snapshots", str(tiny_pipeline / "snapshots"),
                         "--out", str(tmp_path)])
    result = json.loads((tmp_path / "headroom.json").read_text())
    ne = {(r["task"], r["predictor"]): float(r["ne"]) for r in result["rows"]}
    assert {p for _, p in ne} == {"base rate", "snapshot dots", "true affinity", "true probability"}
    assert ne["ctr", "true probability"] < ne["ctr", "base rate"] - 0.03  # measured 0.912 vs 1.000
    assert ne["ctr", "true affinity"] < ne["ctr", "base rate"]  # measured 0.938
    assert set(result["meta"]["dot_true_affinity_correlation"]) == {"engagement", "conversion"}
    assert result["meta"]["dot_true_affinity_correlation"]["engagement"] > 0.1  # measured 0.35
    assert (tmp_path / "headroom.md").read_text().count("| ctr |") == 4
    probe = result["meta"]["latent_probe_r2"]
    assert set(probe) == {"engagement", "conversion"}
    # Measured: users 0.078 and 0.045, Pins 0.118 and 0.118, ad Pins 0.136 and 0.120 (engagement,
    # conversion); a vector that carried none of the latent would give about 0.
    assert all(0.02 < r2 < 1 for by_entity in probe.values() for r2 in by_entity.values())


def test_the_linear_probe_recovers_a_linear_image_and_not_noise():
    import numpy as np

    from derl.benchmarks.studies.headroom import probe_r2

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(2000, 4))
    assert probe_r2(truth @ rng.normal(size=(4, 8)) + 3.0, truth) > 0.999
    assert abs(probe_r2(rng.normal(size=(2000, 8)), truth)) < 0.01
    half = probe_r2(np.column_stack([truth[:, :2], rng.normal(size=(2000, 6))]), truth)
    assert 0.45 < half < 0.55  # two of the four unit-variance columns


def test_headroom_names_a_snapshot_version_it_cannot_find(tiny_pipeline, tmp_path):
    import pytest

    from derl.benchmarks.studies import headroom
    from derl.datapipes.snapshots import SnapshotError

    with pytest.raises(SnapshotError, match="2099-01-01"):
        headroom.main(["--data", str(tiny_pipeline / "world"), "--snapshots",
                             str(tiny_pipeline / "snapshots"), "--version", "2099-01-01", "--out", str(tmp_path)])


def test_ceiling_orders_the_estimators_by_what_they_know(tiny_world, tmp_path):
    """The ceiling table on the tiny world: knowing more of the hidden state never scores worse,
    and the world's own expected saves retrieve better than popularity."""
    import json

    from derl.benchmarks.studies import ceiling

    ceiling.main(["--data", str(tiny_world), "--out", str(tmp_path)])
    value = {r["estimator"]: r["value"] for r in json.loads((tmp_path / "ceiling.json").read_text())["rows"]}
    assert value["true latents (last upstream day)"] < value["user from engaged Pins' true latents, true ad"] < 1.0
    assert value["true latents (last upstream day)"] < value["true user, ad from content"] < 1.0
    assert value["the world's expected saves (Bayes)"] > value["popularity"]
    assert value["the world's expected saves (Bayes)"] >= value["true-latent dot + log popularity (best weight)"]
    probe = {r["estimator"]: r["value"] for r in json.loads((tmp_path / "ceiling.json").read_text())["rows"]
             if r["figure"].startswith("latent probe")}
    # Measured: users 0.333 (true Pins), 0.184 (content), 0.206 (tables); Pins 0.298 (content), 0.327 (tables).
    assert len(probe) == 5 and all(0.1 < v < 1 for v in probe.values())
    # A user read through their Pins' content knows less than one read through their true latents,
    # and reading the engagements beside the content adds to both users and Pins.
    users_from = "action-weighted mean of engaged Pins' {} (users who engaged)".format
    assert probe[users_from("content posteriors")] < probe[users_from("true latents")]
    assert probe["from the tables (`_table_vectors`; users who engaged)"] > probe[users_from("content posteriors")]
    assert (probe["from the tables (`_table_vectors`)"]
            > probe["content embedding (posterior mean, the projection known)"])


def test_ceiling_rankers_put_the_worlds_own_probabilities_above_every_snapshot(tiny_world, tmp_path):
    """`--rankers`: the rankers on snapshots planted from the hidden state and the world's own probabilities, each
    as an NE gain over `none` with its bootstrap interval. Measured on the tiny world: Bayes CTR
    +8.4 % [+5.1 %, +11.5 %], the true-latent snapshot +0.35 % [+0.03 %, +0.63 %]; no ranker
    beats the world's own probabilities, and in CTR they beat `none` clear of the noise (CVR
    +13.2 % [-4.9 %, +25.0 %] on the day's few conversions)."""
    import json

    from derl.benchmarks.studies import ceiling

    ceiling.main(["--data", str(tiny_world), "--out", str(tmp_path), "--rankers", "tiny", "--nproc", "1"])
    rows = {(r["figure"], r["estimator"]): r for r in json.loads((tmp_path / "ceiling.json").read_text())["rows"]}
    for task in ("CTR", "CVR"):
        gain = {name: rows[(f"{task} NE gain over none (%)", label)]
                for name, label in ceiling.ESTIMATORS.items()}
        assert gain["bayes"]["value"] > max(gain[name]["value"] for name in ceiling.ESTIMATORS if name != "bayes")
        low, high = (float(x) for x in gain["bayes"]["interval"].strip("[]").split(","))
        assert low < gain["bayes"]["value"] < high
        assert low > 0 or task == "CVR"  # the tiny world's evaluation day has too few conversions
    assert "| CTR NE gain over none (%) |" in (tmp_path / "ceiling.md").read_text()


def test_ceiling_refuses_a_rank_count_below_one(tiny_world, tmp_path):
    import pytest

    from derl.benchmarks.studies import ceiling

    with pytest.raises(SystemExit):
        ceiling.main(["--data", str(tiny_world), "--out", str(tmp_path), "--rankers", "tiny", "--nproc", "0"])
    assert not (tmp_path / "ceiling.json").exists()
