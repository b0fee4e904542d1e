"""Worlds that lack something: no ad impressions (an upstream-only world, as UserBehavior or
MovieLens import), or ad impressions without conversions (the Taobao display-ad logs).

Each stage runs what the world supports and refuses the rest with one sentence before any
worker starts (docs/importing.md, "What a world without ads or conversions runs").
"""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import DOWN, SMALL, derl

from derl.datapipes.domains import DOMAINS, supported, vector_sets
from derl.datapipes.snapshots.parts import part_paths, read_parts
from derl.datapipes.sources import SourceTables


def _without_ads(world):
    """The world as an upstream-only source: no ad_events, and no Pin an ad."""
    shutil.rmtree(world / "ad_events")
    path = next((world / "pins").glob("*.parquet"))
    pins = pq.read_table(path)
    n = pins.num_rows
    pins = pins.set_column(pins.schema.get_field_index("is_ad"), "is_ad", pa.array(np.zeros(n, bool)))
    for c in ("advertiser_id", "campaign_id"):
        pins = pins.set_column(pins.schema.get_field_index(c), c, pa.nulls(n, pa.int64()))
    pq.write_table(pins, path)
    return world


def _without_conversions(world):
    for path in (world / "ad_events").glob("ds=*/*.parquet"):
        t = pq.read_table(path)
        t = t.set_column(t.schema.get_field_index("converted"), "converted",
                         pa.array(np.zeros(t.num_rows, np.int8)))
        pq.write_table(t, path)
    return world


@pytest.fixture
def no_ads(world_copy):
    return _without_ads(world_copy)


@pytest.fixture
def no_conversions(world_copy):
    return _without_conversions(world_copy)


def test_supported_domains_follow_the_data(tiny_world, no_ads, tmp_path):
    assert supported(SourceTables(tiny_world)) == list(DOMAINS)
    assert supported(SourceTables(no_ads)) == ["engagement"]
    assert ("has no ad_events table, which the conversion domain trains on"
            in DOMAINS["conversion"].unsupported(SourceTables(no_ads)))
    assert vector_sets(["engagement"]) == ["user", "user_pin"]
    assert DOMAINS["engagement"].tables_in(SourceTables(no_ads)) == ("engagements",)


def test_no_conversions_means_no_conversion_domain(no_conversions):
    sources = SourceTables(no_conversions)
    assert supported(sources) == ["engagement"]
    assert "no row of ad_events has converted = 1" in DOMAINS["conversion"].unsupported(sources)


@pytest.mark.slow
def test_upstream_only_world_trains_exports_and_retrieves_items(no_ads, tmp_path):
    run, snaps = tmp_path / "up", tmp_path / "snaps"
    refused = derl("train-upstream", "--data", str(no_ads), "--out", str(tmp_path / "conv"),
                   "--domain", "conversion", check=False)
    assert refused.returncode != 0 and "no ad_events" in refused.stderr
    assert not (tmp_path / "conv").exists()  # refused before the run folder was claimed
    derl("train-upstream", "--data", str(no_ads), "--out", str(run), "--max-steps", "20", *SMALL)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tables"] == ["engagements"]
    assert np.isnan(metrics["dot_auc_ad_click"])  # no ad impressions to rank
    assert metrics["recall@50"] > 0
    derl("export", "--data", str(no_ads), "--out", str(snaps), "--upstream", f"engagement={run}")
    manifest = json.loads(next(snaps.glob("*/manifest.json")).read_text())
    assert manifest["catalogue"].startswith("all pins")
    pins = SourceTables(no_ads).read("pins", columns=["pin_id"]).num_rows
    assert manifest["domains"]["engagement"]["rows"]["ads"] == manifest["domains"]["engagement"]["rows"]["pins"]
    assert 0 < manifest["domains"]["engagement"]["rows"]["ads"] <= pins
    users, _ = read_parts(part_paths(next(snaps.glob("*/engagement/users"))), manifest["dim"])
    out = derl("retrieve", "--snapshots", str(snaps), "--user", str(users[0]), "-k", "5").stdout
    assert f"top 5 pins for user {users[0]}" in out and out.count(" pin ") == 5
    ranker = derl("train-downstream", "--data", str(no_ads), "--out", str(tmp_path / "rank"),
                  "--upstream", "none", check=False)
    assert ranker.returncode != 0 and "upstream-only world" in ranker.stderr


