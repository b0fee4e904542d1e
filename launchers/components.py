"""TorchX components: one per stage of the registry (launchers/registry.py).

Every stage runs as `python -m derl.launchers.cli <subcommand> ...`, the same entry point as
the `derl` command. The stages the registry marks distributed are built on
`torchx.components.dist.ddp`: torchrun starts `nnodes x nproc_per_node` ranks and the stage,
seeing LOCAL_RANK, runs inline as one of them (never pass `--nproc` here: the launcher starts
the ranks). The other stages are one plain `python` process: no LOCAL_RANK in their
environment, so a driver such as `pipeline` may still launch local ranks of its own.

Only the scheduler differs between a laptop and a cluster:

    torchx run -s local_cwd  launchers/components.py:train_upstream --nproc_per_node 2 -- --data W --out RUN
    torchx run -s kubernetes launchers/components.py:train_upstream --nnodes 2 --nproc_per_node 8 --gpu 8 ...
    torchx run -s slurm      launchers/components.py:train_upstream --nnodes 2 --nproc_per_node 8 --gpu 8 ...

Everything after `--` goes to the stage unchanged. Scheduler settings live in `.torchxconfig`.
This module imports torchx and the registry only (no torch): torchx loads it to build the job
on the submitting host, where derl need only be installed (`pip install -e .` pulls no torch).
"""

import os
from typing import Callable, Dict, List, Optional, Sequence

import torchx.specs as specs
from torchx.components.dist import ddp
from torchx.components.structured_arg import StructuredNameArgument

from derl.launchers.registry import REGISTRY

CLI_MODULE = "derl.launchers.cli"
TORCHRUN_MODULE = "derl.launchers.runtime.torchrun"
# The image every role runs on kubernetes / docker (ignored by local_cwd and slurm, which run
# on the host's Python): one with this repository installed as in docs/usage.md, "Set-up".
DEFAULT_IMAGE = os.environ.get("DERL_IMAGE", "derl:latest")

_DIST_ARGS_DOC = """
        nnodes: hosts (scheduler replicas); ranks = nnodes x nproc_per_node
        nproc_per_node: ranks per host, started by torchrun (on GPU hosts at most one per GPU)
        image: container image with derl installed (kubernetes/docker; local_cwd and slurm ignore it)
        name: ``{experiment}/{run}``, ``/{run}`` or ``{experiment}/`` (run defaults to derl-<stage>)
        h: a registered named resource per host (takes precedence over cpu, gpu, memMB)
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        env: environment variables for every rank (e.g. FOO=1,BAR=2)
        max_retries: scheduler retries of the whole job (a training run continues with --resume)
        rdzv_port: rank 0's c10d rendezvous port (multi-host only)
        mounts: mounts, e.g. type=bind,src=/data,dst=/data[,readonly] (see the scheduler's docs)
        debug: set PyTorch's distributed debug variables
"""

_SINGLE_ARGS_DOC = """
        image: container image with derl installed (kubernetes/docker; local_cwd and slurm ignore it)
        name: ``{experiment}/{run}``, ``/{run}`` or ``{experiment}/`` (run defaults to derl-<stage>)
        h: a registered named resource (takes precedence over cpu, gpu, memMB)
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        env: environment variables (e.g. FOO=1,BAR=2)
        max_retries: scheduler retries
        mounts: mounts, e.g. type=bind,src=/data,dst=/data[,readonly] (see the scheduler's docs)
"""


def _with_args_doc(common: str) -> Callable[[Callable[..., specs.AppDef]], Callable[..., specs.AppDef]]:
    """Append the arguments every component shares to its docstring's Args section (torchx
    builds `torchx run ... --help` from the docstring)."""

    def wrap(fn: Callable[..., specs.AppDef]) -> Callable[..., specs.AppDef]:
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + common
        return fn

    return wrap


def stage_app(
    subcommand: str,
    script_args: Sequence[str],
    *,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """The one builder behind every component: `derl <subcommand> <script_args>` as one role,
    on torchrun's ranks if the registry marks the stage distributed."""
    # Role names become Volcano task names and the rank-0 host variable (VC_<ROLE>_0_HOSTS):
    # no hyphen, which a shell would read as ${VAR-default}.
    role_name = subcommand.replace("-", "_")
    app_name = StructuredNameArgument.parse_from(name=name, m=f"derl-{subcommand}")
    args = [subcommand, *script_args]
    env = dict(env or {})

    if not REGISTRY[subcommand].distributed:
        env["TORCHX_TRACKING_EXPERIMENT_NAME"] = app_name.experiment_name
        return specs.AppDef(
            name=app_name.run_name,
            roles=[
                specs.Role(
                    name=role_name,
                    image=image,
                    entrypoint="python",
                    args=["-m", CLI_MODULE, *args],
                    num_replicas=1,
                    resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                    env=env,
                    max_retries=max_retries,
                    mounts=specs.parse_mounts(mounts) if mounts else [],
                )
            ],
        )

    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes}x{nproc_per_node}")
    if any(a == "--nproc" or a.startswith("--nproc=") for a in script_args):
        raise ValueError(
            f"derl {subcommand}: do not pass --nproc under TorchX; torchrun starts the ranks "
            "(use --nproc_per_node / --nnodes of the component)"
        )
    app = ddp(
        *args,
        m=CLI_MODULE,
        image=image,
        name=f"{app_name.experiment_name}/{app_name.run_name}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
        debug=debug,
    )
    role = app.roles[0]
    role.name = role_name
    # The ranks start under derl's torchrun (same flags), which ends a failed job with derl's
    # one line instead of torchrun's traceback and summary (launchers/runtime/torchrun.py).
    command = role.args[-1]
    if not command.startswith("torchrun "):
        raise RuntimeError(f"torchx's ddp component no longer starts with torchrun: {command!r}")
    role.args[-1] = f"python -m {TORCHRUN_MODULE} " + command[len("torchrun "):]
    return app


