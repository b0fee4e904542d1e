"""Provenance at every hand-over: each world, upstream run, snapshot and ranker records the world
it came from, and a stage that takes another's output refuses one of another world, domain or
configuration, naming both, before it writes anything (docs/runs.md#provenance).

Most checks are the stages' `validate`, called in-process on the tiny pipeline's trained runs;
a second world is the tiny preset with another seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from derl.datapipes.snapshots import Snapshot
from derl.datapipes.world import WORLD_PRESETS, WORLD_META, generate, read_world_id
from derl.launchers import cli
from derl.launchers.stages import evaluate
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import from_args, to_flags
from derl.launchers.registry import REGISTRY
from derl.launchers.runtime.settings import EvaluateConfig, TrainUpstreamConfig
from helpers import derl


@pytest.fixture(scope="module")
def other_world(tmp_path_factory) -> Path:
    """The tiny preset with seed 1: the same days and table sizes, another world."""
    out = tmp_path_factory.mktemp("worlds") / "tiny-seed-1"
    generate(out, WORLD_PRESETS["tiny"], seed=1)
    return out


def _validate(stage: str, *flags) -> None:
    """A stage's checks before any worker starts, on its flags as the CLI parses them."""
    spec = REGISTRY[stage]
    args = cli.build_parser().parse_args([stage, *map(str, flags)])
    spec.entry().validate(from_args(spec.config_class(), args))


# --- what each artefact records ---------------------------------------------------------------

def test_a_world_id_is_the_same_for_the_same_world_and_another_for_another(tiny_world, other_world, tmp_path):
    again = tmp_path / "again"
    generate(again, WORLD_PRESETS["tiny"], seed=0)
    ids = {name: json.loads((w / WORLD_META).read_text()).get("world_id")
           for name, w in (("tiny", tiny_world), ("again", again), ("other", other_world))}
    assert ids["tiny"] and ids["tiny"] == ids["again"] != ids["other"]
    assert read_world_id(tiny_world) == ids["tiny"] and read_world_id(tmp_path) is None
    # A world written before derl recorded an id: a digest of its metadata, stable and its own.
    meta = json.loads((again / WORLD_META).read_text())
    del meta["world_id"]
    (again / WORLD_META).write_text(json.dumps(meta))
    assert read_world_id(again) == read_world_id(again) not in (None, ids["tiny"])


def test_each_run_and_the_snapshot_record_their_world_and_where_they_came_from(tiny_pipeline):
    world = read_world_id(tiny_pipeline / "world")
    assert world is not None
    for domain in ("engagement", "conversion"):
        config = runs.read_config(tiny_pipeline / "upstream" / domain)
        assert config["world"] == world and config["domain"] == domain
    snap = Snapshot(tiny_pipeline / "snapshots")
    assert snap.manifest["world"] == world
    for domain, info in snap.manifest["domains"].items():
        assert info["domain"] == domain and info["run"] == str(tiny_pipeline / "upstream" / domain)
        assert info["train_days"] == runs.read_config(tiny_pipeline / "upstream" / domain)["days"]
    ranker = runs.read_config(tiny_pipeline / "downstream" / "snapshot")
    assert ranker["world"] == world and ranker["snapshot_versions"] == [snap.version]


# --- export -----------------------------------------------------------------------------------

def _export(tiny_pipeline: Path, tmp_path: Path, *upstream: str, data: Path = None) -> None:
    _validate("export", "--data", data or tiny_pipeline / "world", "--out", tmp_path / "snap",
              *[a for spec in upstream for a in ("--upstream", spec)])


def test_export_refuses_a_run_of_another_domain(tiny_pipeline, learned_upstream, tmp_path):
    engagement = learned_upstream["engagement"]
    with pytest.raises(ValueError, match=f"--upstream conversion={engagement}: {engagement} trained the "
                                         f"engagement domain \\(its config.json\\), not conversion"):
        _export(tiny_pipeline, tmp_path, f"engagement={engagement}", f"conversion={engagement}")
    assert not (tmp_path / "snap").exists()


def test_export_refuses_a_domain_given_twice_and_an_unknown_domain(tiny_pipeline, learned_upstream, tmp_path):
    a = b = learned_upstream["engagement"]
    with pytest.raises(ValueError, match=f"--upstream engagement is given twice \\({a} and {b}\\)"):
        _export(tiny_pipeline, tmp_path, f"engagement={a}", f"engagement={b}")
    with pytest.raises(ValueError, match="--upstream clicks=.*: no domain 'clicks'; the domains are "
                                         "engagement, conversion"):
        _export(tiny_pipeline, tmp_path, f"engagement={a}", f"clicks={learned_upstream['conversion']}")


def test_export_refuses_a_run_of_another_world_naming_both(tiny_pipeline, learned_upstream, other_world,
                                                           tmp_path):
    run = learned_upstream["engagement"]
    with pytest.raises(ValueError, match=(
            f"--upstream engagement={run} comes from world {read_world_id(tiny_pipeline / 'world')} "
            f"\\({tiny_pipeline / 'world'}\\), but --data {other_world} is world {read_world_id(other_world)}")):
        _export(tiny_pipeline, tmp_path, f"engagement={run}", data=other_world)


# --- the rankers ------------------------------------------------------------------------------

