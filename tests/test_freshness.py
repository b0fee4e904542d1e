"""`derl bench --suite freshness` (benchmarks/studies/freshness.py): its refusals, before any
work, and one small run on a tiny world of drift 0 without new entities, where its own honesty
checks must hold."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from derl.benchmarks.studies import freshness
from derl.datapipes.world import WORLD_META, WORLD_PRESETS, generate
from derl.launchers.cli import build_parser

TINY = ["--preset", "freshness-tiny"]  # 12 days


def refused(capsys, tmp_path, *argv: str) -> str:
    """The one-line error of a study refused before it wrote anything."""
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_:
        freshness.run(["--suite", "freshness", "--out", str(out), *argv])
    assert exit_.value.code == 2 and not out.exists()
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_age_beyond_the_worlds_days_is_refused_naming_the_flag(capsys, tmp_path):
    line = refused(capsys, tmp_path, *TINY, "--max-age", "9")
    assert "--max-age 9 is more than the world's 12 days allow (at most 8" in line


def test_a_cadence_that_leaves_no_upstream_day_is_refused_naming_the_flag(capsys, tmp_path):
    line = refused(capsys, tmp_path, *TINY, "--max-age", "2", "--cadences", "1,11")
    assert "--cadences 11 leaves no upstream day" in line
    # Without the cadence part the same cadence constrains nothing.
    assert freshness.timeline(freshness.FreshnessConfig(out=tmp_path, preset="freshness-tiny", max_age=2,
                                                        cadences=(11,), parts="age"),
                              freshness.world_days(freshness.FreshnessConfig(out=tmp_path,
                                                                             preset="freshness-tiny"))).first == 7


def test_a_world_without_ad_events_is_refused_naming_the_flag(capsys, tmp_path):
    world = tmp_path / "world"
    generate(world, dataclasses.replace(WORLD_PRESETS["tiny"], num_users=100, num_pins=300, num_days=4), seed=0)
    shutil.rmtree(world / "ad_events")
    line = refused(capsys, tmp_path, "--data", str(world))
    assert f"--data {world} has no ad events" in line


@pytest.mark.parametrize("argv, message", [
    (["--worlds", "3"], "--worlds '3': expected DRIFTxNEW"),
    (["--worlds", "1x1", "--data", "/elsewhere"], "--worlds generates worlds of the preset; --data names"),
    (["--parts", "age,smoothing"], "--parts 'age,smoothing': expected some of age, cadence, worlds"),
    (["--weights", "0.5,1"], "--weights must lie strictly between 0 and 1"),
    (["--cadences", "0"], "--cadences must be whole numbers of days, 1 or more"),
])
def test_bad_settings_are_refused_naming_the_flag(capsys, tmp_path, argv, message):
    assert message in refused(capsys, tmp_path, *argv)


def test_the_cadences_place_the_evaluation_day_mid_cycle():
    t = freshness.Timeline(tuple(f"2026-01-{d:02d}" for d in range(1, 20)), first=11, upstream_from=7)
    world = freshness.World(freshness.FreshnessConfig(out=Path("/x")), "1x1", t, main=True)
    assert {c: [t.eval - r for r in world.retrains(c)] for c in (1, 3, 7)} == {
        1: [6, 5, 4, 3, 2, 1, 0], 3: [4, 1], 7: [3]}


def test_generate_takes_the_drift_and_the_new_entity_share(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["generate", "--out", str(tmp_path / "w"), "--preset", "freshness-tiny",
                              "--daily-drift", "-0.1"])
    with pytest.raises(ValueError, match="--daily-drift must be 0 or more"):
        args.handler(args)
    args = parser.parse_args(["generate", "--out", str(tmp_path / "w"), "--preset", "freshness-tiny",
                              "--new-entity-share", "1"])
    with pytest.raises(ValueError, match="--new-entity-share must be at least 0 and below 1"):
        args.handler(args)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_tiny_study_holds_its_curves_and_its_checks(tmp_path):
    out = tmp_path / "study"
    result = freshness.run(["--suite", "freshness", "--out", str(out), *TINY, "--max-age", "1", "--parts", "age",
                            "--worlds", "0x0", "--upstream-days", "2", "--resamples", "200"])
    assert json.loads((out / "freshness.json").read_text())["worlds"] == result["worlds"]
    assert (out / "freshness.md").is_file() and (out / "freshness.png").is_file()
    (world,) = result["worlds"]
    meta = json.loads((out / "world-0x0" / "world" / WORLD_META).read_text())["config"]
    assert meta["daily_drift"] == 0 and meta["cold_user_fraction"] == meta["cold_pin_fraction"] == 0
    assert [(r["age"], r["kind"], r["run"]) for r in world["age"]] == [(0, "a", "fresh"), (1, "a", "age-1"),
                                                                       (1, "b", "lag-1")]
    for r in world["age"]:
        for task in ("ctr", "cvr"):
            g = r["over_none"][task]
            assert g["ci_low"] <= g["gain"] <= g["ci_high"]
        assert ("over_fresh" in r) == (r["age"] > 0)
    # No new entities: every version holds every impression's user and ad, whatever its age.
    assert [r["coverage"] for r in world["age"]] == [1.0, 1.0, 1.0]
    checks = result["checks"]
    assert set(checks) == {"age_0_is_the_pipeline_gain", "no_cost_without_drift"}
    assert all(c["holds"] for c in checks["age_0_is_the_pipeline_gain"].values())
    assert checks["no_cost_without_drift"]["holds"] and checks["no_cost_without_drift"]["world"] == "0x0"
    # A re-run continues: every stage is done, so nothing runs again.
    again = freshness.run(["--suite", "freshness", "--out", str(out), *TINY, "--max-age", "1", "--parts", "age",
                           "--worlds", "0x0", "--upstream-days", "2", "--resamples", "200"])
    assert again["worlds"][0]["age"] == world["age"]
