"""The whole stack on a taobao-ad world: files in the exact layouts, drawn by
`datapipes/importers/taobao_files.py`, through `derl import` and `derl pipeline --data` (the real data
from import to retrieval: `test_real_data_stack.py`). Two days of both logs are left without
events, one in the upstream window and one the rankers train on, so that every stage reads across
a day written empty.

The thresholds are what these runs measured (docs/importing.md, "Measured"), with margin.
"""

import json

import pytest
from helpers import china_unix, derl

from derl.datapipes.importers.taobao_files import write_taobao_ad_files

pytestmark = pytest.mark.slow


EMPTY_DAYS = ["2017-05-09", "2017-05-12"]  # ad days: one upstream trains on, one a ranker does


def _without_days(path, days) -> None:
    """Rewrite a Taobao log (header, then `time_stamp` in Unix seconds second on each line)
    without the lines of `days` (China time), every other line as it was."""
    header, *lines = path.read_text().splitlines(keepends=True)
    bounds = [(china_unix(d, 0), china_unix(d, 86_400)) for d in days]
    path.write_text(header + "".join(line for line in lines
                                     if not any(a <= int(line.split(",")[1]) < b for a, b in bounds)))


def test_a_taobao_ad_world_runs_through_the_pipeline(tmp_path):
    write_taobao_ad_files(tmp_path / "files", 80_000, seed=0)
    for log in ("behavior_log", "raw_sample"):
        _without_days(tmp_path / "files" / f"{log}.csv", EMPTY_DAYS)
    world, w = tmp_path / "world", tmp_path / "w"
    out = derl("import", "taobao-ad", "--input", str(tmp_path / "files"), "--out", str(world)).stdout
    assert all(f"{t}: 2 days without events: {', '.join(EMPTY_DAYS)}" in out for t in ("engagements", "ad_events"))
    out = derl("pipeline", "--workdir", str(w), "--preset", "tiny", "--data", str(world)).stdout
    assert "nothing for the conversion domain to learn" in out
    report = json.loads((w / "report.json").read_text())
    assert report["data"]["source"] == "taobao-ad" and report["data"]["domains"] == ["engagement"]
    assert not (w / "upstream" / "conversion").exists()
    assert report["tasks"] == ["ctr"] and report["conversions"] == 0
    assert set(report["runs"]) == {"none", "snapshot", "snapshot-user", "snapshot-projected", "coupled"}
    assert report["runs"]["snapshot"]["vectors"] == "user_pin"
    assert all(set(r) >= {"ctr"} and "cvr" not in r for r in report["runs"].values())
    # Measured: recall@50 0.80 against popularity's 0.41; ad retrieval recall@50 0.65 against 0.17
    # (23 clicked pairs).
    up = report["upstream"]["engagement"]
    assert up["recall@50"] > 1.5 * up["popularity_recall@50"]
    ads = report["ad_retrieval"]
    assert ads["engagement"]["recall@50"] > ads["popularity"]["recall@50"]
    md = (w / "report.md").read_text()
    assert "Left out:" in md and "no CVR head" in md
