"""Run folders and stage flags: one run per folder, finite or stopped, flags checked first.

Fast: the library and the CLI's checks in-process (no worker starts); the runs that train are
in tests/test_upstream_training.py and tests/test_downstream.py.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from derl.datapipes.batch import CONTEXT_FEATURES, PIN_FEATURES, SEQUENCE_FEATURES, USER_FEATURES
from derl.datapipes.domains import DOMAINS
from derl.launchers import cli
from derl.launchers.runtime import runs
from derl.launchers.runtime.config import add_flags, from_args, to_flags
from derl.launchers.runtime.finite import NonFiniteError, check_losses, require_finite
from derl.launchers.runtime.settings import ScoreConfig, TrainDownstreamConfig, TrainUpstreamConfig
from derl.models.downstream import RankerConfig


def _upstream(tmp_path: Path, **kw) -> TrainUpstreamConfig:
    return TrainUpstreamConfig(data=tmp_path / "world", out=tmp_path / "run", **kw)


def _started(cfg, kind=runs.UPSTREAM) -> Path:
    runs.claim(cfg, kind)
    runs.start(cfg, kind, {"days": ["2026-01-01", "2026-01-05"]})
    return cfg.out


# One run per folder

def test_a_new_or_empty_folder_takes_a_run_and_is_marked_with_its_kind_and_settings(tmp_path):
    cfg = _upstream(tmp_path, embedding_dim=16)
    out = _started(cfg)
    meta = json.loads((out / runs.CONFIG).read_text())
    assert meta["kind"] == "upstream" and meta["settings"]["embedding_dim"] == 16
    assert meta["days"] == ["2026-01-01", "2026-01-05"]
    (tmp_path / "empty").mkdir()
    runs.claim(TrainUpstreamConfig(data=tmp_path, out=tmp_path / "empty"), runs.UPSTREAM)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    out = _started(_upstream(tmp_path))
    with pytest.raises(FileExistsError, match="holds an earlier upstream run; pass --resume .* or --overwrite"):
        runs.claim(_upstream(tmp_path), runs.UPSTREAM)
    with pytest.raises(FileExistsError, match="holds a upstream run, not a ranker run"):
        runs.claim(TrainDownstreamConfig(data=tmp_path, out=out, upstream="none"), runs.RANKER)


def test_a_folder_derl_did_not_write_is_never_taken_nor_cleared(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    for cfg in (_upstream(tmp_path), _upstream(tmp_path, overwrite=True)):
        with pytest.raises(FileExistsError, match="holds files but no derl run"):
            runs.claim(cfg, runs.UPSTREAM)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="--out .*file: a file, not a folder"):
        runs.claim(TrainUpstreamConfig(data=tmp_path, out=tmp_path / "file"), runs.UPSTREAM)


def test_overwrite_clears_the_earlier_run_and_refuses_what_derl_did_not_write(tmp_path):
    out = _started(_upstream(tmp_path))
    (out / runs.PREDICTIONS).mkdir()
    (out / runs.PREDICTIONS / "part-00001.parquet").write_bytes(b"stale part of a 2-rank run")
    (out / runs.METRICS).write_text("{}")
    fresh = _upstream(tmp_path, overwrite=True, seed=1)
    runs.claim(fresh, runs.UPSTREAM)
    runs.start(fresh, runs.UPSTREAM, {})
    assert sorted(p.name for p in out.iterdir()) == [runs.CONFIG]
    assert json.loads((out / runs.CONFIG).read_text())["settings"]["seed"] == 1
    (out / "data.csv").write_text("someone's")
    with pytest.raises(FileExistsError, match="also holds data.csv, which derl did not write"):
        runs.claim(fresh, runs.UPSTREAM)


def test_resume_needs_the_same_settings_but_may_change_how_long_and_where_it_runs(tmp_path):
    _started(_upstream(tmp_path, embedding_dim=16, dense_lr=3e-3))
    runs.claim(_upstream(tmp_path, embedding_dim=16, dense_lr=3e-3, resume=True, max_steps=9,
                         until="2026-01-06", nproc=2), runs.UPSTREAM, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(--embedding-dim 16 then, 32 now; "
                                         r"--dense-lr 0.003 then, 0.001 now\)"):
        runs.claim(_upstream(tmp_path, embedding_dim=32, resume=True), runs.UPSTREAM, resume=True)
    with pytest.raises(FileNotFoundError, match="--resume: .* holds no run to continue"):
        runs.claim(TrainUpstreamConfig(data=tmp_path, out=tmp_path / "none", resume=True),
                   runs.UPSTREAM, resume=True)


def test_resume_of_a_run_an_older_derl_wrote_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.CONFIG).write_text(json.dumps({"kind": "upstream", "days": []}))
    with pytest.raises(ValueError, match="older derl without its settings"):
        runs.claim(_upstream(tmp_path, resume=True), runs.UPSTREAM, resume=True)


def test_a_run_that_recorded_the_old_setting_names_still_resumes(tmp_path):
    """Runs written before `--no-center` and `--no-bf16` took the model's names, `center_entities`
    and `seq_bf16`, resume; a changed setting is still named by its flag."""
    cfg = _upstream(tmp_path, center_entities=False)
    _started(cfg)
    config = runs.read_config(cfg.out)
    settings = config["settings"]
    settings["center"], settings["bf16"] = settings.pop("center_entities"), settings.pop("seq_bf16")
    runs.write_json(cfg.out / runs.CONFIG, config)
    runs.claim(_upstream(tmp_path, center_entities=False, resume=True), runs.UPSTREAM, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(--no-center-entities False then, True now\)"):
        runs.claim(_upstream(tmp_path, resume=True), runs.UPSTREAM, resume=True)


def test_a_score_folder_is_a_run_of_its_own_kind(tmp_path):
    cfg = ScoreConfig(ranker=tmp_path / "ranker", out=tmp_path / "scores")
    _started(cfg, runs.SCORES)
    with pytest.raises(FileExistsError, match="holds an earlier scores run"):
        runs.claim(cfg, runs.SCORES)
    runs.claim(ScoreConfig(ranker=tmp_path / "ranker", out=tmp_path / "scores", overwrite=True), runs.SCORES)


# Finite or stopped

def test_a_non_finite_loss_stops_the_run_and_names_the_step_and_the_loss():
    check_losses(3, {"bce": 0.7, "contrastive": 5.1}, torch.device("cpu"))
    with pytest.raises(NonFiniteError, match=r"step 7: the loss is not finite \(contrastive\)"):
        check_losses(7, {"bce": 0.7, "contrastive": math.nan}, torch.device("cpu"))
    with pytest.raises(NonFiniteError, match=r"\(bce\)"):
        check_losses(8, {"bce": math.inf}, torch.device("cpu"))


def test_non_finite_predictions_are_refused_with_their_count():
    require_finite("p_ctr", np.array([0.1, 0.2]), torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="p_ctr: 2 of 3 values are not finite"):
        require_finite("p_ctr", np.array([np.nan, 0.2, np.inf]), torch.device("cpu"))


# Flags checked before any work, naming the flag

BAD_FLAGS = [
    ("train-upstream", ["--checkpoint-every", "0"], "--checkpoint-every must be positive, got 0"),
    ("train-upstream", ["--nproc", "0"], "--nproc must be positive, got 0"),
    ("train-upstream", ["--temperature", "0"], "--temperature must be positive, got 0.0"),
    ("train-upstream", ["--tower-dims", "0"], "--tower-dims must be positive widths, e.g. 256,128, got '0'"),
    ("train-upstream", ["--interaction-dims", "64,0"], "--interaction-dims must be positive widths"),
    ("train-upstream", ["--seq-dropout", "1"], "--seq-dropout must be at least 0 and below 1, got 1.0"),
    ("train-upstream", ["--logq-strength", "2"], "--logq-strength must be between 0 and 1, got 2.0"),
    ("train-upstream", ["--embedding-dim", "30"], "--embedding-dim must be a multiple of --seq-heads 4"),
    ("train-upstream", ["--seq-heads", "0"], "--seq-heads must be positive"),
    ("train-upstream", ["--user-features", "user_id,age"],
     "--user-features must name some of user_id,country,age_bucket,gender, got 'user_id,age'"),
    ("train-upstream", ["--epochs", "0"], "--epochs must be positive, got 0.0"),
    ("train-upstream", ["--until", "2026-1-5"], "--until must be a day written YYYY-MM-DD, got '2026-1-5'"),
    ("train-upstream", ["--from-day", "2026-01-09", "--until", "2026-01-05"], "--from-day 2026-01-09 is after --until"),
    ("train-upstream", ["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite replaces it"),
    ("train-upstream", ["--eval-every", "-1"], "--eval-every must be 0 or more, got -1"),
    ("train-upstream", ["--dot-rank-weight", "-1"], "--dot-rank-weight must be 0 or more, got -1.0"),
    ("train-downstream", ["--upstream", "none", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    ("train-downstream", ["--upstream", "none", "--over-arch", "0"], "--over-arch must be positive widths"),
    ("train-downstream", ["--upstream", "none", "--dense-arch", "32,0"], "--dense-arch must be positive widths"),
    ("train-downstream", ["--upstream", "none", "--ne-window", "0"], "--ne-window must be positive, got 0"),
    ("train-downstream", ["--upstream", "none", "--eval-day", "08-01-2026"],
     "--eval-day must be a day written YYYY-MM-DD"),
    ("train-downstream", ["--upstream", "none", "--projection-dim", "0"], "--projection-dim must be positive, got 0"),
    ("train-downstream", ["--upstream", "snapshot"], "--upstream snapshot needs --snapshots"),
]


@pytest.mark.parametrize("stage, flags, message", BAD_FLAGS)
def test_bad_flags_are_refused_before_any_work_naming_the_flag(stage, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([stage, "--data", str(tmp_path / "w"), "--out", str(tmp_path / "r"), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_other_stages_name_their_bad_flags(tmp_path, capsys):
    for argv, message in (
            (["score", "--run", str(tmp_path), "--out", str(tmp_path / "s"), "--nproc", "0"],
             "--nproc must be positive"),
            (["evaluate", "--runs", "a=x", "--out", str(tmp_path / "e"), "--resamples", "0"],
             "--resamples must be positive"),
            (["pipeline", "--workdir", str(tmp_path / "w"), "--nproc", "0"], "--nproc must be positive")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err


# Model settings: declared once, in the model's settings class; a flag of the field's own name

VOCAB = {f: 10 for f in USER_FEATURES + PIN_FEATURES + SEQUENCE_FEATURES + CONTEXT_FEATURES}


def _parsed(cls, flags):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    return from_args(cls, parser.parse_args(flags)), {a.dest for a in parser._actions}


def test_a_model_setting_is_the_flag_of_its_model_field_and_reaches_the_model(tmp_path):
    cfg, flags = _parsed(TrainUpstreamConfig, [
        "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-center-entities", "--no-seq-bf16",
        "--seq-heads", "2", "--contrastive-positives", "click"])
    model = cfg.model_config(VOCAB)
    assert (model.center_entities, model.seq_bf16, model.seq_heads, model.contrastive_positives) == (
        False, False, 2, ("click",))
    assert cfg.model_config(VOCAB).tasks == DOMAINS["engagement"].tasks
    assert not flags & {"num_embeddings", "tasks", "task_weights", "center", "bf16"}
    default = TrainUpstreamConfig(data=tmp_path, out=tmp_path / "run", domain="conversion").model_config(VOCAB)
    assert default.contrastive_positives == DOMAINS["conversion"].contrastive_positives
    with pytest.raises(KeyError, match="no setting 'bf16'"):
        to_flags(TrainUpstreamConfig, {"bf16": False})

    ranker, flags = _parsed(TrainDownstreamConfig, [
        "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--interaction", "dot", "--dense-arch", "8"])
    assert (ranker.upstream, ranker.interaction, ranker.dense_arch) == ("snapshot", "dot", (8,))
    assert not flags & {"num_embeddings", "tasks", "upstream_dim", "dot_temperatures", "ctr_prior", "cvr_prior"}
    with pytest.raises(ValueError, match="--interaction must be one of dcn, dot, got 'cross'"):
        RankerConfig(VOCAB, upstream="none", interaction="cross")


def test_a_bad_omp_num_threads_is_named_before_any_process_group(monkeypatch):
    from derl.launchers.runtime import dist as derl_dist

    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive whole number of threads, got 'two'"):
        derl_dist.init()
