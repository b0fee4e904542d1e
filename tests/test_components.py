"""TorchX components (launchers/components.py): what each one submits to kubernetes and slurm
(dryruns through the torchx runner, parsed as `torchx run` parses them), and real 2-rank local
runs of train-upstream and export under the `local_cwd` scheduler."""

import dataclasses
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torchx.runner import get_runner
from torchx.specs import AppState, named_resources
from torchx.specs.file_linter import validate

from derl.launchers import cli, components
from derl.launchers.registry import REGISTRY
from helpers import SMALL

COMPONENTS_FILE = Path(components.__file__).resolve()

IMAGE = "registry.example.com/derl:test"
ENV = {"DERL_TEST": "1", "FOO": "bar"}


def _component(stage: str) -> str:
    return f"{COMPONENTS_FILE}:{components.COMPONENTS[stage].__name__}"


def _usage(stage: str) -> list:
    """The `torchx run` line of the component's docstring ("Usage: ..."), as arguments."""
    (line,) = [line for line in components.COMPONENTS[stage].__doc__.splitlines()
               if line.strip().startswith("Usage:")]
    return shlex.split(line.split("Usage:", 1)[1])


def _stage_args(stage: str) -> list:
    """The stage's own flags in its documented usage (after `--`): the dry runs pass them on."""
    usage = _usage(stage)
    return usage[usage.index("--") + 1:]


def _cli_args(stage: str) -> list:
    """Component flags as given to `torchx run`, then `--` and the stage's own flags."""
    args = ["--image", IMAGE, "--cpu", "8", "--memMB", "32768", "--env", "DERL_TEST=1,FOO=bar"]
    if REGISTRY[stage].distributed:
        args += ["--nnodes", "2", "--nproc_per_node", "4", "--gpu", "4"]
    return args + ["--", *_stage_args(stage)]


def _check_entrypoint(stage: str, entrypoint: str, args: list) -> None:
    """The job runs `derl <stage> <pass-through args>`: through derl's torchrun on 2 hosts x 4
    ranks for the distributed stages, as one plain python process for the others."""
    tail = ["-m", "derl.launchers.cli", stage, *_stage_args(stage)]
    if REGISTRY[stage].distributed:
        assert entrypoint == "bash" and args[0] == "-c"
        cmd = shlex.split(args[1])
        launcher = ["python", "-m", "derl.launchers.runtime.torchrun"]
        assert cmd[:3] == launcher and cmd[-len(tail):] == tail
        opts = dict(zip(cmd[3:-len(tail)], cmd[4:-len(tail)]))
        assert opts["--nnodes"] == "2" and opts["--nproc_per_node"] == "4"
        # rank 0's host comes from a shell variable; a hyphen in its name (from a role name like
        # "train-upstream") would turn ${VAR:=localhost} into a different expansion
        host = opts["--rdzv_endpoint"].rpartition(":")[0]
        assert re.fullmatch(r"\$\{[A-Za-z0-9_]+:=localhost\}|localhost", host), host
        assert "--nproc" not in cmd[-len(tail):]
    else:
        assert entrypoint == "python" and list(args) == tail


def _check_env(env: dict) -> None:
    assert {k: env[k] for k in ENV} == ENV


def test_each_registered_stage_module_runs_from_its_config():
    for spec in REGISTRY.values():
        if spec.module is None:  # generate, bench: their flags and handler are the CLI's own
            continue
        assert callable(spec.entry().validate) and callable(spec.entry().run)
        fields = {f.name for f in dataclasses.fields(spec.config_class())}
        assert "nproc" in fields or not spec.distributed, f"{spec.name}: no --nproc for its ranks"


