"""One line per failure, and quiet output.

Every failure here ends in one line of derl's own (`derl <stage>: ...`) with exit 2, or 130 for
Ctrl-C, and no traceback; a stage on the tiny world prints no library warning. Fast: the flag
and `inspect` checks, in-process. Slow: real stages, interrupted by a real SIGINT to their
process group (as a terminal's Ctrl-C), and real full disks (a 256 KiB tmpfs, where this user may
mount one).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from derl.launchers import cli
from derl.launchers.runtime.settings import ExportConfig, PipelineConfig, TrainDownstreamConfig, TrainUpstreamConfig
from helpers import DOWN, SMALL

DERL = [sys.executable, "-m", "derl.launchers.cli"]


@pytest.fixture
def world(tiny_pipeline) -> Path:
    """The world the tiny pipeline's runs and snapshot were trained on (runs hand over only
    within their world)."""
    return tiny_pipeline / "world"


def _only_derl_line(stderr: str, start: str) -> str:
    """The last line of stderr, which must be derl's own, with no traceback anywhere."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith(start), stderr[-3000:]
    return lines[-1]


def _warnings(stderr: str) -> list:
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if re.search(r"warn|^[WE]\d{4} ", ln, re.I)]


# Numbers refused by flag (fast)

@pytest.mark.parametrize("cls, field, value, flag", [
    (TrainUpstreamConfig, "epochs", float("inf"), "--epochs"),
    (TrainUpstreamConfig, "embedding_lr", float("nan"), "--embedding-lr"),
    (TrainUpstreamConfig, "contrastive_weight", float("inf"), "--contrastive-weight"),
    (TrainDownstreamConfig, "epochs", float("inf"), "--epochs"),
    (ExportConfig, "weight", float("nan"), "--weight"),
])
def test_a_number_that_is_not_finite_is_refused_by_its_flag(tmp_path, cls, field, value, flag):
    required = {"data": tmp_path, "out": tmp_path / "o"}
    if cls is ExportConfig:
        required["upstream"] = ("engagement=r",)
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number, got {value}$"):
        cls(**required, **{field: value})


@pytest.mark.parametrize("cls", [TrainUpstreamConfig, TrainDownstreamConfig])
def test_a_negative_seed_is_refused_by_its_flag(tmp_path, cls):
    with pytest.raises(ValueError, match=r"^--seed must be 0 or more, got -1$"):
        cls(data=tmp_path, out=tmp_path / "o", seed=-1)
    with pytest.raises(ValueError, match=r"^--seed must be 0 or more"):
        PipelineConfig(workdir=tmp_path, seed=-1)


def test_epochs_inf_on_the_command_line_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train-upstream", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--epochs", "inf"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "derl train-upstream: error: --epochs must be a finite number, got inf\n"
    assert not (tmp_path / "r").exists()


