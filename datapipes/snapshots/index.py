"""The faiss index over a domain's ad Pins, and its id map: `ads.faiss` + `ads_ids.parquet`.

Inner product over the ad Pins' vectors. Catalogues up to FLAT_INDEX_MAX ads get exact search
(IndexFlatIP); larger ones an HNSW graph (M=32) whose efSearch, HNSW_EF_SEARCH, is stored in
the index file; the reader raises it to k when a query asks for more (faiss does not). The
recall, speed, build time and memory behind these two numbers are in docs/results.md ("ANN").
The id map names the version the index was built for, so that a reader refuses an index from
another version (another vector space).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Dict, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derl.datapipes.snapshots.parts import part_paths, read_parts
from derl.datapipes.snapshots.store import ADS_IDS, ADS_INDEX

FLAT_INDEX_MAX = 1_000_000
HNSW_EF_SEARCH = 256


def build_ads_index(folder: Path, ad_ids: np.ndarray, dim: int, version: str,
                    prior: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Index the ads among the Pins of the domain folder `folder` (its `pins/` parts). With
    `prior` (per ad of the sorted `ad_ids`) each ad is stored as [vector, prior] and queried as
    [user, 1], so the index ranks by dot + prior; its dimension is then dim + 1."""
    import faiss

    ids, vectors = read_parts(part_paths(folder / "pins"), dim)
    keep = np.isin(ids, ad_ids)
    vectors, ids = vectors[keep], ids[keep]
    if prior is not None:
        vectors = np.column_stack([vectors, prior[np.searchsorted(ad_ids, ids)]])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    width = vectors.shape[1]
    if len(ids) <= FLAT_INDEX_MAX:
        index, kind = faiss.IndexFlatIP(width), "flat_ip"
    else:
        index, kind = faiss.IndexHNSWFlat(width, 32, faiss.METRIC_INNER_PRODUCT), "hnsw32_ip"
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(vectors)
    faiss.write_index(index, str(folder / ADS_INDEX))
    ids_table = pa.table({"pin_id": pa.array(ids)}).replace_schema_metadata({"snapshot_version": version})
    pq.write_table(ids_table, folder / ADS_IDS)
    return {"kind": kind, "size": len(ids), "popularity_prior": prior is not None}


def read_ad_ids(f: Union[Path, IO[bytes]]) -> Tuple[np.ndarray, str]:
    """(the ads' Pin ids in index order, the version the index was built for, '' if unstated),
    from `ads_ids.parquet` (its path or the open file)."""
    table = pq.read_table(f)
    built_for = (table.schema.metadata or {}).get(b"snapshot_version", b"").decode()
    return table.column("pin_id").to_numpy(), built_for


def read_ads_index(f: IO[bytes], k: int = 0):
    """The faiss index, from the open `ads.faiss`, good for top-`k` searches (`deepen`)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    deepen(index, k)
    return index


def deepen(index, k: int) -> None:
    """Raise an HNSW index's efSearch to `k` where that is larger (faiss does not)."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)
