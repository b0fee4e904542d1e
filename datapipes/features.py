"""Joining ids with what the source tables know about them, into TorchRec features.

`FeatureJoiner` is the one place that turns user and Pin ids into the model's sparse and dense
features: the example reader uses it for event rows, evaluation and export use it for entity
batches (users with their sequence as of a day, Pins alone). Keeping it in one place is what
makes the vector of a user at export time the same function of the data as during training.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from derl.datapipes import schema as S
from derl.datapipes.batch import ALL_SPARSE_FEATURES, NUM_GAP_BUCKETS, Batch
from derl.datapipes.sources import DataError, IdIndex, SourceTables, read_checked

# Readers go through days in order, but rows kept in the shuffle buffer can linger a few days.
_SEQUENCE_DAYS_CACHED = 4

Jagged = Dict[str, Tuple[np.ndarray, np.ndarray]]  # feature -> (lengths [n], values)


@dataclass
class ReaderStats:
    """What was read, emitted, repaired and dropped, so that nothing goes unnoticed."""

    rows_read: int = 0
    rows_emitted: int = 0
    rows_dropped: Dict[str, int] = field(default_factory=collections.Counter)
    repaired: Dict[str, int] = field(default_factory=collections.Counter)
    no_history: int = 0  # examples whose user has no sequence yet (cold users)

    def repair(self, what: str, n: int) -> None:
        if n:
            self.repaired[what] += n

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_emitted": self.rows_emitted,
            "rows_dropped": dict(self.rows_dropped),
            "repaired": dict(self.repaired),
            "no_history": self.no_history,
        }


class _Entities:
    """The `users` and `pins` tables in memory as arrays, looked up by id without Python loops."""

    def __init__(self, sources: SourceTables, stats: ReaderStats):
        users = sources.read("users")
        pins = sources.read("pins")
        users_path, pins_path = sources.root / "users", sources.root / "pins"
        self.user_ids = users.column("user_id").to_numpy()
        self.users = IdIndex(self.user_ids, users_path, "user_id")
        self.profile = {c: users.column(c).to_numpy().astype(np.int64)
                        for c in ("country", "age_bucket", "gender")}
        self.pin_ids = pins.column("pin_id").to_numpy()
        self.pins = IdIndex(self.pin_ids, pins_path, "pin_id")
        self.is_ad = pins.column("is_ad").to_numpy(zero_copy_only=False)
        self.category = pins.column("category").to_numpy().astype(np.int64)
        self.advertiser = pins.column("advertiser_id").fill_null(-1).to_numpy()
        self.campaign = pins.column("campaign_id").fill_null(-1).to_numpy()
        emb = pins.column("content_emb").combine_chunks()  # no nulls: read_checked refuses them
        content = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), S.CONTENT_DIM)
        nan = ~np.isfinite(content)
        if nan.any():
            stats.repair("content_emb_nan", int(nan.any(axis=1).sum()))
            content = np.where(nan, 0.0, content).astype(np.float32)
        self.content = content


class _Sequences:
    """One day's `user_sequences`: user id -> jagged (pin, action, ts), gathered vectorised."""

    def __init__(self, table: pa.Table, path: Path, day_start: int):
        self.user = IdIndex(table.column("user_id").to_numpy(), path, "user_id")
        cols = {c: table.column(c).combine_chunks() for c in ("seq_pin_id", "seq_action", "seq_ts")}
        offsets = [np.asarray(cols[c].offsets) for c in cols]
        for c, off in zip(cols, offsets):
            if not np.array_equal(off, offsets[0]):
                raise DataError(f"{path}: column {c!r} has list lengths unlike 'seq_pin_id'")
        self.offsets = offsets[0].astype(np.int64)
        if len(self.offsets) == 1:  # no user has history yet (the first day)
            self.offsets = np.zeros(2, dtype=np.int64)
        self.pin = np.asarray(cols["seq_pin_id"].values)
        self.action = np.asarray(cols["seq_action"].values).astype(np.int64)
        self.ts = np.asarray(cols["seq_ts"].values)
        if len(self.ts) and self.ts.max() >= day_start:
            raise DataError(
                f"{path}: column 'seq_ts' holds engagements at or after the day's start "
                f"({int((self.ts >= day_start).sum())} of them): the sequence would leak the future"
            )

    def gather(self, users: np.ndarray):
        """(lengths, pin, action, ts) for `users`, flat in user order; absent users get 0."""
        row, found = self.user.rows(users)
        start = self.offsets[row]
        lengths = np.where(found, self.offsets[row + 1] - start, 0)
        flat = np.repeat(start - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return lengths, self.pin[flat], self.action[flat], self.ts[flat]


def event_times(ts: np.ndarray, day_start: np.ndarray) -> np.ndarray:
    """Each event's time from its window's day start, in log2(hours + 1) buckets: one range for
    the events before the start, one for those after it (a window's own day). It depends on the
    event and the day alone, so the state after a window's context is the same function of the
    context in training and in export, and it says how recent the history is."""
    before = ts < day_start
    hours = np.abs(ts - day_start) / 3600.0
    bucket = np.minimum(np.floor(np.log2(1.0 + hours)), NUM_GAP_BUCKETS - 1).astype(np.int64)
    return np.where(before, bucket, NUM_GAP_BUCKETS + bucket)


def _present(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A jagged feature of at most one id per row: -1 means absent."""
    return (ids >= 0).astype(np.int64), ids[ids >= 0]


class FeatureJoiner:
    """User and Pin ids -> profile, Pin attributes, content, and the user's sequence of a day."""

    def __init__(self, sources: SourceTables, vocab: Optional[Dict[str, int]] = None,
                 stats: Optional[ReaderStats] = None):
        self.sources = sources
        self.vocab = vocab or sources.vocab()
        self.stats = stats or ReaderStats()
        self.entities = _Entities(sources, self.stats)
        self._sequences: "collections.OrderedDict[int, _Sequences]" = collections.OrderedDict()

    def sequences(self, day_start: int) -> _Sequences:
        """`user_sequences` of the day that starts at `day_start` (unix seconds)."""
        if day_start not in self._sequences:
            day = f"{np.datetime64(int(day_start), 's').astype('datetime64[D]')}"
            files = [p for _, p in self.sources.files(S.USER_SEQUENCES.name, (day, day))]
            table = pa.concat_tables([read_checked(p, S.USER_SEQUENCES) for p in files])
            self._sequences[day_start] = _Sequences(table, files[0], day_start)
            while len(self._sequences) > _SEQUENCE_DAYS_CACHED:
                self._sequences.popitem(last=False)  # the least recently used day
        self._sequences.move_to_end(day_start)
        return self._sequences[day_start]

    def set_sequences(self, day: str, table: pa.Table) -> None:
        """Use `table` (e.g. from `sequences_as_of`) as the user sequences of `day`."""
        start = S.day_start_ts(S.parse_day(day))
        self._sequences[start] = _Sequences(table, Path(f"<sequences as of {day}>"), start)

    def profile_features(self, user_ids: np.ndarray) -> Jagged:
        """user_id and the profile; unknown users get empty profiles (counted)."""
        n = len(user_ids)
        row, found = self.entities.users.rows(user_ids)
        self.stats.repair("unknown_user", int((~found).sum()))
        jagged: Jagged = {"user_id": (np.ones(n, dtype=np.int64), user_ids)}
        for c in ("country", "age_bucket", "gender"):
            jagged[c] = (found.astype(np.int64), self.entities.profile[c][row][found])
        return jagged

    def event_features(self, pin: np.ndarray, action: np.ndarray, ts: np.ndarray, lengths: np.ndarray,
                       day_start: np.ndarray) -> Tuple[Jagged, Dict[str, torch.Tensor]]:
        """The sequence features of windows of events (flat, oldest first, `lengths` [n] each,
        the window of day `day_start` [n]): their Pins' ids and attributes, actions and times
        (`event_times`), and the dense `seq_content` [events, CONTENT_DIM] and `seq_is_ad` [events]."""
        e = self.entities
        n = len(lengths)
        owner = np.repeat(np.arange(n), lengths)
        jagged: Jagged = {"seq_pin_id": (lengths, pin), "seq_action": (lengths, action.astype(np.int64)),
                          "seq_gap": (lengths, event_times(ts, np.repeat(day_start, lengths)))}
        pin_row, found = e.pins.rows(pin)
        jagged["seq_category"] = (lengths, np.where(found, e.category[pin_row], 0))
        advertiser = np.where(found, e.advertiser[pin_row], -1)
        is_ad = advertiser >= 0
        jagged["seq_advertiser_id"] = (np.bincount(owner[is_ad], minlength=n).astype(np.int64), advertiser[is_ad])
        return jagged, {"seq_content": torch.from_numpy(self.content_of(pin)), "seq_is_ad": torch.from_numpy(is_ad)}

    def user_features(self, user_ids: np.ndarray,
                      day_start: np.ndarray) -> Tuple[Jagged, Dict[str, torch.Tensor]]:
        """Profile and sequence features of users as of their day's start: the sequence is the
        user's last engagements before it (`user_sequences` of that day), as a window of
        context (`event_features`)."""
        n = len(user_ids)
        jagged = self.profile_features(user_ids)
        seq_len = np.zeros(n, dtype=np.int64)
        parts = []
        for start in np.unique(day_start):
            idx = np.flatnonzero(day_start == start)
            ln, pin, action, seq_ts = self.sequences(int(start)).gather(user_ids[idx])
            seq_len[idx] = ln
            parts.append((np.repeat(idx, ln), pin, action, seq_ts))
        owner, pin, action, seq_ts = (np.concatenate(p) for p in zip(*parts))
        by_row = np.argsort(owner, kind="stable")  # flat values in row order
        self.stats.no_history += int((seq_len == 0).sum())
        events, dense = self.event_features(pin[by_row], action[by_row], seq_ts[by_row], seq_len, day_start)
        jagged.update(events)
        return jagged, dense

    def content_of(self, pin_ids: np.ndarray) -> np.ndarray:
        """[n, CONTENT_DIM] content embeddings; zeros for Pins missing from `pins`."""
        row, found = self.entities.pins.rows(pin_ids)
        content = self.entities.content[row]
        content[~found] = 0.0
        return content

    def pin_features(self, pin_ids: np.ndarray) -> Tuple[Jagged, np.ndarray, np.ndarray]:
        """(Pin id, category, advertiser and campaign features; content [n, CONTENT_DIM];
        row of each Pin in `pins`, or -1 if unknown). Unknown Pins (counted) get category 0 and
        no advertiser or campaign: every Pin has one id and one category, so that a list of
        several Pins lines up with its ids."""
        e = self.entities
        row, found = e.pins.rows(pin_ids)
        self.stats.repair("unknown_pin", int((~found).sum()))
        jagged: Jagged = {
            "pin_id": (np.ones(len(pin_ids), dtype=np.int64), pin_ids),
            "category": (np.ones(len(pin_ids), dtype=np.int64), np.where(found, e.category[row], 0)),
            "advertiser_id": _present(np.where(found, e.advertiser[row], -1)),
            "campaign_id": _present(np.where(found, e.campaign[row], -1)),
        }
        return jagged, self.content_of(pin_ids), np.where(found, row, -1)

    def _hashed(self, feature: str, ids: np.ndarray) -> np.ndarray:
        size = self.vocab[feature]
        over = ids >= size
        if over.any():
            self.stats.repair(f"hashed_{feature}", int(over.sum()))
            ids = ids % size
        return ids

    def sparse(self, jagged: Jagged, n: int) -> KeyedJaggedTensor:
        """All of ALL_SPARSE_FEATURES in order; a feature not in `jagged` is empty."""
        empty = (np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64))
        parts = [jagged.get(k, empty) for k in ALL_SPARSE_FEATURES]
        return KeyedJaggedTensor(
            keys=list(ALL_SPARSE_FEATURES),
            values=torch.from_numpy(np.concatenate(
                [self._hashed(k, v.astype(np.int64)) for k, (_, v) in zip(ALL_SPARSE_FEATURES, parts)]
            )),
            lengths=torch.from_numpy(np.concatenate([ln for ln, _ in parts]).astype(np.int32)),
        )

    def user_batch(self, user_ids: np.ndarray, day: str) -> Batch:
        """Users as of the start of `day`: their profile and their last engagements before it."""
        start = S.day_start_ts(S.parse_day(day))
        jagged, dense = self.user_features(user_ids, np.full(len(user_ids), start, dtype=np.int64))
        return Batch(sparse=self.sparse(jagged, len(user_ids)), dense=dense, labels={},
                     meta={"user_id": torch.from_numpy(user_ids)})

    def pin_batch(self, pin_ids: np.ndarray) -> Batch:
        jagged, content, _ = self.pin_features(pin_ids)
        return Batch(sparse=self.sparse(jagged, len(pin_ids)),
                     dense={"content_emb": torch.from_numpy(content)}, labels={},
                     meta={"pin_id": torch.from_numpy(pin_ids)})
