"""Opening a source folder: finding each table's files by day, checking them, splitting them.

Every check here fails with a `DataError` that names the file and the column, before any row is
trusted. Readers work on `ReadUnit`s (one Parquet row group of one day), the grain at which the
W ranks split a day range between them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from derl.datapipes import schema as S
from derl.datapipes.batch import NUM_GAP_BUCKETS, NUM_POSITIONS


class DataError(ValueError):
    """Bad input data. The message names the file (and column) at fault."""


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one Parquet file: what a rank reads as a whole."""

    path: Path
    row_group: int
    day: Optional[str]
    num_rows: int


DayRange = Tuple[Optional[str], Optional[str]]


def check_schema(path: Path, actual: pa.Schema, spec: S.TableSpec) -> None:
    """Raise unless every required column of `spec` is in `actual` with its type."""
    for f in spec.schema:
        if f.name not in actual.names:
            raise DataError(f"{path}: missing column {f.name!r} (table {spec.name})")
        got = actual.field(f.name).type
        if not got.equals(f.type):
            raise DataError(
                f"{path}: column {f.name!r} has type {got}, expected {f.type} (table {spec.name})"
            )


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def read_checked(path: Path, spec: S.TableSpec, row_group: Optional[int] = None,
                 columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Read a file (or one row group of it), checking schema and that no id is negative."""
    f = _parquet(path)
    check_schema(path, f.schema_arrow, spec)
    columns = list(columns or spec.schema.names)
    try:
        table = f.read(columns) if row_group is None else f.read_row_group(row_group, columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt Parquet data ({e})") from e
    for col in spec.id_columns:
        if col in columns:
            smallest = pc.min(table.column(col)).as_py()
            if smallest is not None and smallest < 0:
                bad = pc.sum(pc.less(table.column(col), 0)).as_py()
                raise DataError(f"{path}: column {col!r} has {bad} negative ids (min {smallest})")
    return table


class SourceTables:
    """A source folder (docs/data.md): `users/`, `pins/`, and day partitions `ds=YYYY-MM-DD`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: source folder does not exist")

    def files(self, table: str, days: DayRange = (None, None)) -> List[Tuple[Optional[str], Path]]:
        """(day, file) pairs of a table, in day order, restricted to `days` (inclusive)."""
        spec = S.TABLES[table]
        folder = self.root / table
        if not folder.is_dir():
            raise DataError(f"{folder}: table {table!r} is missing from the source folder")
        if not spec.partitioned_by_day:
            return [(None, p) for p in sorted(folder.glob("*.parquet"))]
        first, last = days
        lo = S.parse_day(first) if first else dt.date.min
        hi = S.parse_day(last) if last else dt.date.max
        found = []
        for part in sorted(folder.glob("ds=*")):
            day = part.name[3:]
            if lo <= S.parse_day(day) <= hi:
                found.extend((day, p) for p in sorted(part.glob("*.parquet")))
        if not found:
            have = self.days(table)
            span = f"{have[0]}..{have[-1]}" if have else "none"
            raise DataError(
                f"{folder}: no partitions in day range [{first or 'start'}, {last or 'end'}] "
                f"(available: {span})"
            )
        return found

    def days(self, table: str) -> List[str]:
        return sorted(p.name[3:] for p in (self.root / table).glob("ds=*"))

    def units(self, table: str, days: DayRange = (None, None)) -> List[ReadUnit]:
        """Every row group of the table in the day range, schema-checked, in day order."""
        spec = S.TABLES[table]
        units = []
        for day, path in self.files(table, days):
            f = _parquet(path)
            check_schema(path, f.schema_arrow, spec)
            for rg in range(f.num_row_groups):
                units.append(ReadUnit(path, rg, day, f.metadata.row_group(rg).num_rows))
        return units

    def read(self, table: str, days: DayRange = (None, None),
             columns: Optional[Sequence[str]] = None) -> pa.Table:
        """A whole table (or day range of it), checked file by file."""
        spec = S.TABLES[table]
        parts = [read_checked(p, spec, columns=columns) for _, p in self.files(table, days)]
        if not parts:
            raise DataError(f"{self.root / table}: no Parquet files")
        return pa.concat_tables(parts)

    def column_range(self, table: str, column: str) -> Tuple[Optional[int], Optional[int]]:
        """(min, max) of a column from Parquet statistics, without reading the data."""
        lo, hi = None, None
        for _, path in self.files(table):
            meta = _parquet(path).metadata
            idx = meta.schema.to_arrow_schema().get_field_index(column)
            for rg in range(meta.num_row_groups):
                st = meta.row_group(rg).column(idx).statistics
                if st is None or not st.has_min_max:
                    continue
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
        return lo, hi

    def num_rows(self, table: str) -> int:
        return sum(_parquet(p).metadata.num_rows for _, p in self.files(table))

    def vocab(self) -> Dict[str, int]:
        """num_embeddings per sparse feature: id tables sized from the data, enums fixed."""
        def size(table: str, column: str) -> int:
            return int((self.column_range(table, column)[1] or 0) + 1)

        return {
            "user_id": size("users", "user_id"),
            "country": size("users", "country"),
            "age_bucket": size("users", "age_bucket"),
            "gender": size("users", "gender"),
            "pin_id": size("pins", "pin_id"),
            "category": size("pins", "category"),
            "advertiser_id": size("pins", "advertiser_id"),
            "campaign_id": size("pins", "campaign_id"),
            "seq_pin_id": size("pins", "pin_id"),
            "seq_action": S.NUM_ACTIONS,
            "seq_gap": NUM_GAP_BUCKETS,
            "surface": S.NUM_SURFACES,
            "hour": S.NUM_HOURS,
            "position": NUM_POSITIONS,
        }

    def inspect(self) -> List[dict]:
        """One summary per table: files, rows, day range, id ranges (from metadata only)."""
        out = []
        for name, spec in S.TABLES.items():
            if not (self.root / name).is_dir():
                out.append({"table": name, "missing": True})
                continue
            days = self.days(name) if spec.partitioned_by_day else []
            out.append(
                {
                    "table": name,
                    "files": len(self.files(name)),
                    "rows": self.num_rows(name),
                    "days": f"{days[0]}..{days[-1]} ({len(days)})" if days else "-",
                    "ids": {c: self.column_range(name, c) for c in spec.id_columns},
                }
            )
        return out


def shard_units(units: Sequence[ReadUnit], rank: int, world_size: int) -> List[ReadUnit]:
    """Rank r reads units r, r+W, r+2W, ...: disjoint shares that cover every unit once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if len(units) < world_size:
        raise DataError(
            f"{len(units)} row groups cannot be split between {world_size} ranks; "
            "write smaller row groups or use fewer ranks"
        )
    return list(units[rank::world_size])


class IdIndex:
    """Vectorised id -> row position over an id column (any int64 ids, not only 0..N-1)."""

    def __init__(self, ids: np.ndarray, path: Path, column: str):
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]
        if len(ids) and np.any(self.sorted[1:] == self.sorted[:-1]):
            dup = self.sorted[1:][self.sorted[1:] == self.sorted[:-1]][0]
            raise DataError(f"{path}: column {column!r} repeats id {dup}")
        # Ids 0..n-1 (as an id-mapped source has) need no search: the id is its sorted position.
        self.dense = bool(len(ids)) and self.sorted[0] == 0 and self.sorted[-1] == len(ids) - 1

    def rows(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(row positions, found mask); positions where not found are 0."""
        if not len(self.sorted):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        if self.dense:
            found = (ids >= 0) & (ids < len(self.sorted))
            return self.order[np.where(found, ids, 0)], found
        pos = np.minimum(np.searchsorted(self.sorted, ids), len(self.sorted) - 1)
        found = self.sorted[pos] == ids
        return np.where(found, self.order[pos], 0), found
