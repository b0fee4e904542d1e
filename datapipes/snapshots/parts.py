"""Embedding parts: the one place that writes and reads `part-*.parquet`.

A part holds some entities' vectors of one (domain, entity) table, as rows of

    entity_id int64, embedding fixed_size_list<float32>[d]

The export streams each rank's part chunk by chunk (`PartWriter`: one row group per `write`),
the refresh and the tests write a whole part at once (`write_part`), and every reader goes
through `read_part` / `read_parts`, so the schema is stated here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Iterable, List, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"


def part_name(rank: int) -> str:
    return f"part-{rank:05d}.parquet"


def part_paths(folder: Path) -> List[Path]:
    """The parts of one table folder, in rank order."""
    return sorted(Path(folder).glob(PART_GLOB))


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("entity_id", pa.int64()), ("embedding", embedding_type(dim))])


def stored_type(path: Union[Path, IO[bytes]]) -> pa.DataType:
    """The embedding column's type as a part's footer states it (no rows read)."""
    return pq.read_schema(path).field("embedding").type


class PartWriter:
    """Streams (ids, [n, d] vectors) batches into one part: `with PartWriter(path, d) as w:
    w.write(ids, vectors)`. `rows` counts what was written."""

    def __init__(self, path: Path, dim: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.dim, self.rows = dim, 0
        self._schema = embedding_schema(dim)
        self._writer = pq.ParquetWriter(path, self._schema)

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"{len(ids)} ids need [{len(ids)}, {self.dim}] vectors, got {list(vectors.shape)}")
        self._writer.write_table(pa.table({
            "entity_id": pa.array(ids),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.dim),
        }, schema=self._schema))
        self.rows += len(ids)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_part(path: Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    """A whole part at once (one row group)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    with PartWriter(path, vectors.shape[1]) as writer:
        writer.write(ids, vectors)


def _columns(table: pa.Table, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    emb = table.column("embedding").combine_chunks()
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), dim)
    return table.column("entity_id").to_numpy(), vectors.astype(np.float32, copy=False)


def read_part(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int64 [n], vectors float32 [n, d]) of one part, in its row order."""
    table = pq.read_table(path)
    return _columns(table, table.schema.field("embedding").type.list_size)


def read_parts(paths: Iterable[Union[Path, IO[bytes]]], dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Several parts (paths or open files) concatenated in the order given; empty [0, dim] when
    there are none."""
    tables = [pq.read_table(p) for p in paths]
    return _columns(pa.concat_tables(tables) if tables else embedding_schema(dim).empty_table(), dim)

