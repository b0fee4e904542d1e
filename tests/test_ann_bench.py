"""The ANN benchmark harness on a tiny catalogue: exact search is exact, the approximate indexes
find something, and the JSON / Markdown / PNG reports are written."""

from __future__ import annotations

import json

import numpy as np

from derl.benchmarks import ann_bench


def test_recall_counts_the_overlap_of_top_k_sets():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [8, 7, 6, 5]])
    assert ann_bench.recall(found, exact, 4) == (2 / 4 + 4 / 4) / 2
    assert ann_bench.recall(found, exact, 2) == (0 / 2 + 0 / 2) / 2


def test_ann_bench_on_a_tiny_catalogue_writes_its_reports(tmp_path):
    result = ann_bench.run(["--out", str(tmp_path), "--ads", "5000", "--queries", "100",
                            "--min-time", "0", "--threads", "1", "--build-threads", "1"])
    rows = result["rows"]
    assert {r["index"] for r in rows} == {"flat_ip", "hnsw32", "ivf_flat"}
    exact = [r for r in rows if r["index"] == "flat_ip"]
    assert len(exact) == 1 and exact[0]["recall@10_%"] == 100.0 and exact[0]["recall@100_%"] == 100.0
    hnsw = [r for r in rows if r["index"] == "hnsw32"]
    assert [r["param"] for r in hnsw] == [f"efSearch={ef}" for ef in ann_bench.HNSW_EF]
    assert all(r["ads"] == 5000 for r in rows)
    # The synthetic catalogue is seeded. Measured: HNSW at the largest efSearch finds 99.85 % of
    # the exact top 100, IVF with one probe 27.4 %; the graph costs twice the flat index (2.5 MB
    # against 1.2).
    ivf = [r for r in rows if r["index"] == "ivf_flat"]
    assert hnsw[-1]["recall@100_%"] > 95 and ivf[0]["recall@100_%"] < 50 < ivf[-1]["recall@100_%"]
    assert all(r["index_mb"] > 1.5 * exact[0]["index_mb"] for r in hnsw)
    # More search effort never finds less (on 100 queries, within one query's worth of noise).
    r10 = [r["recall@10_%"] for r in hnsw]
    assert r10[-1] >= r10[0] and hnsw[-1]["recall@100_%"] > hnsw[0]["recall@100_%"]
    for name in ("ann.json", "ann.md", "ann.png"):
        assert (tmp_path / name).stat().st_size > 0
    stored = json.loads((tmp_path / "ann.json").read_text())
    assert stored["rows"] == rows and stored["meta"]["search_threads"] == 1
    assert "| synthetic-5000 | 5000 | flat_ip | exact |" in (tmp_path / "ann.md").read_text()