def test_the_components_load_without_torch():
    """torchx imports the components file on the submitting host, which need not have torch."""
    code = ("import importlib.util, sys; sys.modules['torch'] = None; "
            f"spec = importlib.util.spec_from_file_location('c', {str(COMPONENTS_FILE)!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("stage", list(REGISTRY))
def test_components_pass_the_torchx_linter(stage):
    assert validate(str(COMPONENTS_FILE), REGISTRY[stage].component) == []


@pytest.mark.parametrize("stage", list(REGISTRY))
def test_each_components_documented_usage_runs_it_with_flags_its_stage_parses(stage):
    usage = _usage(stage)
    assert usage[:4] == ["torchx", "run", "-s", "local_cwd"]
    assert usage[4] == f"launchers/components.py:{REGISTRY[stage].component}"
    args = cli.build_parser().parse_args([stage, *_stage_args(stage)])
    assert args.command == stage
    if REGISTRY[stage].config is not None:  # the subcommand generated from the registry's entry
        assert args.handler.spec == REGISTRY[stage]


@pytest.mark.parametrize("stage", list(REGISTRY))
def test_kubernetes_dryrun_submits_image_resources_replicas_env_and_stage_args(stage):
    from torchx.schedulers.kubernetes_scheduler import sanitize_for_serialization

    with get_runner("derl-test") as runner:
        info = runner.dryrun_component(_component(stage), _cli_args(stage), "kubernetes",
                                       cfg={"queue": "derl", "namespace": "ml"})
    job = sanitize_for_serialization(info.request.resource)
    assert job["kind"] == "Job" and job["spec"]["queue"] == "derl"
    tasks = job["spec"]["tasks"]
    distributed = REGISTRY[stage].distributed
    assert len(tasks) == (2 if distributed else 1)
    assert all(t["replicas"] == 1 for t in tasks)  # one Volcano task per host
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        limits = container["resources"]["limits"]
        assert limits["cpu"] == "8000m" and limits["memory"] == "32768M"
        assert limits.get("nvidia.com/gpu") == ("4" if distributed else None)
        _check_env({e["name"]: e["value"] for e in container["env"]})
        _check_entrypoint(stage, container["command"][0], container["command"][1:])


@pytest.mark.parametrize("stage", list(REGISTRY))
def test_slurm_dryrun_submits_resources_replicas_env_and_stage_args(stage):
    with get_runner("derl-test") as runner:
        info = runner.dryrun_component(_component(stage), _cli_args(stage), "slurm",
                                       cfg={"partition": "gpu", "time": "1:00:00"})
    replicas = info.request.replicas
    distributed = REGISTRY[stage].distributed
    assert len(replicas) == (2 if distributed else 1)  # one heterogeneous group per host
    for replica in replicas.values():
        opts = replica.sbatch_opts
        assert opts["partition"] == "gpu" and opts["cpus-per-task"] == "8" and opts["mem"] == "32768"
        assert opts.get("gpus-per-task") == ("4" if distributed else None)
        _check_env(replica.env)
        _check_entrypoint(stage, replica.entrypoint, replica.args)
    script = info.request.materialize()
    assert "--time=1:00:00" in script and f"derl.launchers.cli {stage}" in script


def test_named_resource_and_experiment_name():
    app = components.train_upstream("--data", "W", h="gpu.small", name="ads/")
    (role,) = app.roles
    assert role.resource == named_resources["gpu.small"]
    assert app.name == "derl-train-upstream" and role.name == "train_upstream"
    assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "ads"
    assert components.generate("--out", "W").roles[0].resource.memMB == 4096


def test_nproc_is_refused_under_torchx():
    with pytest.raises(ValueError, match="--nproc_per_node"):
        components.export("--data", "W", "--nproc", "2")
    with pytest.raises(ValueError, match="--nproc_per_node"):
        components.train_upstream("--nproc=2")


# ---------------------------------------------------------------- real local runs (2 ranks)


def _run_local(runner, stage: str, nproc: int, stage_args: list, log_dir: Path,
               timeout_s: float = 300) -> None:
    """`torchx run -s local_cwd <component> --nproc_per_node N -- <stage_args>`, to the end."""
    handle = runner.run_component(_component(stage), ["--nproc_per_node", str(nproc), "--", *stage_args],
                                  "local_cwd", cfg={"log_dir": str(log_dir)})
    deadline = time.monotonic() + timeout_s
    status = runner.status(handle)
    while status is None or not status.is_terminal():
        if time.monotonic() > deadline:
            runner.cancel(handle)
            break
        time.sleep(0.5)
        status = runner.status(handle)
    if status is None or status.state != AppState.SUCCEEDED:
        logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(log_dir.rglob("*.log")))
        raise AssertionError(f"{stage} under local_cwd: {status}\n{logs}")


@pytest.fixture(scope="module")
def upstream_run(local_runner, tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchx") / "up"
    _run_local(local_runner, "train-upstream", 2,
               ["--data", str(tiny_world), "--out", str(out), "--max-steps", "2", *SMALL],
               out.parent / "logs-up")
    return out


def test_local_train_upstream_on_two_ranks(upstream_run):
    import json

    assert (upstream_run / "checkpoints" / "step-000002").is_dir()
    metrics = json.loads((upstream_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2


def test_local_export_on_two_ranks(local_runner, upstream_run, tiny_world, tmp_path):
    from derl.datapipes.snapshots import Snapshot

    snap = tmp_path / "snap"
    _run_local(local_runner, "export", 2,
               ["--data", str(tiny_world), "--upstream", f"engagement={upstream_run}", "--out", str(snap)],
               tmp_path / "logs")
    s = Snapshot(snap, check=True)  # LATEST, every file against its sha256
    assert s.manifest["world_size"] == 2
    for kind in ("users", "pins"):
        parts = sorted(p.name for p in (s.path / "engagement" / kind).glob("part-*.parquet"))
        assert parts == ["part-00000.parquet", "part-00001.parquet"]


def test_local_train_downstream_on_two_ranks_then_evaluate(local_runner, learned_snapshot, tiny_world, tmp_path):
    import json

    run = tmp_path / "ranker"
    _run_local(local_runner, "train-downstream", 2,
               ["--data", str(tiny_world), "--snapshots", str(learned_snapshot), "--out", str(run),
                "--upstream", "snapshot", "--max-steps", "2", "--embedding-dim", "8", "--batch-size", "256"],
               tmp_path / "logs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 and metrics["eval"]["ctr"]["rows"] > 0
    handle = local_runner.run_component(_component("evaluate"), ["--", "--runs", f"snapshot={run}",
                                                                 "--out", str(tmp_path / "report")],
                                        "local_cwd", cfg={"log_dir": str(tmp_path / "logs2")})
    assert local_runner.wait(handle, wait_interval=0.5).state == AppState.SUCCEEDED
    assert json.loads((tmp_path / "report" / "report.json").read_text())["runs"]["snapshot"]["world_size"] == 2


@pytest.mark.slow
def test_local_generate(local_runner, tmp_path):
    handle = local_runner.run_component(_component("generate"),
                                        ["--", "--out", str(tmp_path / "w"), "--preset", "tiny"],
                                        "local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
    assert local_runner.wait(handle, wait_interval=0.5).state == AppState.SUCCEEDED
    assert (tmp_path / "w" / "_world.json").is_file()
