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
    """The ceiling table on the tiny world: the world's own probabilities beat every reference,
    knowing more of the hidden state never scores worse, and recall is the mean of saves and
    clicks, as the upstream reports it."""
    import json

    from derl.benchmarks.studies import ceiling

    ceiling.main(["--data", str(tiny_world), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "ceiling.json").read_text())["rows"]
    ne = {r["estimator"]: r["value"] for r in rows if r["figure"] == "CTR NE"}
    # Measured: Bayes 0.912 < true latents with quality 0.926 < true latents 0.941 < engaged-Pin
    # mean 0.980, maximum likelihood 0.981, ad from content and category 0.980.
    assert ne["the world's P(click) (Bayes)"] == min(ne.values())
    assert (ne["true latents and advertiser quality in one dot (click weight x dot + quality)"]
            < ne["true latents (last upstream day)"])
    for partial in ("user from engaged Pins' true latents, true ad",
                    "user by maximum likelihood of their organic impressions, true ad",
                    "true user, ad from content and category"):
        assert ne["true latents (last upstream day)"] < ne[partial] < 1.0
    recall = {(r["figure"], r["estimator"]): r["value"] for r in rows if r["figure"].startswith("recall")}
    bayes, dot, popularity = ("the world's expected events of each task (Bayes)",
                              "true-latent dot + log popularity (best weight)",
                              "popularity (the upstream's training days)")
    for name in (bayes, dot, popularity):
        by_task = [recall[f"recall@50 ({task})", name] for task in ("save", "click")]
        assert recall["recall@50 (mean)", name] == pytest.approx(sum(by_task) / 2, abs=1e-4)
    # Measured: 0.737, 0.576, 0.468.
    assert recall["recall@50 (mean)", bayes] > recall["recall@50 (mean)", dot] > recall["recall@50 (mean)", popularity]
    probe = {(r["figure"], r["estimator"]): r["value"] for r in rows if r["figure"].startswith("latent probe")}
    # Measured: users 0.333 (engaged true Pins), 0.331 (maximum likelihood), 0.211 (content), 0.220
    # (tables); Pins 0.396 (content and category), 0.407 (tables).
    assert len(probe) == 6 and all(0.1 < v < 1 for v in probe.values())
    # A user read through their Pins' content knows less than one read through their true latents,
    # and reading the engagements beside the content adds to both users and Pins.
    users = {name: v for (figure, name), v in probe.items() if "users" in figure}
    from_content = users["action-weighted mean of engaged Pins' content posteriors"]
    assert from_content < users["action-weighted mean of engaged Pins' true latents"]
    assert users["from the tables (`_table_vectors`)"] > from_content
    pins = {name: v for (figure, name), v in probe.items() if "Pins" in figure}
    assert pins["from the tables (`_table_vectors`)"] > pins["content and category (posterior mean)"]


def test_ceiling_outcome_model_is_the_worlds():
    """The ceiling's log-probabilities of each action are the frequencies of the world's own draws."""
    import numpy as np
    import torch

    from derl.benchmarks.studies import ceiling
    from derl.datapipes import schema as S
    from derl.datapipes import world as W

    rng, n = np.random.default_rng(0), 200_000
    for affinity, quality, surface in ((-0.3, 0.0, 0), (0.2, 0.4, 1), (0.6, -0.3, 2)):
        drawn = W._draw_outcomes(rng, np.full(n, affinity), np.full(n, quality), np.full(n, surface))
        log_p = ceiling._action_log_probs(torch.tensor([affinity]), torch.tensor([quality]),
                                          W.SURFACE_ENGAGEMENT_BIAS[surface])
        for action in S.Action:
            assert np.exp(log_p[action].item()) == pytest.approx((drawn == action).mean(), abs=0.005), action


@pytest.mark.slow  # trains rankers through the `derl` command
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


def test_ceiling_refuses_a_from_day_outside_the_upstream_days(tiny_world, tmp_path):
    from derl.benchmarks.studies import ceiling

    with pytest.raises(SystemExit, match="--from-day 2026-01-08"):
        ceiling.main(["--data", str(tiny_world), "--out", str(tmp_path), "--from-day", "2026-01-08"])
    assert not (tmp_path / "ceiling.json").exists()
