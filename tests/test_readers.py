"""The example reader: exact round trips, disjoint rank shares, bounded shuffling, counted repairs."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from derl.datapipes import schema as S
from derl.datapipes.readers import ExampleReader, ReaderConfig
from derl.datapipes.sources import DataError
from helpers import SMALL_READER, first_file, read_all, rewrite


def _source(root, name):
    return pads.dataset(root / name, format="parquet", partitioning="hive").to_table()


def _single(batch, key):
    """Per-row value of a one-id-per-row sparse feature."""
    jt = batch.sparse[key]
    assert (jt.lengths() == 1).all()
    return jt.values().numpy()


def _ad_rows(reader):
    out = {k: [] for k in ("request_id", "user_id", "pin_id", "campaign_id", "clicked", "converted")}
    for b in reader:
        out["request_id"].append(b.meta["request_id"].numpy())
        out["user_id"].append(_single(b, "user_id"))
        out["pin_id"].append(_single(b, "pin_id"))
        out["campaign_id"].append(_single(b, "campaign_id"))
        out["clicked"].append(b.labels["clicked"].numpy())
        out["converted"].append(b.labels["converted"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_ad_batches_round_trip_ids_and_labels_exactly(tiny_world):
    rows = _ad_rows(ExampleReader(tiny_world, "ad_events", config=SMALL_READER))
    src = _source(tiny_world, "ad_events").sort_by("request_id")
    order = np.argsort(rows["request_id"])
    np.testing.assert_array_equal(rows["request_id"][order], src.column("request_id").to_numpy())
    for c in ("user_id", "pin_id", "campaign_id", "clicked", "converted"):
        np.testing.assert_array_equal(rows[c][order], src.column(c).to_numpy(), err_msg=c)


def test_engagement_labels_and_sequences_follow_the_source(tiny_world):
    reader = ExampleReader(tiny_world, "engagements", config=SMALL_READER)
    got = []
    seqs = _source(tiny_world, "user_sequences").to_pandas().set_index(["ds", "user_id"])
    checked = 0
    for b in reader:
        ts = b.meta["ts"].numpy()
        labels = np.stack([b.labels[k].numpy() for k in ("closeup", "click", "save", "long_click", "hide")], 1)
        got.append(np.column_stack([_single(b, "user_id"), _single(b, "pin_id"), ts, labels]))
        seq = b.sparse["seq_pin_id"]
        for i in range(0, b.size, 97):  # the joined sequence is the user's, of the row's own day
            ds = str(np.datetime64(int(ts[i]), "s").astype("datetime64[D]"))
            key = (ds, int(b.meta["user_id"][i]))
            want = list(seqs.loc[key].seq_pin_id) if key in seqs.index else []
            lo, hi = int(seq.offsets()[i]), int(seq.offsets()[i + 1])
            assert seq.values()[lo:hi].tolist() == want
            checked += 1
    assert checked > 100
    got = np.concatenate(got)
    src = _source(tiny_world, "engagements")
    a = src.column("action").to_numpy()
    A = S.Action
    want_labels = np.stack(
        [np.isin(a, [A.CLOSEUP, A.CLICK, A.SAVE, A.LONG_CLICK]), np.isin(a, [A.CLICK, A.LONG_CLICK]),
         a == A.SAVE, a == A.LONG_CLICK, a == A.HIDE], 1)
    want = np.column_stack([src.column("user_id").to_numpy(), src.column("pin_id").to_numpy(),
                            src.column("ts").to_numpy(), want_labels])
    sort = lambda m: m[np.lexsort(m.T[::-1])]
    np.testing.assert_array_equal(sort(got), sort(want.astype(got.dtype)))
    assert reader.stats.rows_read == reader.stats.rows_emitted == src.num_rows


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_cover_every_row_exactly_once(tiny_world, world_size):
    shares = [
        _ad_rows(ExampleReader(tiny_world, "ad_events", rank=r, world_size=world_size,
                               config=SMALL_READER))["request_id"]
        for r in range(world_size)
    ]
    assert all(len(s) for s in shares)
    every = np.concatenate(shares)
    assert len(np.unique(every)) == len(every)  # no overlap
    assert set(every) == set(_source(tiny_world, "ad_events").column("request_id").to_numpy())


def test_shuffling_is_bounded_seeded_and_changes_per_epoch(tiny_world):
    days = ("2026-01-02", "2026-01-03")
    ids = lambda r, epoch=0: np.concatenate([b.meta["request_id"].numpy() for b in r.batches(epoch)])
    a = ExampleReader(tiny_world, "ad_events", days, config=SMALL_READER)
    b = ExampleReader(tiny_world, "ad_events", days, config=SMALL_READER)
    unshuffled = ExampleReader(tiny_world, "ad_events", days, config=ReaderConfig(batch_size=512, shuffle_buffer=0))
    first = ids(a)
    np.testing.assert_array_equal(first, ids(b))  # same seed, same order
    assert not np.array_equal(first, ids(a, epoch=1))
    assert not np.array_equal(first, np.sort(first))
    assert sorted(first) == sorted(ids(unshuffled))
    # Bounded: day 2's rows all come out before day 3's, since units are read in day order and
    # the buffer is smaller than a day.
    day_of = lambda x: x >= (_source(tiny_world, "ad_events").filter(pads.field("ds") == "2026-01-03")
                             .column("request_id").to_numpy().min())
    flags = day_of(first)
    assert flags[: len(flags) // 3].mean() < 0.05 and flags[-len(flags) // 3 :].mean() > 0.8


def test_skip_resumes_mid_epoch(tiny_world):
    r = ExampleReader(tiny_world, "ad_events", config=SMALL_READER)
    full = [b.meta["request_id"].numpy() for b in r.batches(epoch=0)]
    rest = [b.meta["request_id"].numpy() for b in r.batches(epoch=0, skip=5)]
    assert len(rest) == len(full) - 5
    np.testing.assert_array_equal(np.concatenate(full[5:]), np.concatenate(rest))


def test_day_range_is_respected(tiny_world):
    r = ExampleReader(tiny_world, "ad_events", ("2026-01-03", "2026-01-04"), config=SMALL_READER)
    ts = np.concatenate([b.meta["ts"].numpy() for b in r])
    days = set(np.unique(ts.astype("datetime64[s]").astype("datetime64[D]")).astype(str))
    assert days == {"2026-01-03", "2026-01-04"}


def test_drop_last_is_counted(tiny_world):
    r = ExampleReader(tiny_world, "ad_events", config=ReaderConfig(batch_size=1000, drop_last=True))
    n = sum(b.size for b in r)
    assert n % 1000 == 0
    assert r.stats.rows_dropped["drop_last"] == r.num_rows - n > 0


# -- bad input ------------------------------------------------------------------------------

def test_missing_column_names_file_and_column(world_copy):
    path = first_file(world_copy, "ad_events")
    rewrite(path, lambda t: t.drop(["clicked"]))
    with pytest.raises(DataError, match=rf"{path}.*missing column 'clicked'"):
        read_all(world_copy)


def test_wrong_type_names_file_and_column(world_copy):
    path = first_file(world_copy, "engagements")
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("ts"), "ts",
                                         t.column("ts").cast(pa.float64())))
    with pytest.raises(DataError, match=rf"{path}.*'ts' has type double, expected int64"):
        read_all(world_copy, "engagements")


def test_corrupt_parquet_is_named(world_copy):
    path = first_file(world_copy, "ad_events")
    path.write_bytes(path.read_bytes()[: 200])
    with pytest.raises(DataError, match=rf"{path}: not a readable Parquet file"):
        read_all(world_copy)


def test_negative_id_is_an_error(world_copy):
    path = first_file(world_copy, "ad_events")
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("pin_id"), "pin_id",
                                          pa.array(np.where(np.arange(t.num_rows) == 3, -7,
                                                            t.column("pin_id").to_numpy()))))
    with pytest.raises(DataError, match=rf"{path}: column 'pin_id' has 1 negative values \(table ad_events\)"):
        read_all(world_copy)


def test_nan_content_embedding_is_replaced_and_counted(world_copy):
    path = world_copy / "pins" / "part-0.parquet"

    def poison(t):
        emb = t.column("content_emb").combine_chunks()
        flat = emb.values.to_numpy().copy()
        flat[[0, 1, S.CONTENT_DIM * 5]] = np.nan  # rows 0 and 5
        return t.set_column(t.schema.get_field_index("content_emb"), "content_emb",
                            pa.FixedSizeListArray.from_arrays(pa.array(flat), S.CONTENT_DIM))

    rewrite(path, poison)
    r = read_all(world_copy)
    assert r.stats.repaired["content_emb_nan"] == 2
    assert np.isfinite(r.joiner.entities.content).all()


def test_empty_day_range_names_the_table_and_what_exists(tiny_world):
    with pytest.raises(DataError, match=(r"ad_events: no partitions for 2027-01-01..2027-01-31 of day range "
                                         r"\[2027-01-01, 2027-01-31\] \(available: 2026-01-01..2026-01-08\)")):
        ExampleReader(tiny_world, "ad_events", ("2027-01-01", "2027-01-31"))


def test_labels_outside_0_1_are_an_error(world_copy):
    path = first_file(world_copy, "ad_events")
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("clicked"), "clicked",
                                          pa.array(np.full(t.num_rows, 2, np.int8))))
    with pytest.raises(DataError, match=rf"{path}: column 'clicked' has \d+ labels outside"):
        read_all(world_copy)


def test_conversion_without_click_is_repaired_and_counted(world_copy):
    path = first_file(world_copy, "ad_events")
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("converted"), "converted",
                                          pa.array(np.where(np.arange(t.num_rows) < 10, 1,
                                                            t.column("converted").to_numpy()).astype(np.int8))))
    clicked_among_first = pq.read_table(path).column("clicked").to_numpy()[:10].sum()
    r = read_all(world_copy)
    assert r.stats.repaired["converted_without_click"] == 10 - clicked_among_first


def test_unknown_and_out_of_vocabulary_ids_are_kept_and_counted(world_copy):
    path = first_file(world_copy, "ad_events")
    n = pq.read_metadata(path).num_rows
    rewrite(path, lambda t: t.set_column(t.schema.get_field_index("pin_id"), "pin_id",
                                          pa.array(np.where(np.arange(t.num_rows) < 4, 10**9,
                                                            t.column("pin_id").to_numpy()))))
    r = read_all(world_copy)
    assert r.stats.repaired["unknown_pin"] == 4
    assert r.stats.repaired["hashed_pin_id"] == 4
    assert r.stats.rows_emitted == r.stats.rows_read and n > 4


def test_leaking_sequence_is_refused(world_copy):
    path = first_file(world_copy, "user_sequences", "2026-01-03")

    def leak(t):
        ts = t.column("seq_ts").combine_chunks()
        vals = ts.values.to_numpy().copy()
        vals[0] = S.day_start_ts(S.parse_day("2026-01-03")) + 60
        return t.set_column(t.schema.get_field_index("seq_ts"), "seq_ts",
                            pa.ListArray.from_arrays(ts.offsets, pa.array(vals)))

    rewrite(path, leak)
    with pytest.raises(DataError, match=rf"{path}: column 'seq_ts' holds engagements at or after"):
        read_all(world_copy, "engagements")


def test_corrupt_data_in_the_prefetch_thread_reaches_the_caller(world_copy):
    path = first_file(world_copy, "ad_events", "2026-01-05")
    chunk = pq.read_metadata(path).row_group(0).column(S.AD_EVENTS.schema.get_field_index("ts"))
    at = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[at : at + 20] = b"\xff" * 20  # the page header of a column only batches read
    path.write_bytes(bytes(data))
    # The footer is intact: no error yet.
    r = ExampleReader(world_copy, "ad_events", config=SMALL_READER)
    with pytest.raises(DataError, match=rf"{path}: corrupt Parquet data"):
        for _ in r:
            pass


def test_every_batch_has_one_key_layout_and_the_pin_sampling_probability(tiny_world):
    organic = next(iter(ExampleReader(tiny_world, "engagements", config=SMALL_READER)))
    ads = next(iter(ExampleReader(tiny_world, "ad_events", config=SMALL_READER)))
    assert organic.sparse.keys() == ads.sparse.keys()
    assert (organic.sparse["position"].lengths() == 0).all()
    assert (ads.sparse["position"].lengths() == 1).all()
    # q: the share of the table's rows that show each Pin, over the whole day range.
    counts = np.bincount(_source(tiny_world, "engagements").column("pin_id").to_numpy())
    pins = organic.meta["pin_id"].numpy()
    np.testing.assert_allclose(organic.dense["pin_sampling_prob"].numpy(), counts[pins] / counts.sum(), rtol=1e-6)


def test_sequence_events_carry_their_pins_attributes(tiny_world):
    """Each sequence event's category and (for ads only) advertiser are its Pin's, aligned with
    seq_pin_id: the Pin tower embeds events from them exactly as it embeds candidates."""
    day = sorted(p.name[3:] for p in (tiny_world / "ad_events").iterdir())[4]  # users have histories
    batch = next(iter(ExampleReader(tiny_world, "ad_events", (day, day), config=SMALL_READER)))
    pins = _source(tiny_world, "pins")
    order = np.argsort(pins.column("pin_id").to_numpy())
    category = pins.column("category").to_numpy()[order]
    advertiser = pins.column("advertiser_id").fill_null(-1).to_numpy()[order]
    seq = batch.sparse["seq_pin_id"]
    events = seq.values().numpy()
    assert len(events) > 0
    np.testing.assert_array_equal(batch.sparse["seq_category"].values().numpy(), category[events])
    np.testing.assert_array_equal(batch.sparse["seq_category"].lengths().numpy(), seq.lengths().numpy())
    is_ad = batch.dense["seq_is_ad"].numpy()
    np.testing.assert_array_equal(is_ad, advertiser[events] >= 0)
    assert 0 < is_ad.sum() < len(events)  # the tiny world's histories hold both kinds
    np.testing.assert_array_equal(batch.sparse["seq_advertiser_id"].values().numpy(), advertiser[events][is_ad])
    owner = np.repeat(np.arange(batch.size), seq.lengths().numpy())
    np.testing.assert_array_equal(batch.sparse["seq_advertiser_id"].lengths().numpy(),
                                  np.bincount(owner[is_ad], minlength=batch.size))
    assert len(batch.dense["seq_content"]) == len(events)
