"""Bad source tables: each case is refused with a `DataError` naming table, file and column, or
repaired and counted in the reader's stats (docs/data.md, "Bad input"; docs/_cases_sources.md
lists every case). Each test damages a private copy of the tiny world."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derl.datapipes import schema as S
from derl.datapipes.readers import ExampleReader
from derl.datapipes.sources import DataError, SourceTables
from derl.datapipes.splits import default_split
from helpers import SMALL_READER, damage, first_file, read_all, rewrite


def _refused(root, match, table="ad_events", **kw):
    """Reading `table` (for a table other than the event ones, the engagements, whose reader
    reads every other table too) fails with a DataError matching `match`."""
    with pytest.raises(DataError, match=match):
        read_all(root, table if table in ("engagements", "ad_events") else "engagements", **kw)


def _partition(root, table, day):
    return root / table / f"ds={day}"


def _file(root, table, day="2026-01-03"):
    """The first file of a table (of `day`, where it is partitioned)."""
    if S.TABLES[table].partitioned_by_day:
        return first_file(root, table, day)
    return root / table / "part-0.parquet"


# -- the folder and its tables ----------------------------------------------------------------

def test_a_missing_source_folder_or_table_is_named(world_copy):
    with pytest.raises(DataError, match=rf"{world_copy / 'nowhere'}: source folder does not exist"):
        ExampleReader(world_copy / "nowhere", "ad_events")
    shutil.rmtree(world_copy / "pins")
    _refused(world_copy, rf"{world_copy / 'pins'}: table 'pins' is missing from the source folder")


@pytest.mark.parametrize("table,column", [("users", "user_id"), ("pins", "pin_id"), ("user_sequences", "user_id")])
def test_an_entity_id_twice_in_its_table_is_refused_naming_file_and_column(world_copy, table, column):
    path = _file(world_copy, table)
    damage(path, column, [4], pq.read_table(path).column(column)[1].as_py())
    where = path.parent if table in ("users", "pins") else path  # entity tables are read whole
    _refused(world_copy, rf"{where}: column '{column}' repeats an earlier row's id in 1 rows", table)


def test_sequence_lists_of_unequal_lengths_are_refused(world_copy):
    path = _file(world_copy, "user_sequences")

    def drop_the_first_action(t):
        col = t.column("seq_action").combine_chunks()
        offsets = col.offsets.to_numpy()
        assert offsets[1] > 0  # the first user has history
        shorter = pa.ListArray.from_arrays(pa.array(offsets - (np.arange(len(offsets)) > 0)),
                                           pa.array(col.values.to_numpy()[1:]))
        return t.set_column(t.schema.get_field_index("seq_action"), "seq_action", shorter)

    rewrite(path, drop_the_first_action)
    _refused(world_copy, rf"{path}: column 'seq_action' has list lengths unlike 'seq_pin_id'", "user_sequences")


# -- 1. days are dates ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ds=2026-1-5", "ds=20260105", "ds=2026-01-05T00"])
def test_a_partition_named_other_than_ds_yyyy_mm_dd_is_refused_by_table_and_folder(world_copy, name):
    _partition(world_copy, "engagements", "2026-01-05").rename(world_copy / "engagements" / name)
    with pytest.raises(DataError,
                       match=rf"engagements/{name}: not a day partition named ds=YYYY-MM-DD \(table engagements\)"):
        SourceTables(world_copy).days("engagements")


def test_a_stray_entry_in_a_table_is_refused_and_a_hidden_one_ignored(world_copy):
    (world_copy / "ad_events" / "_SUCCESS").touch()  # writers' markers, ignored as Hive does
    (_partition(world_copy, "ad_events", "2026-01-03") / ".part-0.parquet.crc").touch()
    assert len(SourceTables(world_copy).days("ad_events")) == 8
    stray = world_copy / "ad_events" / "part-9.parquet"
    shutil.copy(first_file(world_copy, "ad_events"), stray)
    _refused(world_copy, rf"{stray}: not a day partition")
    stray.unlink()
    stray = _partition(world_copy, "ad_events", "2026-01-03") / "part-1.parquet.tmp"
    stray.touch()
    _refused(world_copy, rf"{stray}: not a Parquet file, in table ad_events")
    stray.unlink()
    (world_copy / "users" / "ds=2026-01-01").mkdir()
    _refused(world_copy, r"users/ds=2026-01-01: not a Parquet file, in table users")


def test_days_are_ordered_as_dates_and_day_arguments_must_be_canonical(tiny_world):
    days = SourceTables(tiny_world).days("engagements")
    assert days == sorted(days) == S.day_range("2026-01-01", "2026-01-08")
    assert default_split(days[::-1]) == default_split(days)
    for spelling in ("2026-1-3", "20260103"):
        with pytest.raises(ValueError, match=f"day '{spelling}' is not of the form YYYY-MM-DD"):
            ExampleReader(tiny_world, "ad_events", (spelling, "2026-01-04"))
        with pytest.raises(ValueError, match=f"day '{spelling}' is not of the form YYYY-MM-DD"):
            default_split(days[:2] + [spelling] + days[3:])


# -- 2. missing and empty days ----------------------------------------------------------------

def test_a_gap_in_a_tables_days_is_refused_naming_table_and_day(world_copy):
    for day in ("2026-01-04", "2026-01-05"):
        shutil.rmtree(_partition(world_copy, "ad_events", day))
    gap = (r"ad_events: no partition for 2026-01-04..2026-01-05, between the table's first day 2026-01-01 "
           r"and its last 2026-01-08")
    with pytest.raises(DataError, match=gap):
        SourceTables(world_copy).days("ad_events")  # what default_split and the stages see
    _refused(world_copy, gap, days=("2026-01-07", "2026-01-08"))  # even away from the gap


def test_default_split_refuses_days_that_are_not_consecutive():
    days = S.day_range("2026-01-01", "2026-01-10")
    with pytest.raises(ValueError, match=("needs consecutive days: 2026-01-03, 2026-01-07 missing "
                                          "between 2026-01-01 and 2026-01-10")):
        default_split([d for d in days if d not in ("2026-01-03", "2026-01-07")])


def test_a_day_range_must_have_every_one_of_its_days(world_copy):
    shutil.rmtree(_partition(world_copy, "ad_events", "2026-01-08"))  # the end: not a gap
    _refused(world_copy, (r"ad_events: no partitions for 2026-01-08 of day range \[2026-01-07, 2026-01-08\] "
                          r"\(available: 2026-01-01..2026-01-07\)"),
             days=("2026-01-07", "2026-01-08"))
    _refused(world_copy, r"ad_events: no partitions for 2025-12-31 of day range \[2025-12-31, end\]",
             days=("2025-12-31", None))


def test_an_empty_partition_is_refused_naming_table_and_day(world_copy):
    part = _partition(world_copy, "engagements", "2026-01-03")
    for f in part.glob("*.parquet"):
        f.unlink()
    _refused(world_copy, rf"{part}: no Parquet files \(table engagements\)", "engagements")
    path = first_file(world_copy, "ad_events", "2026-01-06")
    rewrite(path, lambda t: t.slice(0, 0))
    _refused(world_copy, rf"{path.parent}: no rows \(table ad_events\): an empty day is refused")


def test_an_event_day_without_its_sequences_is_refused(world_copy):
    shutil.rmtree(_partition(world_copy, "user_sequences", "2026-01-08"))  # the end: not a gap
    _refused(world_copy, r"user_sequences: no partitions for 2026-01-08 of day range \[2026-01-08, 2026-01-08\]",
             days=("2026-01-08", "2026-01-08"))


def test_a_sequence_day_without_rows_is_a_day_without_history(tiny_world):
    """The first day's user_sequences has no row (nobody has history yet): allowed, and every
    example of that day is counted as having none."""
    assert pq.read_metadata(first_file(tiny_world, "user_sequences", "2026-01-01")).num_rows == 0
    r = read_all(tiny_world, "engagements", days=("2026-01-01", "2026-01-01"))
    assert r.stats.no_history == r.stats.rows_emitted == r.num_rows > 0


def test_an_empty_entity_table_is_refused(world_copy):
    path = world_copy / "users" / "part-0.parquet"
    rewrite(path, lambda t: t.slice(0, 0))
    _refused(world_copy, rf"{path.parent}: no rows \(table users\): an empty table is refused")


# -- 3. duplicate impressions -----------------------------------------------------------------

def test_a_request_id_twice_in_one_file_is_refused_naming_file_and_column(world_copy):
    path = first_file(world_copy, "ad_events", "2026-01-03")
    twice = pq.read_table(path).column("request_id").to_numpy()[2]
    damage(path, "request_id", [5, 9], twice)
    for rank in (0, 1):  # every rank refuses, whichever reads the file
        _refused(world_copy, rf"^{path}: column 'request_id' repeats an earlier row's id in 2 rows \(e.g. {twice}\)",
                 rank=rank, world_size=2)


def test_a_request_id_on_two_days_is_refused_naming_both_files(world_copy):
    first = first_file(world_copy, "ad_events", "2026-01-03")
    second = first_file(world_copy, "ad_events", "2026-01-04")
    again = pq.read_table(first).column("request_id").to_numpy()[0]
    damage(second, "request_id", [7], again)
    _refused(world_copy, rf"{first}, {second}: column 'request_id' repeats an earlier row's id in 1 rows",
             days=("2026-01-03", "2026-01-04"))


# -- 4. timestamps outside their partition's day ----------------------------------------------

@pytest.mark.parametrize("table,offset", [("engagements", -1), ("engagements", S.SECONDS_PER_DAY),
                                          ("ad_events", -3600), ("ad_events", 2 * S.SECONDS_PER_DAY)])
def test_a_timestamp_outside_its_partitions_day_is_refused_with_the_rows_counted(world_copy, table, offset):
    path = first_file(world_copy, table, "2026-01-02")
    damage(path, "ts", [0, 10, 20], S.day_start_ts(S.parse_day("2026-01-02")) + offset)
    msg = rf"{path}: column 'ts' has 3 rows outside their partition's day 2026-01-02 \(UTC\) \(table {table}\)"
    _refused(world_copy, msg, table)
    with pytest.raises(DataError, match=msg):  # the export's path: whole days read at once
        SourceTables(world_copy).read(table, ("2026-01-02", "2026-01-02"), columns=["user_id", "ts"])


def test_the_first_and_last_second_of_the_day_belong_to_it(world_copy):
    path = first_file(world_copy, "engagements", "2026-01-02")
    start = S.day_start_ts(S.parse_day("2026-01-02"))
    damage(path, "ts", [0], start)
    damage(path, "ts", [1], start + S.SECONDS_PER_DAY - 1)
    day = ("2026-01-02", "2026-01-02")
    assert read_all(world_copy, "engagements", days=day).stats.rows_emitted > 0


# -- 5. codes and ids outside their vocabulary ------------------------------------------------

CODES = [  # table, column, value, what the error says
    ("engagements", "action", S.NUM_ACTIONS, "values outside 0..5"),
    ("engagements", "surface", -1, "values outside 0..2"),
    ("ad_events", "surface", S.NUM_SURFACES, "values outside 0..2"),
    ("ad_events", "position", -1, "negative values"),
    ("ad_events", "campaign_id", -3, "negative values"),
    ("users", "country", -1, "negative values"),
    ("users", "age_bucket", -2, "negative values"),
    ("users", "gender", -1, "negative values"),
    ("pins", "category", -5, "negative values"),
    ("pins", "advertiser_id", -1, "negative values"),
    ("user_sequences", "seq_action", 9, "values outside 0..5"),
    ("user_sequences", "seq_pin_id", -4, "negative values"),
]


@pytest.mark.parametrize("table,column,value,what", CODES, ids=[f"{t}.{c}" for t, c, _, _ in CODES])
def test_a_code_outside_its_vocabulary_is_refused_naming_file_and_column(world_copy, table, column, value, what):
    path = _file(world_copy, table)
    if column == "advertiser_id":  # an ad Pin's: organic Pins have none
        rows = np.flatnonzero(pq.read_table(path).column("is_ad").to_numpy())[:2]
    else:
        rows = [1, 2]
    damage(path, column, rows, value)
    _refused(world_copy, rf"{path}: column '{column}' has 2 {what} \(table {table}\)", table)


def test_ids_beyond_their_table_are_hashed_counted_and_never_reach_a_lookup(world_copy):
    path = first_file(world_copy, "ad_events", "2026-01-04")
    damage(path, "user_id", [0, 1, 2], 10**9)
    damage(path, "advertiser_id", [3, 4], 10**6)
    damage(path, "campaign_id", [5], 10**7)
    vocab = SourceTables(world_copy).vocab()
    r = ExampleReader(world_copy, "ad_events", config=SMALL_READER)
    for b in r:
        for key in b.sparse.keys():
            ids = b.sparse[key].values()
            assert not len(ids) or 0 <= ids.min() and ids.max() < vocab[key], key
    assert r.stats.repaired == {"hashed_user_id": 3, "unknown_user": 3,
                                "hashed_advertiser_id": 2, "hashed_campaign_id": 1}


def test_vocabularies_come_from_the_data_even_without_parquet_statistics(world_copy):
    """A table written without statistics, or with an extra nested column ahead of the ids, must
    not size a vocabulary too small (every id past it would be hashed)."""
    want = SourceTables(world_copy).vocab()
    pins = world_copy / "pins" / "part-0.parquet"
    pq.write_table(pq.read_table(pins), pins, row_group_size=4096, write_statistics=False)
    users = world_copy / "users" / "part-0.parquet"
    t = pq.read_table(users)
    extra = pa.StructArray.from_arrays([pa.array(np.zeros(t.num_rows, np.int64))] * 2, ["a", "b"])
    pq.write_table(t.add_column(0, "extra", extra), users, row_group_size=4096)
    assert SourceTables(world_copy).vocab() == want
    assert want["pin_id"] == 6000 and want["user_id"] == 2000


# -- 6. nulls ---------------------------------------------------------------------------------

NULLS = [  # table, column
    ("engagements", "user_id"), ("engagements", "pin_id"), ("engagements", "ts"),
    ("ad_events", "request_id"), ("ad_events", "clicked"), ("ad_events", "advertiser_id"),
    ("users", "user_id"), ("pins", "pin_id"), ("pins", "is_ad"),
    ("user_sequences", "seq_pin_id"),
]


@pytest.mark.parametrize("table,column", NULLS, ids=[f"{t}.{c}" for t, c in NULLS])
def test_a_null_is_refused_naming_file_and_column_with_the_count(world_copy, table, column):
    path = _file(world_copy, table)
    damage(path, column, [0, 3, 4], None)
    _refused(world_copy, rf"{path}: column '{column}' has 3 nulls \(table {table}\)", table)


def test_a_null_content_embedding_is_refused(world_copy):
    path = world_copy / "pins" / "part-0.parquet"

    def null_row(t):
        emb = t.column("content_emb").combine_chunks()
        mask = np.arange(len(emb)) == 5
        return t.set_column(t.schema.get_field_index("content_emb"), "content_emb",
                            pa.FixedSizeListArray.from_arrays(emb.values, S.CONTENT_DIM, mask=pa.array(mask)))

    rewrite(path, null_row)
    _refused(world_copy, rf"{path}: column 'content_emb' has 1 nulls \(table pins\)")


def test_organic_pins_without_an_advertiser_are_not_nulls_to_refuse(tiny_world):
    pins = pq.read_table(tiny_world / "pins")
    assert pins.column("advertiser_id").null_count == (~pins.column("is_ad").to_numpy()).sum() > 0
    SourceTables(tiny_world).read("pins")


# -- the generator's worlds pass every check ---------------------------------------------------

def test_the_generated_world_passes_every_check_with_nothing_to_repair(tiny_world):
    for table in ("engagements", "ad_events"):
        r = read_all(tiny_world, table)
        assert r.stats.repaired == {} and r.stats.rows_dropped == {}, table
        assert r.stats.rows_read == r.stats.rows_emitted == SourceTables(tiny_world).num_rows(table)
