"""Embedding snapshots: the hand-over from upstream to downstream, and the one home of its format.

    <root>/<version>/manifest.json                 what the version holds, sha256 of every file
    <root>/<version>/<domain>/{users,pins}/part-RRRRR.parquet   one part per exporting rank:
                                                   entity_id int64, embedding fixed_size_list<float32>[d]
    <root>/<version>/<domain>/ads.faiss + ads_ids.parquet   the ad index and its Pin ids
    <root>/<version>/<domain>/alignment.npy        after a refresh: the Procrustes rotation
    <root>/LATEST                                  the version readers get by default
    <root>/pins/<owner>.json                       versions a downstream model depends on
    <root>/.<version>.tmp-<run id>/                a version being written (or a killed export's)
    <root>/.<version>.tmp-<run id>.lock            flocked by the export writing that folder

Guarantees. A version folder appears whole or not at all, and LATEST names a complete version
at every instant: a version is written hidden, checked, and renamed into place (or swapped with
the version it replaces in one atomic exchange) before LATEST is rewritten (beside, then
renamed). Opening a version verifies it against its manifest first (every file present with its
sha256, no unlisted file, no symlink, every part of the stated dimension with the stated rows
and finite vectors, the index the size of its id map): a half-written or tampered snapshot is
refused with `SnapshotError` naming what is wrong. An open `Snapshot` holds its one folder
(one descriptor, a shared flock) and reads every file through it, so a concurrent replace or
gc never mixes versions under it; LATEST never moves back to an earlier cut. Every name from a flag, LATEST, a manifest
or a pin is one plain path component, so no path leaves the root. An ad index names the
version it was built for and is refused with any other. `gc` removes only what it can name as
derl's: verifying versions that are not LATEST, pinned, among the newest or held by a reader,
and the folders of exports whose lock is free.

Modules: `parts` (the part schema, its one writer and reader), `store` (layout, versions,
verification, pins, gc), `index` (the ad index), `reader` (`Snapshot`, `EmbeddingTable`),
`join` (`SnapshotJoin`, point in time), `writer` (`SnapshotWriter`: hidden folder, commit;
`write_snapshot`: a whole version from vectors in hand), `refresh` (align and smooth onto the
previous version; collective, needs torch, so import it from `derl.datapipes.snapshots.refresh`),
`redis_store` (a version's user vectors in Redis: `publish`, `RedisUsers`; it needs the redis
client, so import it from `derl.datapipes.snapshots.redis_store`).
"""

from derl.datapipes.snapshots.index import FLAT_INDEX_MAX, HNSW_EF_SEARCH
from derl.datapipes.snapshots.join import SnapshotJoin
from derl.datapipes.snapshots.parts import (PartWriter, embedding_schema, part_name, part_paths, read_part,
                                            read_parts, write_part)
from derl.datapipes.snapshots.reader import EmbeddingTable, Snapshot
from derl.datapipes.snapshots.store import (ADS_IDS, ADS_INDEX, ENTITIES, LATEST, MANIFEST, PINS, SnapshotError,
                                            catalogue, cut_days, gc, latest, nonfinite_rows, pin, pinned, plain_name,
                                            refuse_replacing, unpin,
                                            resolve, sha256, verify, versions)
from derl.datapipes.snapshots.writer import SnapshotWriter, write_snapshot

__all__ = [
    "ADS_IDS", "ADS_INDEX", "ENTITIES", "FLAT_INDEX_MAX", "HNSW_EF_SEARCH", "LATEST", "MANIFEST", "PINS",
    "EmbeddingTable", "PartWriter", "Snapshot", "SnapshotError", "SnapshotJoin", "SnapshotWriter",
    "catalogue", "cut_days", "embedding_schema", "gc", "latest", "nonfinite_rows", "part_name", "part_paths", "pin",
    "pinned", "unpin", "plain_name", "read_part", "read_parts", "refuse_replacing", "resolve", "sha256", "verify",
    "versions", "write_part",
    "write_snapshot",
]