# Each component spells out its parameters and docstring: TorchX reads them from the component's
# own `def` (its linter parses this file), so they cannot come from a shared one. Its body hands
# them on by name: `locals()` is its parameters there, nothing else being defined yet.

# ---------------------------------------------------------------- distributed stages


@_with_args_doc(_DIST_ARGS_DOC)
def train_upstream(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Train one domain's upstream entity model (``derl train-upstream``) on nnodes x nproc_per_node ranks.

    Usage: torchx run -s local_cwd launchers/components.py:train_upstream --nproc_per_node 2 -- --data W --out RUN --domain engagement

    Args:
        script_args: ``derl train-upstream`` flags after ``--`` (--data, --out, --domain, --resume, ...; not --nproc)"""
    return stage_app("train-upstream", **locals())


@_with_args_doc(_DIST_ARGS_DOC)
def export(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Export upstream embeddings as a versioned snapshot (``derl export``): each rank writes its part.

    Usage: torchx run -s local_cwd launchers/components.py:export --nproc_per_node 2 -- --data W --upstream engagement=RUN --out SNAP

    Args:
        script_args: ``derl export`` flags after ``--`` (--data, --upstream DOMAIN=RUN, --out, --previous, ...; not --nproc)"""
    return stage_app("export", **locals())


@_with_args_doc(_DIST_ARGS_DOC)
def train_downstream(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Train a downstream ads ranker (``derl train-downstream``) on nnodes x nproc_per_node ranks.

    Usage: torchx run -s local_cwd launchers/components.py:train_downstream --nproc_per_node 2 -- --data W --snapshots SNAP --out RUN --upstream snapshot

    Args:
        script_args: ``derl train-downstream`` flags after ``--`` (--data, --snapshots, --out, --upstream none|snapshot|coupled, ...; not --nproc)"""
    return stage_app("train-downstream", **locals())


@_with_args_doc(_DIST_ARGS_DOC)
def score(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Score a day with a trained ranker and a snapshot version of your choice (``derl score``) on nnodes x nproc_per_node ranks.

    Usage: torchx run -s local_cwd launchers/components.py:score --nproc_per_node 2 -- --run RANKER_RUN --out DIR --snapshot-version V

    Args:
        script_args: ``derl score`` flags after ``--`` (--run, --out, --snapshots, --snapshot-version, --eval-day, ...; not --nproc)"""
    return stage_app("score", **locals())


# ---------------------------------------------------------------- single-process stages


@_with_args_doc(_SINGLE_ARGS_DOC)
def generate(
    *script_args: str,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 1,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Write the synthetic ads world as day-partitioned Parquet (``derl generate``), one process.

    Usage: torchx run -s local_cwd launchers/components.py:generate -- --out W --preset demo

    Args:
        script_args: ``derl generate`` flags after ``--`` (--out, --preset, --seed, --overwrite)"""
    return stage_app("generate", **locals())


@_with_args_doc(_SINGLE_ARGS_DOC)
def evaluate(
    *script_args: str,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Evaluate downstream runs into report.json / report.md (``derl evaluate``), one process.

    Usage: torchx run -s local_cwd launchers/components.py:evaluate -- --data W --runs base=RUN_A snap=RUN_B --baseline base --out REPORT

    Args:
        script_args: ``derl evaluate`` flags after ``--`` (--runs NAME=RUN ..., --baseline, --data, --snapshots, --out)"""
    return stage_app("evaluate", **locals())


@_with_args_doc(_SINGLE_ARGS_DOC)
def serve(
    *script_args: str,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Serve the snapshot online (``derl serve``): one long-running process, until stopped; --max_retries N has the scheduler start it again if it dies.

    Usage: torchx run -s local_cwd launchers/components.py:serve -- --snapshots SNAP --ranker RANKER_RUN --host 0.0.0.0 --port 8080

    Args:
        script_args: ``derl serve`` flags after ``--`` (--snapshots, --ranker, --host, --port, --user-store, ...)"""
    app = stage_app("serve", **locals())
    args = list(script_args)
    if "--port" in args[:-1]:  # the port it listens on, declared for the scheduler (a container port)
        app.roles[0].port_map = {"http": int(args[args.index("--port") + 1])}
    return app


@_with_args_doc(_SINGLE_ARGS_DOC)
def bench(
    *script_args: str,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Run the benchmark suite (``derl bench``), one driver process (it starts its own ranks).

    Usage: torchx run -s local_cwd launchers/components.py:bench -- --suite quick --out DIR

    Args:
        script_args: ``derl bench`` flags after ``--`` (--suite quick|full, --out)"""
    return stage_app("bench", **locals())


@_with_args_doc(_SINGLE_ARGS_DOC)
def pipeline(
    *script_args: str,
    image: str = DEFAULT_IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Run the whole stack end to end on one host (``derl pipeline``), one driver process.

    Usage: torchx run -s local_cwd launchers/components.py:pipeline -- --workdir DIR --preset tiny

    Args:
        script_args: ``derl pipeline`` flags after ``--`` (--workdir, --preset, ...)"""
    return stage_app("pipeline", **locals())


# For tests and tools: every stage's component, by the derl subcommand it runs.
COMPONENTS: Dict[str, Callable[..., specs.AppDef]] = {
    spec.name: globals()[spec.component] for spec in REGISTRY.values()
}
