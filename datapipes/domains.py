"""The upstream domains, in one registry: what each trains on, what it predicts, what it ships.

A domain is one upstream entity model and one set of snapshot vectors. Its `tables` are the
source tables whose rows a training window carries (each user's rows of a day, from every one of
them: datapipes/windows.py); its `tasks` are the BCE heads of its interaction tower (labels of
the rows); rows labelled with any task but a `NEGATIVE_LABELS` one are its contrastive positives.
Downstream, a ranker takes the domains' vectors by name, `<domain>/<entity>` (`VECTOR_SETS`).

Adding a domain is adding an entry here (docs/extending.md): the training stage, the export,
the pipeline and the benchmarks all iterate over `DOMAINS`.

Not every source supports every domain: an imported world may have no ad impressions (UserBehavior,
MovieLens) or no conversions (the Taobao display-ad logs). A domain trains on the tables the
source holds, needs rows of its main table and a positive of its `required_label`, and
`unsupported` says in one sentence why a source cannot train it (docs/importing.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from derl.datapipes.batch import ENGAGEMENT_LABELS
from derl.datapipes.sources import SourceTables

# Labels that say the user did not want the Pin: such rows are never contrastive positives.
NEGATIVE_LABELS: Tuple[str, ...] = ("hide",)


@dataclass(frozen=True)
class Domain:
    name: str
    tables: Tuple[str, ...]
    tasks: Tuple[str, ...]
    # (table, column) with at least one positive row: what the domain exists to predict.
    required_label: Optional[Tuple[str, str]] = None

    @property
    def contrastive_positives(self) -> Tuple[str, ...]:
        return tuple(t for t in self.tasks if t not in NEGATIVE_LABELS)

    @property
    def main_table(self) -> str:
        """The table the domain cannot train without (its days are the training days)."""
        return self.tables[0]

    def tables_in(self, sources: SourceTables) -> Tuple[str, ...]:
        """The domain's tables that `sources` holds (its main table always among them)."""
        return tuple(t for t in self.tables if t == self.main_table or sources.has(t))

    def unsupported(self, sources: SourceTables) -> Optional[str]:
        """Why `sources` cannot train this domain, in one sentence; None if it can."""
        if not sources.has(self.main_table):
            return f"{sources.root} has no {self.main_table} table, which the {self.name} domain trains on"
        if self.required_label:
            table, column = self.required_label
            if not sources.has_positive(table, column):
                where = f"no row of {table} has {column} = 1" if sources.has(table) else f"it has no {table}"
                return (f"{sources.root} has nothing for the {self.name} domain to learn: {where} "
                        f"(a world without conversions has no conversion domain and no CVR head)")
        return None


DOMAINS: Dict[str, Domain] = {
    # Organic actions and ad clicks.
    "engagement": Domain("engagement", ("engagements", "ad_events"), ENGAGEMENT_LABELS + ("clicked",)),
    # Ad conversions, with saves and long clicks of the organic log as auxiliary tasks.
    "conversion": Domain("conversion", ("ad_events", "engagements"), ("converted", "save", "long_click"),
                         required_label=("ad_events", "converted")),
}

# The upstream vectors a ranker can take, as "<domain>/<entity>": the paper's ablation sets.
VECTOR_SETS: Dict[str, Tuple[str, ...]] = {
    "user": ("engagement/users",),
    "user_pin": ("engagement/users", "engagement/pins"),
    "all": ("engagement/users", "engagement/pins", "conversion/users", "conversion/pins"),
}


def supported(sources: SourceTables) -> List[str]:
    """The domains `sources` can train, in registry order."""
    return [name for name, d in DOMAINS.items() if d.unsupported(sources) is None]


def vector_sets(domains: List[str]) -> List[str]:
    """The `VECTOR_SETS` whose every vector comes from one of `domains`."""
    return [name for name, vs in VECTOR_SETS.items() if all(v.split("/")[0] in domains for v in vs)]


def domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}: one of {', '.join(DOMAINS)}")
    return DOMAINS[name]
