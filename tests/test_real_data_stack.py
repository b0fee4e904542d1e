"""The real UserBehavior rows and MovieLens-100K in `../shared/data` through import ->
train-upstream -> export -> retrieve (its own file, so that `make test`'s workers run it beside
`test_imported_stack.py`).

The thresholds are what these runs measured (docs/importing.md, "Measured"), with margin.
"""

import json
from pathlib import Path

import pytest
from helpers import SMALL, derl

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _import_train_export_retrieve(tmp_path, fmt, source, *import_flags, epochs=1):
    world, run, snaps = tmp_path / "world", tmp_path / "up", tmp_path / "snaps"
    derl("import", fmt, "--input", str(source), "--out", str(world), *import_flags)
    derl("train-upstream", "--data", str(world), "--out", str(run), "--epochs", str(epochs), *SMALL)
    metrics = json.loads((run / "metrics.json").read_text())
    derl("export", "--data", str(world), "--out", str(snaps), "--upstream", f"engagement={run}")
    out = derl("retrieve", "--snapshots", str(snaps), "--user", "0", "-k", "10").stdout
    assert "top 10 pins for user 0" in out and out.count(" pin ") == 10
    refused = derl("train-downstream", "--data", str(world), "--out", str(tmp_path / "rank"),
                   "--upstream", "none", check=False)
    assert refused.returncode != 0 and "upstream-only world" in refused.stderr
    return metrics


def test_real_userbehavior_rows_go_from_import_to_retrieval(tmp_path):
    metrics = _import_train_export_retrieve(
        tmp_path, "taobao-behavior", DATA / "taobao-userbehavior" / "UserBehavior_head.csv", epochs=5)
    # Measured (the small model, 64 user windows a step): recall@50 0.033 after 5 epochs (330 steps)
    # against popularity's 0.003; 0.004 after 1 epoch (66 steps), 0.009 after 3. (The row-major
    # upstream took 330 steps an epoch and reached 0.027.)
    assert metrics["recall@50"] > 3 * metrics["popularity_recall@50"]


def test_real_movielens_goes_from_import_to_retrieval(tmp_path):
    metrics = _import_train_export_retrieve(
        tmp_path, "movielens", DATA / "movielens-100k" / "ml-100k.inter", "--from-day", "1997-12-17",
        epochs=5)
    # Measured (the small model, 64 user windows a step, 5 epochs, one thread as make test runs):
    # recall@50 0.105 with seed 0 (this test's; the same figure on every run of this stack), 0.150
    # and 0.187 with seeds 1 and 2, against popularity's 0.100. The figure moves with the seed and
    # the epochs (8 epochs: 0.137 and 0.095), so this asserts only that the learned vectors do not
    # fall under popularity; `test_real_userbehavior_rows_go_from_import_to_retrieval` asserts a gain.
    assert metrics["recall@50"] >= metrics["popularity_recall@50"]
