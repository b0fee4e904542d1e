"""The upstream's training batches, sequence-major: a batch is a set of user windows.

A window is one user on one training day: the user's last `seq_len` engagements before the day
(the context: what export reads for a cut on that day) followed by the user's engagements of the
day, and the day's labelled rows of the user (organic impressions, ad impressions) attached to
the context's end. The model encodes a window once, causally: the state after the context is
the user's state at the day's start, which the rows' heads and the contrastive term read (no row
sees an event of its own day), and the state after each event predicts the next one, so every
engagement of the training days is a next-Pin target once an epoch. A day with more than
`seq_len` engagements of one user is cut into chunks, each with its own `seq_len` of context.

Batch layout (`Batch`, stride = windows): the profile features one per window; `seq_*` the
window's events, context first (dense `context_len` [W] says how many); `pin_id`, `category`,
`advertiser_id` the rows' candidate Pins (dense `pin_is_ad` [R] says which carry an advertiser);
`neg_*` Pins drawn uniformly from the catalogue, the next-Pin term's shared negatives. Dense
`seq_log_q` [E] and `neg_log_q` [K] are log of each Pin's expected count among the term's
candidates (the logQ correction); `row_context` [R, 3] the rows' surface, hour and ad position
(-1: none); labels [R] per task, NaN where the row's table does not have the label.
Every rank reads every row and keeps the users with `user_id % world_size == rank`, so that a
user's window is whole on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from derl.datapipes import schema as S
from derl.datapipes.batch import NUM_POSITIONS, Batch
from derl.datapipes.features import FeatureJoiner, Jagged, ReaderStats
from derl.datapipes.readers import ExampleReader, ReaderConfig, prefetched, row_features
from derl.datapipes.sources import DataError, SourceTables


@dataclass(frozen=True)
class WindowConfig:
    batch_size: int  # windows a batch
    seq_len: int  # context events, the model's history
    negatives: int  # catalogue Pins drawn a batch, every next-Pin target's shared negatives
    seed: int = 0
    prefetch: int = 4  # batches built ahead by a background thread; 0 builds inline


@dataclass
class _Day:
    """One day of this rank's users, laid out for slicing into windows: rows grouped by user
    (`row_start` [U] into the row arrays), each user's stream (context then the day's events,
    `stream_start` [U] into the stream arrays, `context` [U] events of context), and the
    windows as (user, first stream event, chunk start, end) index arrays."""

    day_start: int
    users: np.ndarray
    rows: Dict[str, np.ndarray]
    pin_row: np.ndarray
    jagged: Jagged
    content: np.ndarray
    labels: Dict[str, np.ndarray]
    row_start: np.ndarray
    row_count: np.ndarray
    stream: Dict[str, np.ndarray]
    stream_start: np.ndarray
    windows: Dict[str, np.ndarray]


class WindowReader:
    """Batches of user windows over the training days of `tables`, for rank `rank` of
    `world_size`. `batches(epoch, skip)` is one epoch (days in a shuffled order, windows
    shuffled within a day, a day's last batch smaller), resumable at any batch."""

    def __init__(self, root: Path, tables: Sequence[Tuple[str, Tuple[str, str]]], rank: int, world_size: int,
                 config: WindowConfig, vocab: Optional[Dict[str, int]] = None,
                 targets_from: Optional[str] = None):
        if config.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {config.batch_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.sources = SourceTables(root)
        self.joiner = FeatureJoiner(self.sources, vocab)
        self.stats = self.joiner.stats
        plain = ReaderConfig(prefetch=0, shuffle_buffer=0)
        self.readers = [ExampleReader(root, t, days, 0, 1, plain, vocab, joiner=self.joiner) for t, days in tables]
        rows_days = dict(tables)
        if "engagements" not in rows_days:
            raise ValueError("the upstream reads its users' engagements: the tables must include 'engagements'")
        # the engagements whose transitions are targets: from `targets_from` (earlier days' windows
        # carry no rows), else the row days'
        first, last = rows_days["engagements"]
        self.events = (ExampleReader(root, "engagements", (targets_from, last), 0, 1, plain, vocab, joiner=self.joiner)
                       if targets_from and targets_from < first else self.engagements)
        rows = np.array([r.num_rows for r in self.readers], dtype=np.float64)
        # q of the contrastive logQ correction: a Pin's share of all the domain's rows
        self.pin_prob = sum(r.pin_prob * n for r, n in zip(self.readers, rows)) / max(rows.sum(), 1)
        self.days = sorted({u.day for r in self.readers + [self.events] for u in r.units})
        self.event_prob, self.per_day = self._scan()

    @property
    def engagements(self) -> ExampleReader:
        return next(r for r in self.readers if r.table == "engagements")

    # -- what an epoch holds ------------------------------------------------------------------

    def _day_rows(self, reader: ExampleReader, day: str) -> Optional[Dict[str, np.ndarray]]:
        units = [u for u in reader.units if u.day == day]
        if not units:
            return None
        parts = [reader.read_unit(u) for u in units]
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        mine = rows["user_id"] % self.world_size == self.rank
        return {k: v[mine] for k, v in rows.items()}

    def _events(self, rows: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The engagements among organic rows (impressions without an action are not events),
        by (user, ts), stable."""
        keep = rows["action"] != S.Action.IMPRESSION
        events = {k: rows[k][keep] for k in ("user_id", "pin_id", "action", "ts")}
        order = np.lexsort((events["ts"], events["user_id"]))
        return {k: v[order] for k, v in events.items()}

    def _scan(self) -> Tuple[np.ndarray, List[int]]:
        """One pass over the days' ids, every file read once: (P(an engagement of the target days
        is with Pin p), per Pin row, last slot Pins missing from `pins`: the next-Pin term's
        popularity, for its logQ correction; this rank's windows per day)."""
        pins = self.joiner.entities.pins
        counts = np.zeros(len(pins.sorted) + 1, dtype=np.int64)
        per_day = []
        for day in self.days:
            users = []
            chunks = np.zeros(0, dtype=np.int64)
            for r in self._readers_of(day):
                for path, d in dict.fromkeys((u.path, u.day) for u in r.units if u.day == day):
                    cols = ["user_id", "pin_id", "action"] if r.table == "engagements" else ["user_id"]
                    t = r.read_columns(path, d, cols)
                    mine = t["user_id"] % self.world_size == self.rank
                    if r in self.readers:  # the users with rows
                        users.append(t["user_id"][mine])
                    if r.table == "engagements":  # the users with events: one window per seq_len of them
                        engaged = t["action"] != S.Action.IMPRESSION
                        row, found = pins.rows(t["pin_id"][engaged])
                        counts += np.bincount(np.where(found, row, len(counts) - 1), minlength=len(counts))
                        events = t["user_id"][mine & engaged]
                        users.append(events)
                        _, n = np.unique(events, return_counts=True)
                        chunks = np.concatenate([chunks, np.maximum(n - 1, 0) // self.config.seq_len])
            per_day.append(len(np.unique(np.concatenate(users))) + int(chunks.sum()) if users else 0)
        return counts / max(counts.sum(), 1), per_day

    def _readers_of(self, day: str) -> List[ExampleReader]:
        """The readers with rows or events on `day`: the row tables', and the engagements' of a
        day before the rows (events only)."""
        readers = [r for r in self.readers if any(u.day == day for u in r.units)]
        if not any(r.table == "engagements" for r in readers) and any(u.day == day for u in self.events.units):
            readers.append(self.events)
        return readers

    @property
    def batches_per_epoch(self) -> int:
        b = self.config.batch_size
        return sum(-(-n // b) for n in self.per_day)

    @property
    def num_windows(self) -> int:
        return sum(self.per_day)

    # -- one day ------------------------------------------------------------------------------

    def _load_day(self, day: str) -> _Day:
        L = self.config.seq_len
        parts = []
        events = None
        for r in self._readers_of(day):
            rows = self._day_rows(r, day)
            if rows is None:
                continue
            if r.table == "engagements":
                events = self._events(rows)
            if r not in self.readers:  # a day before the rows: its events only
                continue
            jagged, content, pin_row, labels = row_features(self.joiner, r.table, rows)
            rows["pin_row"] = pin_row
            parts.append((rows, jagged, content, labels, r.table))
        if events is None:
            events = {k: np.zeros(0, dtype=np.int64) for k in ("user_id", "pin_id", "action", "ts")}
        if not parts:  # a day before the rows
            none = np.zeros(0, dtype=np.int64)
            parts = [({"user_id": none, "pin_id": none, "pin_row": none, "surface": none, "ts": none},
                      {k: (none, none) for k in _CANDIDATE_FEATURES}, np.zeros((0, S.CONTENT_DIM), np.float32),
                      {}, "engagements")]
        # rows of every table, grouped by user (stable: each user's rows in table, then file order)
        rows = {k: np.concatenate([p[0][k] for p in parts]) for k in ("user_id", "pin_id", "pin_row")}
        row_table_rows = [len(p[0]["user_id"]) for p in parts]
        jagged = _concat_jagged([p[1] for p in parts])
        content = np.concatenate([p[2] for p in parts])
        task_names = sorted({k for p in parts for k in p[3]})
        labels = {k: np.concatenate([np.asarray(p[3][k], dtype=np.float32) if k in p[3]
                                     else np.full(n, np.nan, dtype=np.float32)
                                     for p, n in zip(parts, row_table_rows)]) for k in task_names}
        context = np.concatenate([_row_context(p[0], p[4]) for p in parts])
        order = np.argsort(rows["user_id"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        rows["context"] = context[order]
        jagged = _take_jagged(jagged, order)
        content, labels = content[order], {k: v[order] for k, v in labels.items()}

        users = np.unique(np.concatenate([rows["user_id"], events["user_id"]]))
        row_count = np.bincount(np.searchsorted(users, rows["user_id"]), minlength=len(users))
        row_start = np.cumsum(row_count) - row_count
        day_start = S.day_start_ts(S.parse_day(day))
        n_ctx, ctx_pin, ctx_action, ctx_ts = self.joiner.sequences(day_start).gather(users)
        n_ev = np.bincount(np.searchsorted(users, events["user_id"]), minlength=len(users))
        owner = np.concatenate([np.repeat(np.arange(len(users)), n_ctx), np.searchsorted(users, events["user_id"])])
        by_user = np.argsort(owner, kind="stable")  # per user: context, then the day's events
        stream = {"pin": np.concatenate([ctx_pin, events["pin_id"]])[by_user],
                  "action": np.concatenate([ctx_action, events["action"]]).astype(np.int64)[by_user],
                  "ts": np.concatenate([ctx_ts, events["ts"]])[by_user]}
        size = n_ctx + n_ev
        stream_start = np.cumsum(size) - size
        # windows: chunk c of user u covers the day's events [c L, (c + 1) L), after up to L of context
        chunks = np.maximum(1, -(-n_ev // L))
        user = np.repeat(np.arange(len(users)), chunks)
        c = np.arange(len(user)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
        chunk_start = n_ctx[user] + c * L
        windows = {"user": user, "chunk": c, "start": np.maximum(0, chunk_start - L), "chunk_start": chunk_start,
                   "end": np.minimum(size[user], chunk_start + L)}
        self.stats.no_history += int(((n_ctx == 0) & (row_count > 0)).sum())
        return _Day(day_start, users, rows, rows["pin_row"], jagged, content, labels, row_start, row_count,
                    stream, stream_start, windows)

    def _batch(self, day: _Day, picked: np.ndarray, rng: np.random.Generator) -> Batch:
        """The batch of windows `picked` (indices into `day.windows`)."""
        w = {k: v[picked] for k, v in day.windows.items()}
        n = len(picked)
        joiner, e = self.joiner, self.joiner.entities
        user_ids = day.users[w["user"]]
        jagged = joiner.profile_features(user_ids)
        # the windows' events, context first
        seq_len = w["end"] - w["start"]
        flat = _ranges(day.stream_start[w["user"]] + w["start"], seq_len)
        pin, action, ts = (day.stream[k][flat] for k in ("pin", "action", "ts"))
        seq_jagged, seq_dense = joiner.event_features(pin, action, ts, seq_len, np.full(n, day.day_start))
        jagged.update(seq_jagged)
        context_len = w["chunk_start"] - w["start"]
        targets = int((w["end"] - w["chunk_start"]).sum())
        # the rows of each window's first chunk
        rows_n = np.where(w["chunk"] == 0, day.row_count[w["user"]], 0)
        rows = _ranges(day.row_start[w["user"]], rows_n)
        row_window = np.repeat(np.arange(n), rows_n)
        for f in _CANDIDATE_FEATURES:
            lengths, values = day.jagged[f]
            starts = np.cumsum(lengths) - lengths
            mine = lengths[rows]
            jagged[f] = (np.bincount(row_window, weights=mine, minlength=n).astype(np.int64),
                         values[_ranges(starts[rows], mine)])
        pin_is_ad = day.jagged["advertiser_id"][0][rows] > 0
        # the catalogue negatives, spread over the windows' lists
        k = self.config.negatives
        negatives = e.pin_ids[rng.integers(0, len(e.pin_ids), size=k)] if k else np.zeros(0, dtype=np.int64)
        neg_jagged, neg_content, neg_row = joiner.pin_features(negatives)
        spread = np.bincount(np.arange(k) % n, minlength=n).astype(np.int64)
        jagged["neg_pin_id"] = (spread, negatives)
        jagged["neg_category"] = (spread, neg_jagged["category"][1])
        neg_is_ad = neg_jagged["advertiser_id"][0] > 0
        jagged["neg_advertiser_id"] = (np.bincount(np.arange(k)[neg_is_ad] % n, minlength=n),
                                       neg_jagged["advertiser_id"][1])
        pins = e.pins
        log_q = lambda p: np.log(np.minimum(1.0, targets * self.event_prob[p]) + k / len(e.pin_ids))  # noqa: E731
        seq_row, found = pins.rows(pin)
        seq_prob_row = np.where(found, seq_row, len(self.event_prob) - 1)
        neg_prob_row = np.where(neg_row >= 0, neg_row, len(self.event_prob) - 1)
        self.stats.rows_emitted += len(rows)
        dense = {
            **seq_dense,
            "context_len": torch.from_numpy(context_len.astype(np.int64)),
            "content_emb": torch.from_numpy(day.content[rows]),
            "pin_is_ad": torch.from_numpy(pin_is_ad),
            "pin_sampling_prob": torch.from_numpy(self.pin_prob[day.pin_row[rows]].astype(np.float32)),
            "row_context": torch.from_numpy(day.rows["context"][rows]),
            "neg_content": torch.from_numpy(neg_content),
            "neg_is_ad": torch.from_numpy(neg_is_ad),
            "seq_log_q": torch.from_numpy(log_q(seq_prob_row).astype(np.float32)),
            "neg_log_q": torch.from_numpy(log_q(neg_prob_row).astype(np.float32)),
        }
        return Batch(sparse=joiner.sparse(jagged, n), dense=dense,
                     labels={t: torch.from_numpy(v[rows]) for t, v in day.labels.items()},
                     meta={"user_id": torch.from_numpy(user_ids), "pin_id": torch.from_numpy(day.rows["pin_id"][rows])})

    # -- epochs -------------------------------------------------------------------------------

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        """One epoch of batches, leaving out the first `skip` (already consumed) ones."""
        def make() -> Iterator[Batch]:
            self.joiner.stats = self.stats if epoch == 0 else ReaderStats()
            seed = [self.config.seed, self.rank, epoch]
            b, done = self.config.batch_size, 0
            # Each day's order and each batch's negatives from a generator of their own: a
            # resumed epoch draws what the uninterrupted one drew.
            for i in np.random.default_rng(seed).permutation(len(self.days)):
                count = -(-self.per_day[i] // b)
                if done + count <= skip:
                    done += count
                    continue
                day = self._load_day(self.days[i])
                if len(day.windows["user"]) != self.per_day[i]:
                    raise DataError(f"{self.days[i]}: the day's rows changed while training read them")
                order = np.random.default_rng(seed + [int(i)]).permutation(self.per_day[i])
                for j in range(count):
                    if done >= skip:
                        yield self._batch(day, order[j * b:(j + 1) * b], np.random.default_rng(seed + [int(i), j]))
                    done += 1
        return make() if self.config.prefetch <= 0 else prefetched(make, self.config.prefetch)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches for ever, epoch after epoch, from step `start_step` on."""
        epoch, skip = divmod(start_step, max(self.batches_per_epoch, 1))
        while True:
            stream = self.batches(epoch, skip)
            try:
                yield from stream
            finally:
                stream.close()
            epoch, skip = epoch + 1, 0


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices start_i, ..., start_i + length_i - 1 of every range, flat."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths) + np.arange(
        lengths.sum())


# What a window keeps of its rows' Pin features: the candidates.
_CANDIDATE_FEATURES = ("pin_id", "category", "advertiser_id", "campaign_id")


def _concat_jagged(parts: List[Jagged]) -> Jagged:
    """The candidates' Pin features of the tables' rows, one after the other."""
    return {k: (np.concatenate([p[k][0] for p in parts]), np.concatenate([p[k][1] for p in parts]))
            for k in _CANDIDATE_FEATURES}


def _take_jagged(jagged: Jagged, order: np.ndarray) -> Jagged:
    """Rows `order` of every feature (lengths per row, values in row order)."""
    out = {}
    for k, (lengths, values) in jagged.items():
        starts = np.cumsum(lengths) - lengths
        out[k] = (lengths[order], values[_ranges(starts[order], lengths[order])])
    return out


def _row_context(rows: Dict[str, np.ndarray], table: str) -> np.ndarray:
    """[n, 3] the columns of `ROW_CONTEXT`: surface, hour, ad position (-1: an organic row has none)."""
    n = len(rows["ts"])
    position = (np.minimum(rows["position"], NUM_POSITIONS - 1).astype(np.int64) if table == "ad_events"
                else np.full(n, -1, dtype=np.int64))
    return np.stack([rows["surface"].astype(np.int64), (rows["ts"] // 3600) % S.NUM_HOURS, position], axis=1)