def test_inspect_refuses_a_folder_that_is_not_a_world(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a table")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"derl inspect: error: {tmp_path} is not a world") and err.count("\n") == 1


# Ctrl-C (slow): a real SIGINT to the stage's process group

def _as_from_a_shell() -> None:
    """In the child before exec: SIGINT delivered and handled as a shell's child gets it, whatever
    the test process (a pytest-xdist worker that has run other files) left ignored or blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _interrupt(args: list, when, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run derl in a session of its own and press Ctrl-C (SIGINT to the group) once `when()`
    holds; `when=None`: the stage presses it itself (DERL_FAULT=<point>:1:INT)."""
    proc = subprocess.Popen([*DERL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=_as_from_a_shell)
    if when is not None:
        deadline = time.monotonic() + timeout
        while not when() and proc.poll() is None:
            assert time.monotonic() < deadline, "the stage never reached the point to interrupt"
            time.sleep(0.05)
        assert proc.poll() is None, "the stage ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_in_a_two_rank_upstream_run_is_one_line_naming_its_checkpoint_and_resume(tiny_world, tmp_path):
    run = tmp_path / "up"
    done = _interrupt(["train-upstream", "--data", str(tiny_world), "--out", str(run), "--nproc", "2",
                       "--checkpoint-every", "2", "--epochs", "50", *SMALL],
                      when=lambda: any((run / "checkpoints").glob("step-*")))
    assert done.returncode == 130, done.stderr[-3000:]
    line = _only_derl_line(done.stderr, "derl train-upstream: interrupted; ")
    kept = re.search(r"keeps checkpoint (step-\d+): continue with the same command and --resume", line)
    assert kept and (run / "checkpoints" / kept.group(1)).is_dir(), line
    assert not _warnings(done.stderr), _warnings(done.stderr)


@pytest.mark.slow
def test_ctrl_c_in_a_ranker_is_one_line_saying_to_overwrite(world, learned_snapshot, tmp_path):
    run = tmp_path / "ranker"
    done = _interrupt(["train-downstream", "--data", str(world), "--snapshots", str(learned_snapshot),
                       "--out", str(run), "--vectors", "user", "--epochs", "50", *DOWN],
                      when=lambda: (run / "config.json").exists())
    assert done.returncode == 130, done.stderr[-3000:]
    line = _only_derl_line(done.stderr, "derl train-downstream: interrupted; ")
    assert line.endswith(f"{run} is unfinished (no metrics.json): run the same command with --overwrite")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_ctrl_c_in_an_export_is_one_line_and_publishes_nothing(world, learned_upstream, tmp_path, nproc):
    root = tmp_path / "snap"
    done = _interrupt(["export", "--data", str(world), "--upstream", f"engagement={learned_upstream['engagement']}",
                       "--out", str(root), "--nproc", nproc], when=None, env={"DERL_FAULT": "export-parts:1:INT"})
    assert done.returncode == 130, done.stderr[-3000:]
    line = _only_derl_line(done.stderr, "derl export: interrupted; ")
    assert f"`derl snapshots gc {root} --keep N`" in line
    assert not (root / "LATEST").exists() and not [p for p in root.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_ctrl_c_in_an_import_is_one_line_and_leaves_no_world(tmp_path):
    # Seconds of reading, then of writing: still at it once its hidden folder appears (with 2M
    # rows the writing was over before a loaded machine's Ctrl-C landed, once).
    rows = 6_000_000
    (tmp_path / "u.data").write_text("".join(f"{1 + i % 5000}\t{1 + i * 7 % 20000}\t{1 + i % 5}\t"
                                             f"{881250949 + i}\n" for i in range(rows)))
    out = tmp_path / "w"
    done = _interrupt(["import", "movielens", "--input", str(tmp_path / "u.data"), "--out", str(out)],
                      when=lambda: any(tmp_path.glob(".w.tmp-*")))
    assert done.returncode == 130, done.stderr[-3000:]
    line = _only_derl_line(done.stderr, "derl import: interrupted; ")
    assert line.endswith(f"{out} is as it was (a world is put in place whole): run the same command again")
    assert not out.exists() and not list(tmp_path.glob(".w.*"))


# A full disk (slow): a 256 KiB tmpfs

@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 256 KiB tmpfs; skipped where this user cannot mount one (not root)."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield small
    subprocess.run(["umount", str(small)], check=True)


def _derl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DERL, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_path(world, learned_upstream, full_disk, tmp_path):
    (tmp_path / "u.data").write_text("".join(f"{1 + i % 3000}\t{1 + i * 7 % 9000}\t{1 + i % 5}\t"
                                             f"{881250949 + i * 20}\n" for i in range(200_000)))
    probes = {
        "import": ["import", "movielens", "--input", str(tmp_path / "u.data"), "--out", str(full_disk / "w")],
        "export": ["export", "--data", str(world), "--out", str(full_disk / "snap"),
                   "--upstream", f"engagement={learned_upstream['engagement']}"],
        "train-upstream": ["train-upstream", "--data", str(world), "--out", str(full_disk / "up"),
                           "--max-steps", "2", *SMALL],
    }
    for stage, args in probes.items():
        done = _derl(*args)
        assert done.returncode == 2, (stage, done.stderr[-3000:])
        line = _only_derl_line(done.stderr, f"derl {stage}: error: no space left on device writing {full_disk}/")
        assert line.endswith("free some and run the same command again"), line


# Quiet output (slow)

@pytest.mark.slow
def test_stages_print_no_library_warning_and_their_result_last(tiny_world, tmp_path):
    up, snap, ranker = tmp_path / "up", tmp_path / "snap", tmp_path / "ranker"
    stages = [
        (["train-upstream", "--data", str(tiny_world), "--out", str(up), "--max-steps", "2", *SMALL], "recall@"),
        (["export", "--data", str(tiny_world), "--upstream", f"engagement={up}", "--out", str(snap), "--nproc", "2"],
         "snapshot "),
        (["train-downstream", "--data", str(tiny_world), "--snapshots", str(snap), "--out", str(ranker),
          "--vectors", "user", "--max-steps", "2", *DOWN], "snapshot: CTR NE"),
    ]
    for args, result in stages:
        done = _derl(*args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not _warnings(done.stderr), (args[0], _warnings(done.stderr))
        assert done.stdout.strip().splitlines()[-1].startswith(result), done.stdout
    # The escape hatch shows them again.
    loud = subprocess.run([*DERL, "export", "--data", str(tiny_world), "--upstream", f"engagement={up}",
                           "--out", str(snap), "--version", "loud"], capture_output=True, text=True,
                          env={**os.environ, "DERL_VERBOSE": "1"})
    assert loud.returncode == 0 and _warnings(loud.stderr)


# Under TorchX (slow)

@pytest.mark.slow
def test_under_torchx_the_final_status_names_derls_error(tmp_path):
    """`torchx run` ends with its AppStatus; it carries derl's line (the reply file torchrun
    reads), not `<NONE>`."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
         "launchers/components.py:train_upstream", "--nproc_per_node", "2", "--",
         "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        cwd=repo, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])})
    assert done.returncode != 0
    status = " ".join(done.stderr[done.stderr.rindex("AppStatus:"):].split())  # YAML wraps long lines
    assert "structured_error_msg: <NONE>" not in status, status
    assert "derl train-upstream: error:" in status and "source folder does not exist" in status, status
