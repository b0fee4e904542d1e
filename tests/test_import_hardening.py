"""`derl import` on inputs an audit tried: a copy of an input, compressed inputs, a
very long line, a quoted field across lines, a time out of range. Each is read as it should be,
or refused in one line naming the file and the line (docs/bad-inputs.md#import-hardening)."""

from __future__ import annotations

import bz2
import gzip
import re
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from derl.datapipes.importers import import_world
from derl.datapipes.sources import DataError
from helpers import derl, taobao_ad_files

# MovieLens u.data rows over three days (1997-09-20..22, UTC), each day with ratings.
RATINGS = [(1, 10, 5, 874_800_000), (1, 11, 3, 874_800_100), (2, 10, 1, 874_886_400),
           (2, 12, 4, 874_886_500), (3, 11, 4, 874_972_800), (3, 10, 2, 874_972_900)]
U_DATA = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS).encode()


def _engagements(world: Path) -> list:
    import pyarrow.dataset as pads

    t = pads.dataset(world / "engagements", format="parquet", partitioning="hive").to_table()
    return sorted(zip(*(t.column(c).to_pylist() for c in ("user_id", "pin_id", "action", "ts"))))


def _zstd(data: bytes, path: Path) -> Path:
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write(data)
    return path


def test_the_same_content_under_two_names_is_refused_naming_both(tmp_path):
    """A byte-identical copy, and a gzip of the same text: either would double the rows."""
    (tmp_path / "u.data").write_bytes(U_DATA)
    shutil.copy(tmp_path / "u.data", tmp_path / "copy.data")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'copy.data'))}: the same content as "
                                        rf"{re.escape(str(tmp_path / 'u.data'))} .*imported twice"):
        import_world("movielens", [tmp_path / "u.data", tmp_path / "copy.data"], tmp_path / "w")
    (tmp_path / "copy.data").write_bytes(gzip.compress(U_DATA))
    with pytest.raises(DataError, match=r"copy.data: the same content as .*u.data"):
        import_world("movielens", [tmp_path / "u.data", tmp_path / "copy.data"], tmp_path / "w")
    assert not (tmp_path / "w").exists()
    (tmp_path / "copy.data").write_bytes(U_DATA.replace(b"874800100", b"874800101"))  # one second apart
    report = import_world("movielens", [tmp_path / "u.data", tmp_path / "copy.data"], tmp_path / "w")
    assert report["rows"]["engagements"] == 2 * len(RATINGS)
    # A copy of a keyed table is named a copy too, not a file of repeated keys.
    taobao_ad_files(tmp_path / "files")
    shutil.copy(tmp_path / "files" / "ad_feature.csv", tmp_path / "files" / "ad_copy.csv")
    with pytest.raises(DataError, match=r"ad_feature.csv: the same content as .*ad_copy.csv"):
        import_world("taobao-ad", [tmp_path / "files"], tmp_path / "ad")


def test_compressed_inputs_are_read_by_their_first_bytes_whatever_their_name(tmp_path):
    (tmp_path / "u.data").write_bytes(U_DATA)
    plain = import_world("movielens", [tmp_path / "u.data"], tmp_path / "plain")
    compressed = {"gzip": tmp_path / "ratings", "zstd": tmp_path / "ratings.gz", "bz2": tmp_path / "r.bz2"}
    compressed["gzip"].write_bytes(gzip.compress(U_DATA[:40]) + gzip.compress(U_DATA[40:]))  # two members
    _zstd(U_DATA, compressed["zstd"])  # a misleading suffix: the first bytes decide
    compressed["bz2"].write_bytes(bz2.compress(U_DATA))
    for name, path in compressed.items():
        report = import_world("movielens", [path], tmp_path / name)
        assert _engagements(tmp_path / name) == _engagements(tmp_path / "plain"), name
        (entry,) = report["inputs"]
        assert entry["compression"] == name and entry["rows"] == len(RATINGS)
        assert entry["bytes"] == path.stat().st_size and entry["text_sha256"] == plain["inputs"][0]["sha256"]
        assert entry["sha256"] != entry["text_sha256"]
    assert plain["inputs"][0]["compression"] is None
    # A header inside a compressed file is recognised: taobao-ad's files by theirs.
    taobao_ad_files(tmp_path / "files")
    log = tmp_path / "files" / "behavior_log.csv"
    log.with_suffix(".gz").write_bytes(gzip.compress(log.read_bytes()))
    log.unlink()
    report = import_world("taobao-ad", [tmp_path / "files"], tmp_path / "ad")
    assert {i["kind"]: i["compression"] for i in report["inputs"]}["behavior_log"] == "gzip"


