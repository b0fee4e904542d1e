"""Shared fixtures: one tiny world per test session, and copies of it to break; trained and
exported models built once per session; the TorchX runner; and the tiers.

Two tiers (docs/testing.md): `make test` runs everything; `make test-fast` runs the unit tier,
`-m "not slow"`. A test is slow when it starts processes (the `derl` command, several ranks,
TorchX) or needs a trained model: it says so with `@pytest.mark.slow`, or it uses one of the
fixtures below that train or export through the CLI (`SLOW_FIXTURES`), which marks it here.
"""

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from filelock import FileLock

from derl.datapipes.world import WORLD_PRESETS, generate
from helpers import SMALL, derl, export

# Fixtures that run `derl` stages (subprocesses, several ranks): every test using one is slow.
SLOW_FIXTURES = {"tiny_pipeline", "learned_upstream", "learned_snapshot", "upstream_runs",
                 "snapshot_root", "local_runner", "upstream_run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@contextmanager
def _built_once(tmp_path_factory, name: str) -> Iterator[Path]:
    """The folder `name`, one for the whole test session, with its lock held: under pytest-xdist
    (`make test` runs two workers) the workers share it, so the first to need it builds it while
    the others wait, then find it built."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        yield folder


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "tiny"
    generate(out, WORLD_PRESETS["tiny"], seed=0)
    return out


@pytest.fixture
def world_copy(tiny_world, tmp_path) -> Path:
    """A private copy of the tiny world that a test may damage."""
    dst = tmp_path / "world"
    shutil.copytree(tiny_world, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """`derl pipeline --preset tiny`, once per test session: its world is `tiny_world`'s twin
    (same preset and seed), and its trained upstream runs, snapshot and rankers serve every test
    that needs trained models (the pipeline's own tests read its report)."""
    with _built_once(tmp_path_factory, "pipeline-tiny") as workdir:
        if not (workdir / "report.json").exists():
            derl("pipeline", "--workdir", str(workdir), "--preset", "tiny")
    return workdir


@pytest.fixture(scope="session")
def learned_upstream(tiny_pipeline) -> dict:
    """Both upstream domains, trained by the tiny pipeline."""
    return {d: tiny_pipeline / "upstream" / d for d in ("engagement", "conversion")}


@pytest.fixture(scope="session")
def learned_snapshot(tiny_pipeline) -> Path:
    """The tiny pipeline's snapshot root (one version, cut at the default split)."""
    return tiny_pipeline / "snapshots"


@pytest.fixture(scope="session")
def upstream_runs(tiny_world, tmp_path_factory) -> dict:
    """Both domains on the tiny world, the small model, 3 steps on 1 rank, once per session:
    barely trained, for the tests of what a run writes and of export, which need a run quickly
    rather than one that learned (that is `learned_upstream`)."""
    with _built_once(tmp_path_factory, "upstream-3-steps") as root:
        runs = {domain: root / domain for domain in ("engagement", "conversion")}
        for domain, run in runs.items():
            if not (run / "metrics.json").is_file():
                derl("train-upstream", "--data", str(tiny_world), "--out", str(run),
                     "--domain", domain, "--max-steps", "3", *SMALL)
    return runs


@pytest.fixture(scope="session")
def snapshot_root(tiny_world, upstream_runs, tmp_path_factory) -> Path:
    """A 2-rank export of `upstream_runs`, once per session; tests copy it to damage it."""
    with _built_once(tmp_path_factory, "snapshot-2-ranks") as root:
        if not (root / "LATEST").is_file():
            export(tiny_world, upstream_runs, root, "--nproc", "2", "--batch-size", "512")
    return root


@pytest.fixture(scope="module")
def local_runner():
    """A TorchX runner for the `local_cwd` scheduler."""
    from torchx.runner import get_runner

    # local_cwd starts `torchrun` / `python` from PATH: this interpreter's, as an activated venv.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        with get_runner("derl-test") as runner:
            yield runner
