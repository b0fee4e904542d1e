"""Helpers shared by the tests that run the `derl` command."""

from __future__ import annotations

import os
import subprocess
import sys

# Small enough for CPU CI, big enough to learn something.
SMALL = ["--embedding-dim", "16", "--seq-layers", "1", "--tower-dims", "32", "--batch-size", "256"]


def derl(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "derl.launchers.cli", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"derl {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
