"""Shared fixtures: one tiny world per test session, and copies of it to break; and the tiers.

Two tiers (docs/testing.md): `make test` runs everything; `make test-fast` runs the unit tier,
`-m "not slow"`. A test is slow when it starts processes (the `derl` command, several ranks,
TorchX) or needs a trained model: it says so with `@pytest.mark.slow`, or it uses one of the
fixtures below that train or export through the CLI (`SLOW_FIXTURES`), which marks it here.
"""

import os
import shutil
from pathlib import Path

import pytest

# Fixtures that run `derl` stages (subprocesses, several ranks): every test using one is slow.
SLOW_FIXTURES = {"tiny_pipeline", "learned_upstream", "learned_snapshot", "upstream_runs",
                 "snapshot_root", "trained_once", "local_runner", "upstream_run"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

from derl.datapipes.world import PRESETS, generate


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worlds") / "tiny"
    generate(out, PRESETS["tiny"], seed=0)
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
    that needs trained models (the pipeline's own tests read its report).

    Under pytest-xdist (`make test` runs two workers) the workers share one pipeline: the first
    to need it runs it under a file lock, the others wait for it and then find it done."""
    from filelock import FileLock
    from helpers import derl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    workdir = root / "pipeline-tiny"
    with FileLock(str(workdir) + ".lock"):
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
