"""Reading an import's input files: block by block, every error naming its file and line.

A file is read once, in blocks of whole lines (`BLOCK_BYTES`), each hashed (sha256) as it is
read and parsed by pyarrow on its own, so memory holds one block whatever the file's size (the
Taobao behaviour log is 20+ GB). pyarrow's streaming CSV reader is not used: it reads ahead of
its consumer without bound (its memory grew with the file here, 650 MB for a 660 MB file).
Blocks parse multi-threaded; a block that fails is parsed again on one thread, which is what
lets pyarrow say on which row a malformed line or value is, and reads a line longer than
pyarrow's own sub-blocks. Empty lines are rows too (of nulls), so a block's rows are
consecutive lines and a row's line number is its block's first line plus its index: a row that
is not one line (a quoted field across a line break) is refused. A compressed file (gzip, bz2,
zstd, told by its first bytes) is read through pyarrow's decompressing stream.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from derl.datapipes import schema as S
from derl.datapipes.sources import DataError

BLOCK_BYTES = 16 << 20
NULLS = ["", "NULL"]  # what reads as a missing value in every column; only some columns repair one
_PARSE = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+): (.*)", re.S)
_CONVERT = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value '(.*)'", re.S)
_ROW = re.compile(r"In CSV column #(\d+): Row #(\d+): (.*)", re.S)
_WHAT = {"int64": "an integer", "double": "a number"}
# Unix seconds an imported time may take: from 1970-01-01 to before 9999-01-01, so that every
# day (China time's too) is a calendar date.
TS_RANGE = (0, S.day_start_ts(dt.date(9999, 1, 1)))
# Compressions by their first bytes, not a file's name: those pyarrow's streams read, and
# those refused by name.
COMPRESSIONS = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2"}
UNREADABLE = {b"PK\x03\x04": "zip", b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf\x27\x1c": "7z",
              b"\x04\x22\x4d\x18": "lz4"}


@dataclass
class InputFile:
    """What the report says of one input: where, how big, its checksum (of the file, as
    `sha256sum` gives it), its data rows; for a compressed file, the compression and the
    checksum of the text inside (by which a copy in another compression is found)."""

    path: str
    kind: str
    bytes: int
    sha256: str
    rows: int
    compression: Optional[str] = None
    text_sha256: Optional[str] = None

    @property
    def text(self) -> str:
        """The checksum of the text: the same for a copy, whatever its name or compression."""
        return self.text_sha256 or self.sha256


def compression(path: Path) -> Optional[str]:
    """A file's compression by its first bytes, None for plain text; one that pyarrow cannot
    read is a DataError naming it."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in UNREADABLE.items():
        if head.startswith(magic):
            raise DataError(f"{path}: a {name} file; derl reads plain, gzip, bz2 or zstd text: "
                            f"decompress it first")
    return next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)


class _Tap(io.RawIOBase):
    """A binary file read through: each byte hashed and counted on the progress bar."""

    def __init__(self, f, sha, bar):
        super().__init__()
        self.f, self.sha, self.bar = f, sha, bar

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


