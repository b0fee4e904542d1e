"""Reading an import's input files: block by block, every error naming its file and line.

A file is read once, in blocks of whole lines (`BLOCK_BYTES`), each hashed (sha256) as it is
read and parsed by pyarrow on its own, so memory holds one block whatever the file's size (the
Taobao behaviour log is 20+ GB). pyarrow's streaming CSV reader is not used: it reads ahead of
its consumer without bound (its memory grew with the file here, 650 MB for a 660 MB file).
Blocks parse multi-threaded; a block that fails is parsed again on one thread, which is what
lets pyarrow say on which row a malformed line or value is. Empty lines are rows too (of
nulls), so a block's rows are consecutive lines and a row's line number is its block's first
line plus its index.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from derl.datapipes.sources import DataError

BLOCK_BYTES = 16 << 20
NULLS = ["", "NULL"]  # what reads as a missing value in every column; only some columns repair one
_PARSE = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+): (.*)", re.S)
_CONVERT = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value '(.*)'", re.S)
_WHAT = {"int64": "an integer", "double": "a number"}


@dataclass
class InputFile:
    """What the report says of one input: where, how big, its checksum, its data rows."""

    path: str
    kind: str
    bytes: int
    sha256: str
    rows: int


def first_line(path: Path) -> str:
    """A file's first line without its line ending: what formats are recognised by. An empty
    file is a DataError."""
    with open(path, "rb") as f:
        line = f.readline(1 << 16)
    if not line:
        raise DataError(f"{path}: empty file")
    return line.decode("utf-8", errors="replace").rstrip("\r\n")


def is_integer(field: str) -> bool:
    return re.fullmatch(r"\s*\d+\s*", field) is not None


class Block:
    """One parsed block of a file: its columns and the line number of its first row."""

    def __init__(self, path: Path, batch: pa.RecordBatch, first_line: int):
        self.path = path
        self.batch = batch
        self.first_line = first_line

    def __len__(self) -> int:
        return self.batch.num_rows

    def line(self, row: int) -> int:
        return self.first_line + int(row)

    def error(self, row: int, message: str) -> DataError:
        return DataError(f"{self.path}: line {self.line(row)}: {message}")

    def column(self, name: str) -> pa.Array:
        return self.batch.column(name)

    def require(self, name: str) -> None:
        """Refuse an empty value in a column, naming its line (or the line as empty)."""
        col = self.column(name)
        if col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            empty = not any(self.column(c)[row].is_valid for c in self.batch.schema.names)
            raise self.error(row, "an empty line" if empty else f"column {name!r} is empty")

    def ints(self, name: str, fill: Optional[int] = None) -> np.ndarray:
        """A column of non-negative integers as int64; an empty value is an error unless `fill`
        (then the caller counts `nulls(name)` as a repair)."""
        col = self.column(name)
        if fill is None:
            self.require(name)
        values = col.fill_null(fill).to_numpy() if col.null_count else col.to_numpy()
        negative = np.flatnonzero(values < 0)
        if len(negative):
            raise self.error(negative[0], f"column {name!r}: {values[negative[0]]} is negative; "
                                          f"ids and codes are non-negative integers")
        return values.astype(np.int64, copy=False)

    def nulls(self, name: str) -> int:
        return self.column(name).null_count

    def floats(self, name: str) -> np.ndarray:
        """A column of finite numbers as float64; an empty or non-finite value is an error."""
        self.require(name)
        values = self.column(name).to_numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise self.error(bad[0], f"column {name!r}: {values[bad[0]]} is not a finite number")
        return values

    def codes(self, name: str, table: Dict[str, int], what: str, known: Optional[str] = None) -> np.ndarray:
        """A string column mapped through `table` (value -> code); a value outside it is a
        DataError naming the value, the line and the values known (or `known`)."""
        self.require(name)
        col = pc.dictionary_encode(self.column(name))
        words = col.dictionary.to_pylist()
        lookup = np.array([table.get(w, -1) for w in words], dtype=np.int64)
        codes = lookup[col.indices.to_numpy()]
        unknown = np.flatnonzero(codes < 0)
        if len(unknown):
            raise self.error(unknown[0], f"column {name!r}: unknown {what} "
                                         f"{words[col.indices[unknown[0]].as_py()]!r} (known: "
                                         f"{known or ', '.join(sorted(table))})")
        return codes


def _explain(path: Path, names: Sequence[str], e: pa.ArrowInvalid, line0: int) -> DataError:
    """pyarrow's parse or conversion error as a DataError naming the file and the line (pyarrow's
    row number counts from the block's first line, `line0`)."""
    msg = str(e)
    m = _PARSE.search(msg)
    if m:
        row, want, got, text = m.groups()
        return DataError(f"{path}: line {line0 + int(row) - 1}: expected {want} columns, found {got}: "
                         f"{text.strip()!r}")
    m = _CONVERT.search(msg)
    if m:
        col, row, typ, value = m.groups()
        return DataError(f"{path}: line {line0 + int(row) - 1}: column {names[int(col)]!r}: {value!r} "
                         f"is not {_WHAT.get(typ, typ)}")
    return DataError(f"{path}: {msg}")


def _line_blocks(path: Path, block_bytes: int, sha, progress) -> Iterator[memoryview]:
    """The file's bytes in blocks of whole lines (a line longer than a block makes a longer
    block), hashed and counted on the progress bar as read."""
    rest = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            sha.update(data)
            progress.update(len(data))
            if not data:
                if rest:
                    yield memoryview(rest)
                return
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield memoryview(data)[:cut]


def _parse(block: memoryview, names: Sequence[str], types: Dict[str, pa.DataType], skip: int,
           delimiter: str, threads: bool) -> pa.RecordBatch:
    table = pacsv.read_csv(
        pa.py_buffer(block),
        read_options=pacsv.ReadOptions(use_threads=threads, column_names=list(names), skip_rows=skip),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=NULLS, strings_can_be_null=True,
                                             quoted_strings_can_be_null=True),
    )
    return table.combine_chunks().to_batches()[0] if table.num_rows else None


def csv_blocks(path: Path, kind: str, names: Sequence[str], types: Dict[str, pa.DataType],
               header: bool, delimiter: str, record: List[InputFile], progress: bool,
               block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The blocks of a delimited text file whose columns are `names` (a header line, if any, is
    skipped: the caller has recognised it); string columns are best typed `pa.string()`.
    Appends the file's `InputFile` to `record` once it is read to its end; a file without a data
    row is a DataError."""
    from tqdm import tqdm

    first_line(path)
    sha = hashlib.sha256()
    line = 1  # the line the next block starts on
    rows = 0
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"{kind} {path.name}",
              disable=not progress, leave=False) as bar:
        for data in _line_blocks(path, block_bytes, sha, bar):
            skip = int(header and line == 1)
            try:
                batch = _parse(data, names, types, skip, delimiter, threads=True)
            except pa.ArrowInvalid:
                try:  # again on one thread: now pyarrow knows the row at fault
                    _parse(data, names, types, skip, delimiter, threads=False)
                except pa.ArrowInvalid as e:
                    raise _explain(path, names, e, line) from None
                raise
            line += skip
            if batch is not None:
                yield Block(path, batch, line)
                line += batch.num_rows
                rows += batch.num_rows
    if not rows:
        raise DataError(f"{path}: no data rows" + (" after its header" if header else ""))
    record.append(InputFile(str(path), kind, path.stat().st_size, sha.hexdigest(), rows))
