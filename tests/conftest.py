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
