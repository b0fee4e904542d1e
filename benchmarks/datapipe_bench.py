"""Datapipe throughput: batches/s and examples/s of the upstream and downstream readers.

    python -m derl.benchmarks.datapipe_bench --out DIR [--data WORLD] [--batch-size 2048]

Without --data it generates the demo world (once) under DIR/world. Each reader runs one full
epoch over every day, with and without the prefetch thread, and the table says what each gave.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from derl.benchmarks import report
from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.world import WORLD_PRESETS, generate

READERS = {"upstream": "engagements", "downstream": "ad_events"}


def measure(data: Path, side: str, batch_size: int, prefetch: int) -> dict:
    cfg = ReaderConfig(batch_size=batch_size, prefetch=prefetch)
    t0 = time.perf_counter()
    reader = ExampleReader(data, READERS[side], config=cfg)
    setup = time.perf_counter() - t0
    batches = examples = 0
    t0 = time.perf_counter()
    for b in reader:
        batches += 1
        examples += b.size
    secs = time.perf_counter() - t0
    return {
        "reader": side,
        "table": READERS[side],
        "prefetch": prefetch,
        "batch_size": batch_size,
        "batches": batches,
        "examples": examples,
        "setup_s": round(setup, 2),
        "batches_per_s": round(batches / secs, 1),
        "examples_per_s": round(examples / secs, 1),
        "peak_rss_mb": round(report.peak_rss_mb(), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, help="source folder (default: the demo world under --out)")
    p.add_argument("--batch-size", type=int, default=2048)
    args = p.parse_args()
    data = args.data or args.out / "world"
    if not data.exists():
        generate(data, WORLD_PRESETS["demo"], seed=0)
    rows = [measure(data, side, args.batch_size, prefetch) for side in READERS for prefetch in (4, 0)]
    md = report.write(args.out, "datapipe", rows, {**report.machine(), "data": str(data)})
    print(md.read_text())


if __name__ == "__main__":
    main()
