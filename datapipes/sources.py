"""Opening a source folder: finding each table's files by day, checking them, splitting them.

Every check here fails with a `DataError` that names the table, the file or folder and the
column, before any row is trusted (docs/data.md, "Bad input"). Readers work on `ReadUnit`s (one
Parquet row group of one day), the grain at which the W ranks split a day range between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from derl.datapipes import schema as S
from derl.datapipes.batch import feature_vocab


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


def _values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column's values, those of a list column flattened."""
    t = column.type
    return pc.list_flatten(column) if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) else column


def read_checked(path: Path, spec: S.TableSpec, row_group: Optional[int] = None,
                 columns: Optional[Sequence[str]] = None, day: Optional[str] = None) -> pa.Table:
    """Read a file (or one row group of it), checking its schema and every value read: no null
    outside `spec.nullable`, every code in its range (`spec.codes`), and with `day` (the file's
    partition), every `ts` within that day, UTC."""
    f = _parquet(path)
    check_schema(path, f.schema_arrow, spec)
    columns = list(columns or spec.schema.names)
    try:
        table = f.read(columns) if row_group is None else f.read_row_group(row_group, columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: corrupt Parquet data ({e})") from e

    def refuse(column: str, count: int, what: str) -> DataError:
        return DataError(f"{path}: column {column!r} has {count} {what} (table {spec.name})")

    for name in columns:
        col = table.column(name)
        values = _values(col)
        nulls = col.null_count + (values.null_count if values is not col else 0)
        if nulls and name not in spec.nullable:
            raise refuse(name, nulls, "nulls")
        if name in spec.codes:
            size = spec.codes[name]
            lo, hi = pc.min_max(values).as_py().values()
            if lo is not None and (lo < 0 or (size is not None and hi >= size)):
                outside = pc.less(values, 0)
                if size is not None:
                    outside = pc.or_(outside, pc.greater_equal(values, size))
                raise refuse(name, pc.sum(outside).as_py(),
                             "negative values" if size is None else f"values outside 0..{size - 1}")
    if day is not None and "ts" in columns:
        start = S.day_start_ts(S.parse_day(day))
        ts = table.column("ts")
        outside = pc.or_(pc.less(ts, start), pc.greater_equal(ts, start + S.SECONDS_PER_DAY))
        if pc.any(outside).as_py():
            raise refuse("ts", pc.sum(outside).as_py(), f"rows outside their partition's day {day} (UTC)")
    return table


def _visible(folder: Path) -> List[Path]:
    """A folder's entries less hidden ones (`.x`, and `_x` such as a writer's `_SUCCESS`: ignored
    as Hive and Arrow ignore them)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith((".", "_")))


def _day_of(partition: Path) -> Optional[str]:
    """The day a partition folder is named for; None unless it is named exactly ds=YYYY-MM-DD."""
    day = partition.name[3:]
    try:
        S.parse_day(day)
    except ValueError:
        return None
    return day if partition.is_dir() and partition.name.startswith("ds=") else None


def _without_events(path: Path) -> bool:
    """Whether a file marks its day as one without events (`schema.DAY_WITHOUT_EVENTS`)."""
    metadata = _parquet(path).schema_arrow.metadata or {}
    return all(metadata.get(k) == v for k, v in S.DAY_WITHOUT_EVENTS.items())


def _parquet_files(folder: Path, spec: S.TableSpec) -> List[Path]:
    """The Parquet files of an unpartitioned table or of one day partition: anything else in the
    folder, no file, or no row is an error naming it. A table that `may_be_empty` may have a
    day without rows; so may any day table, on a day whose files all mark it as one without
    events (written so on purpose: the data's day had none). An unmarked empty day is refused:
    from the files alone it cannot be told from a lost or half-written one."""
    files = _visible(folder)
    for p in files:
        if not (p.is_file() and p.suffix == ".parquet"):
            raise DataError(f"{p}: not a Parquet file, in table {spec.name}")
    if not files:
        raise DataError(f"{folder}: no Parquet files (table {spec.name})")
    if spec.may_be_empty or sum(_parquet(p).metadata.num_rows for p in files):
        return files
    if not spec.partitioned_by_day:
        raise DataError(f"{folder}: no rows (table {spec.name}): an empty table is refused, not skipped")
    if not all(map(_without_events, files)):
        raise DataError(f"{folder}: no rows (table {spec.name}): an empty day is refused, not skipped, "
                        f"unless its files mark it a day without events (docs/importing.md, \"Days without events\")")
    return files


class SourceTables:
    """A source folder (docs/data.md): `users/`, `pins/`, and day partitions `ds=YYYY-MM-DD`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: source folder does not exist")
        self._checked: Dict[str, Dict[str, List[Path]]] = {}  # table -> its checked partitions

    def has(self, table: str) -> bool:
        """Whether the source holds `table` at all: an imported world without ad impressions has
        no `ad_events` (docs/importing.md); every other absence is an error where it is read."""
        return (self.root / table).is_dir()

    def has_positive(self, table: str, column: str) -> bool:
        """Whether any row of `table` has `column` > 0 (from Parquet statistics where written)."""
        return self.has(table) and (self.column_range(table, column)[1] or 0) > 0

    def _folder(self, table: str) -> Path:
        folder = self.root / table
        if not folder.is_dir():
            raise DataError(f"{folder}: table {table!r} is missing from the source folder")
        return folder

    def _partitions(self, table: str) -> Dict[str, List[Path]]:
        """Day -> Parquet files of a partitioned table. Days are dates: a partition named other
        than `ds=YYYY-MM-DD`, or a day missing between the first and the last (a gap would shift
        the time split), is an error naming the table and the folder or day. A day without
        events is a partition marked so (`_parquet_files`), a fact the writer recorded, and
        counts as a day; a missing partition is a broken source. Listed and checked once per
        table: every stage asks for the days several times."""
        if table in self._checked:
            return self._checked[table]
        spec = S.TABLES[table]
        folder = self._folder(table)
        parts = {}
        for p in _visible(folder):
            day = _day_of(p)
            if day is None:
                raise DataError(f"{p}: not a day partition named ds=YYYY-MM-DD (table {table})")
            parts[day] = _parquet_files(p, spec)
        if not parts:
            raise DataError(f"{folder}: no day partitions (table {table})")
        have = sorted(parts)  # canonical names sort as dates
        gaps = S.gaps(have)
        if gaps:
            raise DataError(f"{folder}: no partition for {S.day_runs(gaps)}, between the table's first "
                            f"day {have[0]} and its last {have[-1]} (table {table})")
        self._checked[table] = parts
        return parts

    def files(self, table: str, days: DayRange = (None, None)) -> List[Tuple[Optional[str], Path]]:
        """(day, file) pairs of a table, in day order, restricted to `days` (inclusive; None: the
        table's first or last day). Every day of the range must have its partition."""
        spec = S.TABLES[table]
        if not spec.partitioned_by_day:
            return [(None, p) for p in _parquet_files(self._folder(table), spec)]
        parts = self._partitions(table)
        have = sorted(parts)
        first, last = days
        wanted = S.day_range(first or have[0], last or have[-1])
        missing = [d for d in wanted if d not in parts]
        if missing or not wanted:
            raise DataError(
                f"{self.root / table}: no partitions for {S.day_runs(missing) or 'any day'} of day range "
                f"[{first or 'start'}, {last or 'end'}] (available: {have[0]}..{have[-1]})"
            )
        return [(d, p) for d in wanted for p in parts[d]]

    def days(self, table: str) -> List[str]:
        """The days of a partitioned table, in date order: consecutive, each holding rows or
        marked as a day without events."""
        return sorted(self._partitions(table))

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
        return pa.concat_tables([read_checked(p, spec, columns=columns, day=d)
                                 for d, p in self.files(table, days)])

    def column_range(self, table: str, column: str) -> Tuple[Optional[int], Optional[int]]:
        """(min, max) of a column from Parquet statistics, reading the column only from row groups
        written without them (a vocabulary sized from missing statistics would be too small)."""
        spec = S.TABLES[table]
        lo, hi = None, None
        for day, path in self.files(table):
            f = _parquet(path)
            check_schema(path, f.schema_arrow, spec)
            meta = f.metadata
            leaf = [meta.schema.column(i).path for i in range(meta.num_columns)].index(column)
            for rg in range(meta.num_row_groups):
                st = meta.row_group(rg).column(leaf).statistics
                if st is not None and st.has_min_max:
                    rg_lo, rg_hi = st.min, st.max
                else:  # no statistics, or only nulls
                    rg_lo, rg_hi = pc.min_max(read_checked(path, spec, rg, [column], day)
                                              .column(column)).as_py().values()
                if rg_lo is not None:
                    lo = rg_lo if lo is None else min(lo, rg_lo)
                    hi = rg_hi if hi is None else max(hi, rg_hi)
        return lo, hi

    def num_rows(self, table: str) -> int:
        return sum(_parquet(p).metadata.num_rows for _, p in self.files(table))

    def vocab(self) -> Dict[str, int]:
        """num_embeddings per sparse feature: id tables sized from the data, enums fixed."""
        def size(table: str, column: str) -> int:
            return int((self.column_range(table, column)[1] or 0) + 1)

        users = ("user_id", "country", "age_bucket", "gender")
        pins = ("pin_id", "category", "advertiser_id", "campaign_id")
        return feature_vocab({**{c: size("users", c) for c in users}, **{c: size("pins", c) for c in pins}})

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
    """Rank `rank`'s units: disjoint shares that cover every unit once, balanced by rows.

    Units are dealt largest first, each to the rank with the fewest rows so far (ties: fewer
    units, then the lower rank), so that no rank holds only small row groups: every rank takes
    the same number of steps, and a share much smaller than the others would leave most of the
    data unread (or, wrapping into its next epoch, read twice). The deal depends on the units
    alone, so every rank computes the same one; a share keeps the units' order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if len(units) < world_size:
        raise DataError(
            f"{len(units)} row groups cannot be split between {world_size} ranks; "
            "write smaller row groups or use fewer ranks"
        )
    rows, count = [0] * world_size, [0] * world_size
    mine = []
    for i in sorted(range(len(units)), key=lambda i: -units[i].num_rows):  # stable: ties in order
        r = min(range(world_size), key=lambda k: (rows[k], count[k], k))
        rows[r] += units[i].num_rows
        count[r] += 1
        if r == rank:
            mine.append(i)
    return [units[i] for i in sorted(mine)]


def unique_order(ids: np.ndarray, column: str, files: Sequence[Path],
                 file_of: Optional[np.ndarray] = None) -> np.ndarray:
    """The stable argsort of `ids`, refusing an id that occurs twice: a DataError naming the
    column, how many rows repeat an earlier row's id, and the file(s) of the first repeat
    (`file_of`: each row's index into `files`; None: every row is from `files[0]`)."""
    order = np.argsort(ids, kind="stable")
    in_order = ids[order]
    repeat = np.flatnonzero(in_order[1:] == in_order[:-1])
    if len(repeat):
        pair = order[[repeat[0], repeat[0] + 1]]
        owners = [0] if file_of is None else sorted(set(file_of[pair].tolist()))
        raise DataError(f"{', '.join(str(files[k]) for k in owners)}: column {column!r} repeats an "
                        f"earlier row's id in {len(repeat)} rows (e.g. {ids[pair[0]]})")
    return order


class IdIndex:
    """Vectorised id -> row position over an id column (any int64 ids, not only 0..N-1)."""

    def __init__(self, ids: np.ndarray, path: Path, column: str):
        self.order = unique_order(ids, column, [path])
        self.sorted = ids[self.order]
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