class _Text:
    """An input's text, read in order (`read`): the file's bytes, or what its compression holds.
    `sha` hashes the file, `text_sha` the text (the same hash for a plain file). A damaged or cut
    compressed stream is a DataError naming the last whole line before it."""

    def __init__(self, path: Path, bar=None):
        self.path = path
        self.compression = compression(path)
        self.sha = hashlib.sha256()
        self.text_sha = hashlib.sha256() if self.compression else self.sha
        self.lines = 0  # the lines read so far, for a compressed stream's error
        self.file = open(path, "rb")
        self.raw = _Tap(self.file, self.sha, bar)
        self.stream = pa.CompressedInputStream(pa.PythonFile(self.raw, mode="r"), self.compression) \
            if self.compression else None

    def read(self, n: int) -> bytes:
        if self.stream is None:
            return self.raw.read(n)
        try:
            data = self.stream.read(n)
        except OSError as e:
            raise DataError(f"{self.path}: after line {self.lines}: its {self.compression} stream is "
                            f"damaged or cut short ({e})") from None
        self.text_sha.update(data)
        self.lines += data.count(b"\n")
        return data

    def __enter__(self) -> "_Text":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def first_line(path: Path) -> str:
    """A file's first line (of its text, where it is compressed) without its line ending: what
    formats are recognised by. An empty file is a DataError."""
    with _Text(path) as text:
        head = text.read(1 << 16)
    if not head:
        raise DataError(f"{path}: empty file" + (f" (its {text.compression} stream is empty)"
                                                 if text.compression else ""))
    return head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")


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

    def seconds(self, name: str) -> np.ndarray:
        """A column of Unix seconds (integers, or numbers floored) as int64; an empty value or one
        outside `TS_RANGE` (1e300, a negative time) is an error."""
        self.require(name)
        values = self.column(name).to_numpy()
        low, high = TS_RANGE
        bad = np.flatnonzero(~((values >= low) & (values < high)))  # NaN is outside too
        if len(bad):
            raise self.error(bad[0], f"column {name!r}: {values[bad[0]]} is not a time derl can hold "
                                     f"(Unix seconds from {low}, 1970-01-01, to below {high}, 9999-01-01)")
        return np.floor(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)

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


_SPANS = "a quoted field runs onto the next line (a line break inside quotes, or a quote never closed)"
_ONE_LINE = "each row must be one line"


def _lines(first: int, n: int) -> str:
    return f"line {first}" if n == 1 else f"lines {first}..{first + n - 1}"


def _explain(path: Path, names: Sequence[str], e: pa.ArrowInvalid, line0: int, lines: int) -> DataError:
    """pyarrow's parse or conversion error as a DataError naming the file and the line (pyarrow's
    row number counts from the block's first line, `line0`; the block has `lines` lines). A row
    whose text holds a line break is a quoted field that ran over lines."""
    msg = str(e)
    for pattern in (_PARSE, _CONVERT, _ROW):
        m = pattern.search(msg)
        if m:
            break
    else:
        return DataError(f"{path}: {_lines(line0, lines)}: {msg}")
    if pattern is _PARSE:
        row, want, got, text = m.groups()
        what = f"expected {want} columns, found {got}: {text.strip()!r}"
    elif pattern is _CONVERT:
        col, row, typ, text = m.groups()
        what = f"column {names[int(col)]!r}: {text!r} is not {_WHAT.get(typ, typ)}"
    else:
        col, row, text = m.groups()
        what = f"column {names[int(col)]!r}: {text.strip()}"
    if "\n" in text.strip():
        what = f"{_SPANS}; {_ONE_LINE}"
    return DataError(f"{path}: line {line0 + int(row) - 1}: {what}")


def _not_one_line_each(path: Path, batch: pa.RecordBatch, line0: int, lines: int) -> DataError:
    """A block that parsed into more or fewer rows than it has lines: a value holding a line
    break (a quoted field across lines, which pyarrow joins into one row) is named by its first
    line; anything else by the block's lines."""
    for col in batch.columns if batch is not None else ():
        if pa.types.is_string(col.type):
            spans = pc.fill_null(pc.match_substring_regex(col, "[\r\n]"), False)
            if pc.any(spans).as_py():
                return DataError(f"{path}: line {line0 + pc.index(spans, True).as_py()}: {_SPANS}; "
                                 f"{_ONE_LINE}")
    rows = batch.num_rows if batch is not None else 0
    return DataError(f"{path}: {_lines(line0, lines)}: read as {rows} rows (a carriage return alone ends "
                     f"a row); {_ONE_LINE}, ended by \\n or \\r\\n")


def _line_blocks(text: _Text, block_bytes: int) -> Iterator[Tuple[memoryview, int]]:
    """The text in blocks of whole lines (a line longer than a block makes a longer block), with
    the number of lines in each."""
    rest = b""
    while True:
        data = text.read(block_bytes)
        if not data:
            if rest:
                yield memoryview(rest), 1
            return
        data = rest + data
        cut = data.rfind(b"\n") + 1
        rest = data[cut:]
        if cut:
            yield memoryview(data)[:cut], int(np.count_nonzero(np.frombuffer(data, np.uint8, cut) == 10))