def test_a_compression_derl_cannot_read_or_a_damaged_stream_is_refused_by_name(tmp_path):
    with zipfile.ZipFile(tmp_path / "u.data", "w") as z:
        z.writestr("u.data", U_DATA)
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'u.data'))}: a zip file; derl reads "
                                        r"plain, gzip, bz2 or zstd text: decompress it first"):
        import_world("movielens", [tmp_path / "u.data"], tmp_path / "w")
    cut = tmp_path / "cut.gz"
    many = U_DATA * 2000
    whole = gzip.compress(many)
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(cut))}: after line \d+: its gzip stream is "
                                        r"damaged or cut short"):
        import_world("movielens", [cut], tmp_path / "w")
    empty = tmp_path / "empty.zst"
    _zstd(b"", empty)
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: empty file \(its zstd stream is empty\)"):
        import_world("movielens", [empty], tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_long_valid_line_imports_and_an_unreadable_line_is_named(tmp_path):
    """A user with 460,000 items on one 3.7 MB line, longer than pyarrow's 1 MB sub-blocks."""
    items = range(1_000_000, 1_460_000)
    long_line = "7 " + " ".join(map(str, items))
    assert len(long_line) > 3_600_000
    path = tmp_path / "seq.txt"
    path.write_text("1 5 6 7 8 9\n2 6 7 8 9 10\n" + long_line + "\n3 5 9 8 7 6\n")
    report = import_world("seq-lines", [path], tmp_path / "w")
    assert report["rows"]["engagements"] == 3 * 5 + len(items)
    assert report["inputs"][0]["rows"] == 4
    path.write_bytes(b"1 5 6 7 8 9\n" + long_line.encode() + b"\n2 6 7 \xff\xfe 8\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 3: column 'line': .*invalid UTF8"):
        import_world("seq-lines", [path], tmp_path / "x")


def test_a_quoted_field_across_two_lines_is_refused_naming_its_first_line(tmp_path):
    """Joined silently into one row before (the rating `5` and its line break read as 5); and
    joined into a row of too few columns, or left open at the end of a file."""
    path = tmp_path / "u.data"
    path.write_text('1\t10\t5\t874800000\n1\t11\t"5\n"\t874800100\n2\t10\t1\t874886400\n')
    spans = "a quoted field runs onto the next line"
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 2: {spans}"):
        import_world("movielens", [path], tmp_path / "w")
    log = tmp_path / "UserBehavior.csv"
    log.write_text('1,2,3,pv,1511544070\n1,2,3,"pv\n",1511544071\n1,2,3,pv,1511544072\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(log))}: line 2: {spans}"):
        import_world("taobao-behavior", [log], tmp_path / "w")
    log.write_text('1,2,3,pv,1511544070\n1,2,3,pv,1511544071\n1,2,3,"pv,1511544072\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(log))}: line 3: "):
        import_world("taobao-behavior", [log], tmp_path / "w")
    # A carriage return alone also ends a row for pyarrow: the line numbers would shift the same way.
    log.write_bytes(b"1,2,3,pv,1511544070\r\n1,2,3,pv,1511544071\r1,2,3,pv,1511544072\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(log))}: lines 1..2: read as 3 rows \(a carriage "
                                        r"return alone ends a row\)"):
        import_world("taobao-behavior", [log], tmp_path / "w")


@pytest.mark.parametrize("fmt, text, column", [
    ("movielens", "1\t10\t5\t874800000\n1\t11\t4\t1e300\n", "timestamp"),
    ("movielens", "1\t10\t5\t874800000\n1\t11\t4\t-5\n", "timestamp"),
    ("movielens", "1\t10\t5\t874800000\n1\t11\t4\tinf\n", "timestamp"),
    ("taobao-behavior", "1,2,3,pv,1511544070\n1,2,3,pv,100000000000000000\n", "timestamp"),
], ids=["1e300", "negative", "inf", "year-3e9"])
def test_a_time_out_of_range_is_refused_naming_file_line_and_column(tmp_path, fmt, text, column):
    path = tmp_path / "input"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 2: column '{column}': .* is not a "
                                        r"time derl can hold \(Unix seconds from 0"):
        import_world(fmt, [path], tmp_path / "w")


@pytest.mark.slow
def test_derl_import_of_a_time_of_1e300_ends_in_one_line_and_exit_2(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t874800000\n1\t11\t4\t1e300\n")
    proc = derl("import", "movielens", "--input", str(tmp_path / "u.data"), "--out", str(tmp_path / "w"),
                check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error" in x.lower()]  # progress bars aside
    assert line.startswith(f"derl import: error: {tmp_path / 'u.data'}: line 2: column 'timestamp': "
                           f"1e+300 is not a time")
