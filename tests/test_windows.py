"""Sequence-major training batches (datapipes/windows.py) and the model's reading of them: a
window's day-start state is the user vector export computes for that day, no row sees an event
of its own day, every engagement of the training days is a next-Pin target once an epoch."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from derl.datapipes import schema as S
from derl.datapipes.sources import SourceTables
from derl.datapipes.windows import WindowConfig, WindowReader
from derl.models.upstream import DERM, UpstreamConfig

SEQ_LEN = 6


def _reader(world, world_size: int = 1, rank: int = 0, batch_size: int = 32, seq_len: int = SEQ_LEN,
            days: slice = slice(1, 4), targets_from: Optional[str] = None):
    sources = SourceTables(world)
    first, last = sources.days("engagements")[days][0], sources.days("engagements")[days][-1]
    tables = [("engagements", (first, last)), ("ad_events", (first, last))]
    return WindowReader(world, tables, rank, world_size,
                        WindowConfig(batch_size=batch_size, seq_len=seq_len, negatives=16, prefetch=0),
                        sources.vocab(), targets_from=targets_from)


def _model(reader: WindowReader, **settings) -> DERM:
    torch.manual_seed(0)
    cfg = UpstreamConfig.for_domain("engagement", reader.joiner.vocab, embedding_dim=8, seq_len=reader.config.seq_len,
                                    seq_layers=2, seq_heads=2, tower_dims=(16,), interaction_dims=(16,), **settings)
    return DERM(cfg)


@pytest.mark.parametrize("history_mean", [False, True])
def test_a_window_day_start_state_is_the_exported_user_vector(tiny_world, history_mean) -> None:
    """In eval mode the user each row reads in training is `embed_users` of the user as of
    the row's day, as export computes it (its last seq_len engagements before the day)."""
    reader = _reader(tiny_world, days=slice(3, 4), seq_len=32)  # one day; export's history length
    model = _model(reader, history_mean=history_mean).eval()
    batch = next(reader.batches(0))
    exported = reader.joiner.user_batch(batch.meta["user_id"].numpy(), reader.days[0])
    with torch.no_grad():
        towers = model.towers(model.sequence_ec(batch.sparse), model._profile(batch.sparse), batch.dense, True)
        vectors = model.embed_users(exported.sparse, exported.dense)
    first_chunk = batch.sparse["pin_id"].lengths() > 0  # windows with rows: the day's first chunk
    context = batch.dense["context_len"][first_chunk]
    assert torch.equal(exported.sparse["seq_pin_id"].lengths()[first_chunk], context.int())
    assert (batch.dense["context_len"] > 0).any() and first_chunk.any()
    torch.testing.assert_close(towers.users[first_chunk], vectors[first_chunk], atol=1e-5, rtol=1e-4)


def test_no_row_sees_an_event_of_its_own_day(tiny_world) -> None:
    reader = _reader(tiny_world)
    sources = SourceTables(tiny_world)
    for epoch_batch in reader.batches(0):
        lengths = epoch_batch.sparse["seq_pin_id"].lengths().numpy()
        context = epoch_batch.dense["context_len"].numpy()
        rows_per_window = epoch_batch.sparse["pin_id"].lengths().numpy()
        # rows hang on windows whose context is the day's history only: the engagements after
        # it are the day's own (their gaps and ids are targets, never the rows' state)
        assert (context <= lengths).all()
        assert (context <= SEQ_LEN).all() and (lengths - context <= SEQ_LEN).all()
        assert rows_per_window.sum() == len(epoch_batch.labels["click"])
        break
    # the context of a user on day d is the user's last engagements strictly before d
    day = reader.days[1]
    start = S.day_start_ts(S.parse_day(day))
    table = sources.read("engagements", (day, day), columns=["user_id", "action", "ts"])
    assert pc.min(table.column("ts")).as_py() >= start
    n_ctx, _, _, ctx_ts = reader.joiner.sequences(start).gather(np.unique(table.column("user_id").to_numpy()))
    assert (ctx_ts < start).all() and n_ctx.max() <= 32


