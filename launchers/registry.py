"""The stage registry: every `derl` stage, once, for the CLI, the TorchX components, the
pipeline and the tests.

It names modules and classes instead of importing them, so that it loads without torch: TorchX
imports `launchers/components.py`, and with it this module, on the host that submits a job.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Optional

SETTINGS = "derl.launchers.runtime.settings"  # where the stage configs live


@dataclass(frozen=True)
class StageSpec:
    """One stage: `derl <name>`, its TorchX component, and where its code and flags are.

    A stage with a `module` and a `config` runs as the CLI's generated subcommand: flags from
    the config dataclass, then the module's `validate(cfg)` and `run(cfg)`. Without them
    (generate, bench) the CLI builds the subcommand's flags and handler by hand."""

    name: str
    help: str  # its line in `derl --help`
    component: str  # its function in launchers/components.py
    distributed: bool = False  # ranks started by --nproc (derl) or torchrun (TorchX)
    module: Optional[str] = None
    config: Optional[str] = None  # a class of SETTINGS

    def entry(self) -> ModuleType:
        """The stage's module, imported now (with torch)."""
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        """The stage's config dataclass, imported now (with torch)."""
        return getattr(importlib.import_module(SETTINGS), self.config)


# In the order of a run of the stack, then the two drivers of several stages.
REGISTRY: Dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("generate", help="write the synthetic ads world as day-partitioned Parquet",
              component="generate"),
    StageSpec("train-upstream", help="train one domain's upstream entity model (DERM)",
              component="train_upstream", distributed=True,
              module="derl.launchers.stages.train_upstream", config="TrainUpstreamConfig"),
    StageSpec("export", help="export upstream embeddings as a versioned snapshot",
              component="export", distributed=True,
              module="derl.launchers.stages.export", config="ExportConfig"),
    StageSpec("train-downstream", help="train a CTR/CVR ranker, with or without upstream vectors",
              component="train_downstream", distributed=True,
              module="derl.launchers.stages.train_downstream", config="TrainDownstreamConfig"),
    StageSpec("score",
              help="score a day with a trained ranker and a snapshot version of your choice",
              component="score", distributed=True,
              module="derl.launchers.stages.score", config="ScoreConfig"),
    StageSpec("evaluate", help="compare ranker runs on the held-out day: report.json/.md",
              component="evaluate",
              module="derl.launchers.stages.evaluate", config="EvaluateConfig"),
    StageSpec("serve", help="serve the snapshot online over HTTP: user vectors, ad retrieval, the ranker's "
                            "scores; follows LATEST under load",
              component="serve",
              module="derl.launchers.stages.serve", config="ServeConfig"),
    StageSpec("pipeline", help="every stage in order into one work folder, resumable, one report",
              component="pipeline",
              module="derl.launchers.stages.pipeline", config="PipelineConfig"),
    StageSpec("bench", help="the benchmark suite: every stage's throughput and memory "
                            "(--suite quick|full --out DIR)",
              component="bench"),
)}