def test_a_ranker_refuses_a_snapshot_of_another_world(tiny_pipeline, learned_snapshot, other_world, tmp_path):
    version = Snapshot(learned_snapshot).version
    with pytest.raises(ValueError, match=(
            f"snapshot {version} of {learned_snapshot} comes from world {read_world_id(tiny_pipeline / 'world')} "
            f".*, but --data {other_world} is world {read_world_id(other_world)}")):
        _validate("train-downstream", "--data", other_world, "--snapshots", learned_snapshot,
                  "--out", tmp_path / "ranker", "--vectors", "user_pin")
    assert not (tmp_path / "ranker").exists()


def test_score_refuses_data_of_another_world(tiny_pipeline, other_world, tmp_path):
    ranker = tiny_pipeline / "downstream" / "snapshot"
    with pytest.raises(ValueError, match=f"--run {ranker} comes from world .*, but --data {other_world} is world"):
        _validate("score", "--run", ranker, "--data", other_world, "--out", tmp_path / "scores")
    assert not (tmp_path / "scores").exists()


def test_score_of_an_upstream_run_says_what_the_run_is_in_one_line(learned_upstream, tmp_path):
    run = learned_upstream["engagement"]
    p = derl("score", "--run", str(run), "--out", str(tmp_path / "scores"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"derl score: error: --run {run}: a run of derl train-upstream "
                                f"(config.json kind 'upstream'), not of derl train-downstream")


# --- resume -----------------------------------------------------------------------------------

def _resume_flags(run: Path, **changes) -> list:
    settings = {k: v for k, v in runs.read_config(run)["settings"].items() if k != "overwrite"}
    return to_flags(TrainUpstreamConfig, {**settings, "resume": True, **changes})


def test_resume_refuses_another_world_before_writing_anything(learned_upstream, other_world):
    run = learned_upstream["engagement"]
    before = (run / runs.CONFIG).read_bytes()
    with pytest.raises(ValueError, match=f"--resume: {run} comes from world .*, but --data {other_world} is world"):
        _validate("train-upstream", *_resume_flags(run, data=other_world))
    assert (run / runs.CONFIG).read_bytes() == before


def test_a_resume_that_fails_leaves_the_run_as_it_was(learned_upstream, tmp_path):
    """A resume on other days whose checkpoint cannot be read fails after its checks: config.json
    (days, model) stays the finished run's, so export's time-leak check reads the right days."""
    run = tmp_path / "run"
    shutil.copytree(learned_upstream["engagement"], run)
    before = (run / runs.CONFIG).read_bytes()
    ckpt = runs.latest_checkpoint(run)
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(b"not a checkpoint")
    first, last = runs.read_config(run)["days"]
    until = str(np.datetime64(last) - 1)
    assert first <= until
    p = derl("train-upstream", *_resume_flags(run, out=run, until=until), check=False)
    assert p.returncode != 0
    assert (run / runs.CONFIG).read_bytes() == before


# --- evaluate ---------------------------------------------------------------------------------

def _two_rank_run(ranker: Path, out: Path) -> Path:
    """A copy of a ranker run whose predictions are in two parts, as two ranks write them."""
    shutil.copytree(ranker, out)
    table = pq.read_table(out / runs.PREDICTIONS / "part-00000.parquet")
    half = table.num_rows // 2
    for rank, part in enumerate((table.slice(0, half), table.slice(half))):
        pq.write_table(part, out / runs.PREDICTIONS / f"part-{rank:05d}.parquet")
    metrics = runs.read_metrics(out)
    runs.write_json(out / runs.METRICS, {**metrics, "world_size": 2})
    return out


def test_evaluate_refuses_a_run_missing_a_part_and_names_it_not_the_intact_one(tiny_pipeline, tmp_path):
    broken = _two_rank_run(tiny_pipeline / "downstream" / "snapshot", tmp_path / "broken")
    (broken / runs.PREDICTIONS / "part-00001.parquet").unlink()
    impressions = pq.read_metadata(tiny_pipeline / "downstream" / "snapshot" / runs.PREDICTIONS
                                   / "part-00000.parquet").num_rows
    alone = EvaluateConfig(runs=(f"broken={broken}",), out=tmp_path / "alone", resamples=10)
    with pytest.raises(ValueError, match=(f"--runs broken={broken}: its predictions hold {impressions // 2:,} "
                                          f"of the {impressions:,} impressions of its evaluation day .* "
                                          f"\\(1 prediction part\\(s\\) from 2 rank\\(s\\)\\)")):
        evaluate.run(alone)
    beside = EvaluateConfig(runs=(f"broken={broken}", f"none={tiny_pipeline / 'downstream' / 'none'}"),
                            out=tmp_path / "beside", resamples=10)
    with pytest.raises(ValueError, match=f"--runs broken={broken}: its predictions hold"):
        evaluate.run(beside)
    assert not alone.out.exists() and not beside.out.exists()


def test_evaluate_takes_a_whole_two_part_run(tiny_pipeline, tmp_path):
    whole = _two_rank_run(tiny_pipeline / "downstream" / "snapshot", tmp_path / "whole")
    report = evaluate.run(EvaluateConfig(runs=(f"whole={whole}",), out=tmp_path / "report", resamples=10))
    assert report["rows"] == len(runs.read_predictions(tiny_pipeline / "downstream" / "snapshot")["p_ctr"])


def test_evaluate_refuses_a_run_of_another_world_than_data(tiny_pipeline, other_world, tmp_path):
    ranker = tiny_pipeline / "downstream" / "none"
    with pytest.raises(ValueError, match=f"--runs {ranker} comes from world .*, but --data {other_world} is world"):
        evaluate.run(EvaluateConfig(runs=(f"none={ranker}",), out=tmp_path / "report", data=other_world,
                                    resamples=10))