def _read_csv(block: memoryview, names: Sequence[str], types: Dict[str, pa.DataType], skip: int,
              delimiter: str, threads: bool) -> Optional[pa.RecordBatch]:
    """One block parsed: on several threads in pyarrow's sub-blocks (1 MB), or on one thread in
    one sub-block of the whole block, which holds any line and lets pyarrow name a bad row."""
    read = pacsv.ReadOptions(use_threads=threads, column_names=list(names), skip_rows=skip,
                             **({} if threads else {"block_size": len(block) + 1}))
    table = pacsv.read_csv(
        pa.py_buffer(block),
        read_options=read,
        parse_options=pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=NULLS, strings_can_be_null=True,
                                             quoted_strings_can_be_null=True),
    )
    return table.combine_chunks().to_batches()[0] if table.num_rows else None


def _parse(path: Path, block: memoryview, lines: int, names: Sequence[str], types: Dict[str, pa.DataType],
           skip: int, delimiter: str, line0: int) -> Optional[pa.RecordBatch]:
    """A block of `lines` lines from line `line0` as one row per line; a block that fails on
    several threads (a bad line, or a line longer than pyarrow's sub-block: "straddling object")
    is parsed again on one thread, which reads the long line or names the bad one."""
    try:
        batch = _read_csv(block, names, types, skip, delimiter, threads=True)
    except pa.ArrowInvalid:
        try:
            batch = _read_csv(block, names, types, skip, delimiter, threads=False)
        except pa.ArrowInvalid as e:
            raise _explain(path, names, e, line0, lines) from None
    if (batch.num_rows if batch is not None else 0) + skip != lines:
        raise _not_one_line_each(path, batch, line0 + skip, lines - skip)
    return batch


def csv_blocks(path: Path, kind: str, names: Sequence[str], types: Dict[str, pa.DataType],
               header: bool, delimiter: str, record: List[InputFile], progress: bool,
               block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The blocks of a delimited text file (plain or compressed) whose columns are `names` (a
    header line, if any, is skipped: the caller has recognised it); string columns are best
    typed `pa.string()`. Appends the file's `InputFile` to `record` once it is read to its end;
    a file without a data row, or with the text of a file read before, is a DataError."""
    from tqdm import tqdm

    first_line(path)
    size = path.stat().st_size
    # A plain copy of a plain input is refused before its rows are read (a keyed table would call
    # them repeated keys); any other copy once its text is read.
    if compression(path) is None and any(r.bytes == size and r.compression is None for r in record):
        with open(path, "rb") as f:
            _refuse_copy(record, path, hashlib.file_digest(f, "sha256").hexdigest())
    line = 1  # the line the next block starts on
    rows = 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"{kind} {path.name}",
              disable=not progress, leave=False) as bar, _Text(path, bar) as text:
        for data, lines in _line_blocks(text, block_bytes):
            skip = int(header and line == 1)
            batch = _parse(path, data, lines, names, types, skip, delimiter, line)
            line += skip
            if batch is not None:
                yield Block(path, batch, line)
                line += batch.num_rows
                rows += batch.num_rows
    if not rows:
        raise DataError(f"{path}: no data rows" + (" after its header" if header else ""))
    new = InputFile(str(path), kind, size, text.sha.hexdigest(), rows, text.compression,
                    text.text_sha.hexdigest() if text.compression else None)
    _refuse_copy(record, path, new.text)
    record.append(new)


def _refuse_copy(record: List[InputFile], path: Path, text: str) -> None:
    """An input whose text an earlier input has (a copy under another name, or in another
    compression) is a DataError naming both: its rows would count twice."""
    for old in record:
        if old.text == text:
            raise DataError(f"{path}: the same content as {old.path} (sha256 of the text {text[:16]}...): "
                            f"its rows would be imported twice; give one of them")
