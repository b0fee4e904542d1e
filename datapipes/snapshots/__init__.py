"""Embedding snapshots: the hand-over from upstream to downstream, and the one home of its format.

    <root>/<version>/manifest.json                 what the version holds, sha256 of every file
    <root>/<version>/<domain>/{users,pins}/part-RRRRR.parquet   one part per exporting rank:
                                                   entity_id int64, embedding fixed_size_list<float32>[d]
    <root>/<version>/<domain>/ads.faiss + ads_ids.parquet   the ad index and its Pin ids
    <root>/<version>/<domain>/alignment.npy        after a refresh: the Procrustes rotation
    <root>/LATEST                                  the version readers get by default
    <root>/pins/<owner>.json                       versions a downstream model depends on
    <root>/.<version>.tmp-<run id>/                a version being written (or a killed export's)

Guarantees. A version folder appears whole or not at all: it is written hidden and renamed into
place once its manifest is written, and LATEST is rewritten (beside, then renamed) only after
that. Opening a version verifies it against its manifest first (every file present with its
sha256, no unlisted file, every part of the stated dimension, the index the size of its id
map): a half-written or tampered snapshot is refused with `SnapshotError` naming what is wrong.
An ad index names the version it was built for and is refused with any other.

Modules: `parts` (the part schema, its one writer and reader), `store` (layout, versions,
verification, pins, gc), `index` (the ad index), `reader` (`Snapshot`, `EmbeddingTable`),
`join` (`SnapshotJoin`, point in time), `writer` (`SnapshotWriter`: hidden folder, commit),
`refresh` (align and smooth onto the previous version; collective, needs torch, so import it
from `derl.datapipes.snapshots.refresh`).
"""

from derl.datapipes.snapshots.index import FLAT_INDEX_MAX, HNSW_EF_SEARCH
from derl.datapipes.snapshots.join import SnapshotJoin
from derl.datapipes.snapshots.parts import (PartWriter, embedding_schema, part_name, part_paths, read_part,
                                            read_parts, write_part)
from derl.datapipes.snapshots.reader import EmbeddingTable, Snapshot
from derl.datapipes.snapshots.store import (ADS_IDS, ADS_INDEX, ENTITIES, LATEST, MANIFEST, PINS, SnapshotError,
                                            cut_days, gc, latest, pin, pinned, resolve, sha256, verify, versions)
from derl.datapipes.snapshots.writer import SnapshotWriter

__all__ = [
    "ADS_IDS", "ADS_INDEX", "ENTITIES", "FLAT_INDEX_MAX", "HNSW_EF_SEARCH", "LATEST", "MANIFEST", "PINS",
    "EmbeddingTable", "PartWriter", "Snapshot", "SnapshotError", "SnapshotJoin", "SnapshotWriter",
    "cut_days", "embedding_schema", "gc", "latest", "part_name", "part_paths", "pin", "pinned", "read_part", "read_parts",
    "resolve", "sha256", "verify", "versions", "write_part",
]
