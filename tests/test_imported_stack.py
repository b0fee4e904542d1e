"""The whole stack on imported data: a taobao-ad world (files in the exact layouts, drawn by
`benchmarks/taobao_files.py`) through `derl pipeline --data`, and the real UserBehavior rows and
MovieLens-100K in `../shared/data` through import -> train-upstream -> export -> retrieve.

The thresholds are what these runs measured (docs/importing.md, "Measured"), with margin.
"""

import json
from pathlib import Path

import pytest
from helpers import SMALL, derl

from derl.benchmarks.taobao_files import write_taobao_ad_files

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_a_taobao_ad_world_runs_through_the_pipeline(tmp_path):
    write_taobao_ad_files(tmp_path / "files", 80_000, seed=0)
    world, w = tmp_path / "world", tmp_path / "w"
    derl("import", "taobao-ad", "--input", str(tmp_path / "files"), "--out", str(world))
    out = derl("pipeline", "--workdir", str(w), "--preset", "tiny", "--data", str(world)).stdout
    assert "nothing for the conversion domain to learn" in out
    report = json.loads((w / "report.json").read_text())
    assert report["data"]["source"] == "taobao-ad" and report["data"]["domains"] == ["engagement"]
    assert not (w / "upstream" / "conversion").exists()
    assert report["tasks"] == ["ctr"] and report["conversions"] == 0
    assert set(report["runs"]) == {"none", "snapshot", "snapshot-user", "snapshot-projected", "coupled"}
    assert report["runs"]["snapshot"]["vectors"] == "user_pin"
    assert all(set(r) >= {"ctr"} and "cvr" not in r for r in report["runs"].values())
    # Measured: recall@50 0.78 against popularity's 0.41; ad retrieval recall@50 0.57 against 0.30
    # (23 clicked pairs).
    up = report["upstream"]["engagement"]
    assert up["recall@50"] > 1.5 * up["popularity_recall@50"]
    ads = report["ad_retrieval"]
    assert ads["engagement"]["recall@50"] > ads["popularity"]["recall@50"]
    md = (w / "report.md").read_text()
    assert "Left out:" in md and "no CVR head" in md


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
        tmp_path, "taobao-behavior", DATA / "taobao-userbehavior" / "UserBehavior_head.csv")
    # Measured (1 epoch, the small model): recall@50 0.027 against popularity's 0.003.
    assert metrics["recall@50"] > 3 * metrics["popularity_recall@50"]


def test_real_movielens_goes_from_import_to_retrieval(tmp_path):
    metrics = _import_train_export_retrieve(
        tmp_path, "movielens", DATA / "movielens-100k" / "ml-100k.inter", "--from-day", "1997-12-17",
        epochs=3)
    # Measured (the small model): recall@50 0.164 after 3 epochs against popularity's 0.100 (0.128
    # after 2, 0.104 after 1 here and 0.095 on CI's machine). MovieLens is popularity-heavy; one
    # epoch is not enough for the model to find more than the most-rated films do.
    assert metrics["recall@50"] > 1.3 * metrics["popularity_recall@50"]
