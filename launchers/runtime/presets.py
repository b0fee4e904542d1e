"""Presets: one table of overrides on the stage configs, for the pipeline, the benchmarks and
the tests.

A preset names a synthetic world (`datapipes.world.WORLD_PRESETS`) and what the stages change
from their defaults on it: `upstream` overrides `TrainUpstreamConfig` for both domains (plus
each domain's `upstream_epochs`), `downstream` overrides `TrainDownstreamConfig`,
`projection_dim` is the width of the pipeline's projected-snapshot ranker. Stages turn overrides into flags
with `config.to_flags`, so a preset never spells a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping

# Small enough for CPU CI, big enough to learn something (the tests' and the quick bench's models).
SMALL_UPSTREAM: Dict[str, Any] = {"embedding_dim": 16, "seq_layers": 1, "tower_dims": (32,),
                                  "interaction_dims": (32,), "batch_size": 64}
SMALL_RANKER: Dict[str, Any] = {"embedding_dim": 8, "dense_arch": (32,), "over_arch": (32, 16),
                                "batch_size": 256}


@dataclass(frozen=True)
class Preset:
    world: str
    upstream: Mapping[str, Any]
    upstream_epochs: Mapping[str, float]
    downstream: Mapping[str, Any]
    projection_dim: int
    # The pipeline trains the coupled ranker (the upstream towers inside it) only where it is
    # cheap; elsewhere `derl pipeline --coupled` asks for it.
    coupled: bool


STAGE_PRESETS: Dict[str, Preset] = {
    "tiny": Preset(
        world="tiny",
        upstream={**SMALL_UPSTREAM, "dense_lr": 3e-3, "embedding_lr": 0.1},
        upstream_epochs={"engagement": 2, "conversion": 1},
        # One pass: with the few clicks of the training days, a second pass already overfits the
        # ranker's id tables (docs/results.md, "Downstream").
        downstream={**SMALL_RANKER, "epochs": 1},
        projection_dim=16,
        coupled=True,
    ),
    "demo": Preset(
        world="demo",
        # Two heads of 16 (four of 8 by default): attention's CPU kernel on 8-wide heads took a
        # large share of a step (docs/experiments.md, "2026-12-05").
        # Float32 matmuls: at this width bf16 autocast cost more than it saved (it pays at d 64;
        # docs/experiments.md, "2026-12-05"). 64 user windows a step: more recall than 32 or 256
        # (docs/experiments.md, "2026-12-07").
        upstream={"embedding_dim": 32, "seq_layers": 1, "seq_heads": 2, "tower_dims": (128, 64),
                  "interaction_dims": (128, 64), "batch_size": 64, "dense_lr": 3e-3,
                  "embedding_lr": 0.1, "from_day": "2026-01-08", "seq_bf16": False},
        # The four days before the cut, one pass: two days gave smaller ranker gains, a second
        # pass little more recall (docs/experiments.md, "2026-12-05" and "2026-12-07"). Half a
        # pass of the conversion domain's windows keeps its cost under the engagement domain's.
        upstream_epochs={"engagement": 1, "conversion": 0.5},
        downstream={"embedding_dim": 16, "batch_size": 1024, "epochs": 1},
        projection_dim=32,
        # On this world the coupled ranker trains and scores far slower than the snapshot ranker
        # (docs/experiments.md, "The fuller demo run").
        coupled=False,
    ),
}

# The freshness study's (benchmarks/studies/freshness.py): the demo models on the freshness world;
# the study sets the upstream's days itself (as many before each cut as the demo preset's four).
STAGE_PRESETS["freshness"] = Preset(
    world="freshness",
    upstream={k: v for k, v in STAGE_PRESETS["demo"].upstream.items() if k != "from_day"},
    upstream_epochs=STAGE_PRESETS["demo"].upstream_epochs,
    downstream=STAGE_PRESETS["demo"].downstream,
    projection_dim=STAGE_PRESETS["demo"].projection_dim,
    coupled=False,
)
STAGE_PRESETS["freshness-tiny"] = Preset(
    world="freshness-tiny",
    upstream=STAGE_PRESETS["tiny"].upstream,
    upstream_epochs={"engagement": 1, "conversion": 1},
    downstream=STAGE_PRESETS["tiny"].downstream,
    projection_dim=STAGE_PRESETS["tiny"].projection_dim,
    coupled=False,
)
