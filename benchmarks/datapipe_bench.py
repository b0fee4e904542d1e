"""Datapipe throughput: batches/s and examples/s of the upstream and downstream readers.

    python -m derl.benchmarks.datapipe_bench --out DIR [--data WORLD] [--batch-size 2048]

Without --data it generates the demo world (once) under DIR/world. Each reader runs one full
epoch over every day, with and without the prefetch thread, and the table says what each gave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from derl.benchmarks import report
from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.world import WORLD_PRESETS, generate
from derl.launchers.runtime.config import setting

READERS = {"upstream": "engagements", "downstream": "ad_events"}


@dataclass(frozen=True)
class DatapipeBenchConfig:
    out: Path = setting(help="folder for datapipe.json and datapipe.md (and the demo world without --data)")
    data: Optional[Path] = setting(None, "source folder (default: the demo world under --out)")
    batch_size: int = setting(2048, "examples per batch")


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = report.parse_config(DatapipeBenchConfig, argv, __doc__)
    data = config.data or config.out / "world"
    if not data.exists():
        generate(data, WORLD_PRESETS["demo"], seed=0)
    rows = [measure(data, side, config.batch_size, prefetch) for side in READERS for prefetch in (4, 0)]
    md = report.write(config.out, "datapipe", rows, {**report.machine(), "data": str(data)})
    print(md.read_text())


if __name__ == "__main__":
    main()
