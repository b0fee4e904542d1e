"""Shared fixtures: one tiny world per test session, and copies of it to break."""

import shutil
from pathlib import Path

import pytest

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


# What the learning tests train with: the tiny world, small towers, brisk learning rates.
LEARN_UPSTREAM = {"engagement": ["--epochs", "2"], "conversion": ["--epochs", "1"]}


@pytest.fixture(scope="session")
def learned_upstream(tiny_world, tmp_path_factory) -> dict:
    """Both upstream domains trained far enough to learn (one run each per test session)."""
    from helpers import SMALL, derl

    root = tmp_path_factory.mktemp("learned")
    runs = {}
    for domain, extra in LEARN_UPSTREAM.items():
        runs[domain] = root / domain
        derl("train-upstream", "--data", str(tiny_world), "--out", str(runs[domain]), "--domain", domain,
             "--dense-lr", "3e-3", "--embedding-lr", "0.1", "--checkpoint-every", "100000",
             *extra, *SMALL)
    return runs


@pytest.fixture(scope="session")
def learned_snapshot(tiny_world, learned_upstream, tmp_path_factory) -> Path:
    """The snapshot of `learned_upstream`, cut at the tiny world's default split."""
    from helpers import derl

    out = tmp_path_factory.mktemp("learned_snapshot") / "snap"
    derl("export", "--data", str(tiny_world), "--out", str(out),
         *[a for d, r in learned_upstream.items() for a in ("--upstream", f"{d}={r}")])
    return out