@pytest.mark.parametrize("earlier_targets", [False, True])
def test_every_engagement_of_the_training_days_is_a_target_once_an_epoch(tiny_world, earlier_targets) -> None:
    """Every engagement from the first target day on is a next-Pin target once; rows come from
    the row days only (`targets_from`: a day before them adds its engagements alone)."""
    sources = SourceTables(tiny_world)
    first = sources.days("engagements")[0]
    reader = _reader(tiny_world, seq_len=3, targets_from=first if earlier_targets else None)  # short: chunks too
    assert reader.days[0] == (first if earlier_targets else sources.days("engagements")[1])
    targets = []
    for batch in reader.batches(0):
        lengths = batch.sparse["seq_pin_id"].lengths().numpy()
        context = batch.dense["context_len"].numpy()
        pins = batch.sparse["seq_pin_id"].values().numpy()
        starts = np.cumsum(lengths) - lengths
        users = batch.meta["user_id"].numpy()
        for w in range(len(lengths)):
            targets += [(users[w], p) for p in pins[starts[w] + context[w]: starts[w] + lengths[w]]]
    engaged = sources.read("engagements", (reader.days[0], reader.days[-1]), columns=["user_id", "pin_id", "action"])
    engaged = engaged.filter(pc.not_equal(engaged.column("action"), S.Action.IMPRESSION))
    expected = sorted(zip(engaged.column("user_id").to_pylist(), engaged.column("pin_id").to_pylist()))
    assert sorted((int(u), int(p)) for u, p in targets) == expected
    rows = sum(r.num_rows for r in reader.readers)
    assert reader.stats.rows_emitted == rows  # the earlier day added no rows


@pytest.mark.parametrize("world_size", [2])
def test_ranks_split_the_users_and_cover_every_window(tiny_world, world_size) -> None:
    one = _reader(tiny_world)
    parts = [_reader(tiny_world, world_size, rank) for rank in range(world_size)]
    assert sum(p.num_windows for p in parts) == one.num_windows
    for rank, part in enumerate(parts):
        batch = next(part.batches(0))
        assert (batch.meta["user_id"].numpy() % world_size == rank).all()


def test_a_resumed_epoch_continues_with_the_batch_it_would_have_seen(tiny_world) -> None:
    reader = _reader(tiny_world)
    whole = list(reader.batches(0))
    later = list(reader.batches(0, skip=3))
    assert len(later) == len(whole) - 3 == reader.batches_per_epoch - 3
    assert torch.equal(later[0].meta["user_id"], whole[3].meta["user_id"])
    assert torch.equal(later[0].sparse["seq_pin_id"].values(), whole[3].sparse["seq_pin_id"].values())


def test_training_on_windows_reaches_every_term_and_learns(tiny_world) -> None:
    reader = _reader(tiny_world)
    model = _model(reader).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = list(reader.batches(0))
    first = None
    for epoch in range(3):
        total = 0.0
        for batch in batches:
            loss, out = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(out["losses"]["next_pin"])
        first = total if first is None else first
    assert set(out["losses"]) >= {"next_pin", "contrastive", "click", "clicked"}
    assert total < first * 0.95, (first, total)


def test_bad_window_settings_are_refused_naming_the_flag_or_table(tiny_world, tmp_path) -> None:
    from derl.launchers.runtime.settings import TrainUpstreamConfig

    base = {"data": tiny_world, "out": tmp_path / "run"}
    with pytest.raises(ValueError, match="--targets-from-day 2026-01-07 is after --until 2026-01-05"):
        TrainUpstreamConfig(**base, until="2026-01-05", targets_from_day="2026-01-07")
    with pytest.raises(ValueError, match="--targets-from-day"):
        TrainUpstreamConfig(**base, targets_from_day="2026-1-7")
    with pytest.raises(ValueError, match="--catalogue-negatives"):
        TrainUpstreamConfig(**base, catalogue_negatives=-1)
    with pytest.raises(ValueError, match="must include 'engagements'"):
        WindowReader(tiny_world, [("ad_events", ("2026-01-02", "2026-01-03"))], 0, 1,
                     WindowConfig(batch_size=8, seq_len=4, negatives=4, prefetch=0))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        _reader(tiny_world, batch_size=0)