@pytest.mark.slow
def test_no_conversions_ranks_ctr_only(no_conversions, tmp_path):
    run, snaps = tmp_path / "up", tmp_path / "snaps"
    derl("train-upstream", "--data", str(no_conversions), "--out", str(run), "--max-steps", "20", *SMALL)
    derl("export", "--data", str(no_conversions), "--out", str(snaps), "--upstream", f"engagement={run}")
    refused = derl("train-downstream", "--data", str(no_conversions), "--snapshots", str(snaps),
                   "--out", str(tmp_path / "all"), "--vectors", "all", check=False)
    assert refused.returncode != 0 and "--vectors user or user_pin" in refused.stderr
    for name, flags in (("none", ["--upstream", "none"]),
                        ("snapshot", ["--snapshots", str(snaps), "--vectors", "user_pin"])):
        out = derl("train-downstream", "--data", str(no_conversions), "--out", str(tmp_path / name),
                   "--max-steps", "10", *flags, *DOWN).stdout
        assert "heads ctr (no conversions in ad_events: no CVR head)" in out
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert set(metrics["eval"]) == {"ctr"}
        preds = pq.read_table(next((tmp_path / name / "predictions").glob("*.parquet")))
        assert "p_cvr" not in preds.column_names
    derl("evaluate", "--runs", f"none={tmp_path / 'none'}", f"snapshot={tmp_path / 'snapshot'}",
         "--out", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["tasks"] == ["ctr"] and set(report["ne_gain_over_baseline"]["snapshot"]) == {"ctr"}
    assert "No conversions: the rankers have no CVR head" in (tmp_path / "eval" / "report.md").read_text()
    assert "ctr_ne_gain" in report and "cvr_ne_gain" not in report


def test_pipeline_on_a_world_runs_what_it_supports(no_conversions, tmp_path):
    from derl.launchers.stages.pipeline import plan, stages
    from derl.launchers.runtime.settings import PipelineConfig

    cfg = PipelineConfig(workdir=tmp_path / "w", preset="demo", data=no_conversions, coupled=True)
    p = plan(cfg)
    assert p.domains == ("engagement",) and p.has_ads and "conversion domain" in p.lacks[0]
    names = [s.name for s in stages(cfg, p)]
    assert names == ["upstream-engagement", "export", "downstream-none", "downstream-snapshot",
                     "downstream-snapshot-user", "downstream-snapshot-projected", "downstream-coupled",
                     "evaluate"]
    by_name = {s.name: s for s in stages(cfg, p)}
    assert "--from-day" not in by_name["upstream-engagement"].args  # the preset world's days stay out
    assert by_name["downstream-snapshot"].args[by_name["downstream-snapshot"].args.index("--vectors") + 1] == "user_pin"
    assert str(no_conversions) in by_name["upstream-engagement"].args


def test_pipeline_on_an_upstream_only_world_stops_after_export(no_ads, tmp_path):
    from derl.launchers.stages.pipeline import plan, stages, validate
    from derl.launchers.runtime.settings import PipelineConfig

    cfg = PipelineConfig(workdir=tmp_path / "w", preset="tiny", data=no_ads)
    assert [s.name for s in stages(cfg, plan(cfg))] == ["upstream-engagement", "export"]
    with pytest.raises(ValueError, match="no ad impressions: no rankers"):
        validate(PipelineConfig(workdir=tmp_path / "w", preset="tiny", data=no_ads, refresh=True))
