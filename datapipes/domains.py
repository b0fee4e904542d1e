"""The upstream domains, in one registry: what each trains on, what it predicts, what it ships.

A domain is one upstream entity model and one set of snapshot vectors. Its `tables` are the
source tables a training batch mixes, each with its share of the rows (None: in proportion to
the table's rows); its `tasks` are the BCE heads of its interaction tower (labels of the
batch); rows labelled with any task but a `NEGATIVE_LABELS` one are its contrastive positives.
Downstream, a ranker takes the domains' vectors by name, `<domain>/<entity>` (`VECTOR_SETS`).

Adding a domain is adding an entry here (docs/extending.md): the training stage, the export,
the pipeline and the benchmarks all iterate over `DOMAINS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from derl.datapipes.batch import ENGAGEMENT_LABELS

# Labels that say the user did not want the Pin: such rows are never contrastive positives.
NEGATIVE_LABELS: Tuple[str, ...] = ("hide",)


@dataclass(frozen=True)
class Domain:
    name: str
    tables: Tuple[Tuple[str, Optional[float]], ...]
    tasks: Tuple[str, ...]

    @property
    def contrastive_positives(self) -> Tuple[str, ...]:
        return tuple(t for t in self.tasks if t not in NEGATIVE_LABELS)

    @property
    def main_table(self) -> str:
        """The table whose passes count as epochs."""
        return self.tables[0][0]


DOMAINS: Dict[str, Domain] = {
    # Organic actions and ad clicks, mixed in proportion to their rows.
    "engagement": Domain("engagement", (("engagements", None), ("ad_events", None)),
                         ENGAGEMENT_LABELS + ("clicked",)),
    # Ad conversions, with saves and long clicks of the organic log as auxiliary tasks.
    "conversion": Domain("conversion", (("ad_events", 0.5), ("engagements", 0.5)),
                         ("converted", "save", "long_click")),
}

# The upstream vectors a ranker can take, as "<domain>/<entity>": the paper's ablation sets.
VECTOR_SETS: Dict[str, Tuple[str, ...]] = {
    "user": ("engagement/users",),
    "user_pin": ("engagement/users", "engagement/pins"),
    "all": ("engagement/users", "engagement/pins", "conversion/users", "conversion/pins"),
}


def domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}: one of {', '.join(DOMAINS)}")
    return DOMAINS[name]
