"""From Parquet event rows to `Batch`es: one rank's share, shuffled in a bounded buffer, prefetched.

One reader serves both sides of the system, because upstream and downstream examples differ only
in their event table:
- `engagements` (upstream): organic impressions, labels `ENGAGEMENT_LABELS` from the action;
- `ad_events` (downstream, and the ad side of upstream): labels `AD_LABELS`, plus ad features.
Each row is joined with its user's profile (`users`), its Pin's features (`pins`) and its user's
sequence as of the start of the row's day (`user_sequences` of the same `ds`).

Policies (each counted in `ReaderStats`, none silent):
- a NaN in a dense feature (`content_emb`) is replaced by 0 and counted;
- an id beyond the model's vocabulary is hashed into it (id mod size) and counted;
- a user or Pin missing from its table keeps its row, with empty features, and is counted;
- `converted` on an unclicked ad row is a data error: repaired to 0 and counted;
- a label outside {0, 1}, a negative id, a missing or mistyped column, a corrupt file, a
  sequence with an engagement at or after its day's start: `DataError` naming file and column.
Rows are dropped only by `drop_last` (the final partial batch), and that is counted too.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from derl.datapipes import schema as S
from derl.datapipes.batch import (
    ALL_SPARSE_FEATURES,
    AD_LABELS,
    ENGAGEMENT_LABELS,
    NUM_GAP_BUCKETS,
    NUM_POSITIONS,
    Batch,
)
from derl.datapipes.sources import (
    DataError,
    DayRange,
    IdIndex,
    ReadUnit,
    SourceTables,
    read_checked,
    shard_units,
)

_SEQUENCE_DAYS_CACHED = 2  # units are read in day order, so two days cover a shuffle window


@dataclass
class ReaderConfig:
    batch_size: int = 2048
    shuffle_buffer: int = 65_536  # rows mixed at a time; 0 keeps file order
    prefetch: int = 4  # batches built ahead by a background thread; 0 builds inline
    seed: int = 0
    drop_last: bool = False


@dataclass
class ReaderStats:
    """What a reader read, emitted, repaired and dropped, so that nothing goes unnoticed."""

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
        self.users = IdIndex(users.column("user_id").to_numpy(), users_path, "user_id")
        self.profile = {c: users.column(c).to_numpy().astype(np.int64)
                        for c in ("country", "age_bucket", "gender")}
        self.pins = IdIndex(pins.column("pin_id").to_numpy(), pins_path, "pin_id")
        self.category = pins.column("category").to_numpy().astype(np.int64)
        self.advertiser = pins.column("advertiser_id").fill_null(-1).to_numpy()
        self.campaign = pins.column("campaign_id").fill_null(-1).to_numpy()
        emb = pins.column("content_emb").combine_chunks()
        if emb.null_count:
            raise DataError(f"{pins_path}: column 'content_emb' has {emb.null_count} null rows")
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
        if len(self.pin) and self.pin.min() < 0:
            raise DataError(f"{path}: column 'seq_pin_id' has negative ids")
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


def _gap_bucket(gap_seconds: np.ndarray) -> np.ndarray:
    hours = np.maximum(gap_seconds, 0) / 3600.0
    return np.minimum(np.floor(np.log2(1.0 + hours)), NUM_GAP_BUCKETS - 1).astype(np.int64)


def _prefetched(make: Callable[[], Iterator[Batch]], depth: int) -> Iterator[Batch]:
    """Run `make()` in a background thread, `depth` items ahead; errors surface to the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="derl-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class ExampleReader:
    """Batches of one event table over a day range, for rank `rank` of `world_size`.

    Iterating runs one epoch (each epoch reshuffles with a new seed); `batches(epoch, skip)`
    starts mid-epoch, which is how a resumed training run continues where it stopped.
    """

    def __init__(
        self,
        root: Path,
        table: str = "engagements",
        days: DayRange = (None, None),
        rank: int = 0,
        world_size: int = 1,
        config: Optional[ReaderConfig] = None,
        vocab: Optional[Dict[str, int]] = None,
    ):
        if table not in ("engagements", "ad_events"):
            raise ValueError(f"examples come from 'engagements' or 'ad_events', not {table!r}")
        self.config = config or ReaderConfig()
        if self.config.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.config.batch_size}")
        self.table = table
        self.spec = S.TABLES[table]
        self.sources = SourceTables(root)
        self.rank, self.world_size = rank, world_size
        self.units: List[ReadUnit] = shard_units(self.sources.units(table, days), rank, world_size)
        self.vocab = vocab or self.sources.vocab()
        self.stats = ReaderStats()
        self.entities = _Entities(self.sources, self.stats)
        self._sequences: "collections.OrderedDict[str, _Sequences]" = collections.OrderedDict()
        self._epoch = 0
        self.label_names = AD_LABELS if table == "ad_events" else ENGAGEMENT_LABELS
        self.pin_prob = self._pin_sampling_prob(self.sources.units(table, days))

    def _pin_sampling_prob(self, units: Sequence[ReadUnit]) -> np.ndarray:
        """P(a row of this table in the day range, on any rank, shows Pin p), per Pin row (and
        one last slot for Pins missing from `pins`): the q of the contrastive logQ correction."""
        counts = np.zeros(len(self.entities.content) + 1, dtype=np.int64)
        for path in dict.fromkeys(u.path for u in units):
            ids = read_checked(path, self.spec, columns=["pin_id"]).column("pin_id").to_numpy()
            row, found = self.entities.pins.rows(ids)
            counts += np.bincount(np.where(found, row, len(counts) - 1), minlength=len(counts))
        return counts / max(counts.sum(), 1)

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    def __iter__(self) -> Iterator[Batch]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return self.batches(epoch)

    def batches(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        """One epoch of batches, leaving out the first `skip` (already consumed) ones."""
        def make() -> Iterator[Batch]:
            for i, rows in enumerate(self._row_batches(epoch)):
                if i >= skip:
                    yield self._to_batch(rows)

        if self.config.prefetch <= 0:
            return make()
        return _prefetched(make, self.config.prefetch)

    # -- rows -------------------------------------------------------------------------------

    def _read_unit(self, unit: ReadUnit) -> Dict[str, np.ndarray]:
        columns = self.spec.schema.names
        table = read_checked(unit.path, self.spec, unit.row_group, columns)
        rows = {c: table.column(c).to_numpy() for c in columns}
        if self.table == "ad_events":
            for c in AD_LABELS:
                bad = (rows[c] != 0) & (rows[c] != 1)
                if bad.any():
                    raise DataError(f"{unit.path}: column {c!r} has {int(bad.sum())} labels outside {{0, 1}}")
            orphan = (rows["converted"] == 1) & (rows["clicked"] == 0)
            if orphan.any():
                self.stats.repair("converted_without_click", int(orphan.sum()))
                rows["converted"] = np.where(orphan, 0, rows["converted"]).astype(np.int8)
        rows["day_start"] = np.full(table.num_rows, S.day_start_ts(S.parse_day(unit.day)))
        self.stats.rows_read += table.num_rows
        return rows

    def _row_batches(self, epoch: int) -> Iterator[Dict[str, np.ndarray]]:
        """Rows in batch-sized chunks: units in day order (shuffled within a day), rows mixed
        within a window of `shuffle_buffer` rows."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.rank, epoch])
        order = sorted(range(len(self.units)), key=lambda i: (self.units[i].day, rng.random()))
        buffer: List[Dict[str, np.ndarray]] = []
        buffered = 0

        def drain(keep: int) -> Iterator[Dict[str, np.ndarray]]:
            nonlocal buffer, buffered
            rows = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
            if cfg.shuffle_buffer:
                perm = rng.permutation(buffered)
                rows = {k: v[perm] for k, v in rows.items()}
            n_out = (buffered - keep) // cfg.batch_size * cfg.batch_size
            for s in range(0, n_out, cfg.batch_size):
                yield {k: v[s : s + cfg.batch_size] for k, v in rows.items()}
            buffer = [{k: v[n_out:] for k, v in rows.items()}]
            buffered -= n_out

        for i in order:
            buffer.append(self._read_unit(self.units[i]))
            buffered += len(buffer[-1]["ts"])
            if buffered >= max(cfg.shuffle_buffer, cfg.batch_size):
                yield from drain(keep=cfg.shuffle_buffer // 2)
        if buffered:
            yield from drain(keep=0)
        if buffered:  # a final partial batch
            if cfg.drop_last:
                self.stats.rows_dropped["drop_last"] += buffered
            else:
                yield buffer[0]

    # -- joins ------------------------------------------------------------------------------

    def _sequences_of(self, day_start: int) -> _Sequences:
        day = f"{np.datetime64(int(day_start), 's').astype('datetime64[D]')}"
        if day not in self._sequences:
            spec = S.USER_SEQUENCES
            parts = [(p, read_checked(p, spec)) for _, p in self.sources.files(spec.name, (day, day))]
            table = pa.concat_tables([t for _, t in parts])
            self._sequences[day] = _Sequences(table, parts[0][0], day_start)
            while len(self._sequences) > _SEQUENCE_DAYS_CACHED:
                self._sequences.popitem(last=False)
        return self._sequences[day]

    def _hashed(self, feature: str, ids: np.ndarray) -> np.ndarray:
        size = self.vocab[feature]
        over = ids >= size
        if over.any():
            self.stats.repair(f"hashed_{feature}", int(over.sum()))
            ids = ids % size
        return ids

    def _to_batch(self, rows: Dict[str, np.ndarray]) -> Batch:
        n = len(rows["ts"])
        ent = self.entities
        user_row, user_found = ent.users.rows(rows["user_id"])
        pin_row, pin_found = ent.pins.rows(rows["pin_id"])
        self.stats.repair("unknown_user", int((~user_found).sum()))
        self.stats.repair("unknown_pin", int((~pin_found).sum()))
        one = np.ones(n, dtype=np.int64)

        jagged: Dict[str, tuple] = {  # feature -> (lengths, values)
            "user_id": (one, rows["user_id"]),
            "pin_id": (one, rows["pin_id"]),
            "surface": (one, rows["surface"].astype(np.int64)),
            "hour": (one, (rows["ts"] // 3600) % S.NUM_HOURS),
        }
        for c in ("country", "age_bucket", "gender"):
            jagged[c] = (user_found.astype(np.int64), ent.profile[c][user_row][user_found])
        jagged["category"] = (pin_found.astype(np.int64), ent.category[pin_row][pin_found])
        if self.table == "ad_events":
            advertiser, campaign = rows["advertiser_id"], rows["campaign_id"]
            jagged["position"] = (one, np.minimum(rows["position"], NUM_POSITIONS - 1).astype(np.int64))
        else:  # organic rows: ad features from the Pin (empty unless it is an ad), no position
            advertiser = np.where(pin_found, ent.advertiser[pin_row], -1)
            campaign = np.where(pin_found, ent.campaign[pin_row], -1)
            jagged["position"] = (np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64))
        for key, ids in (("advertiser_id", advertiser), ("campaign_id", campaign)):
            jagged[key] = ((ids >= 0).astype(np.int64), ids[ids >= 0])

        # Each row joins the sequences of its own day (a shuffle window may span two days).
        seq_len = np.zeros(n, dtype=np.int64)
        parts = []
        for day_start in np.unique(rows["day_start"]):
            idx = np.flatnonzero(rows["day_start"] == day_start)
            ln, pin, action, ts = self._sequences_of(int(day_start)).gather(rows["user_id"][idx])
            seq_len[idx] = ln
            parts.append((np.repeat(idx, ln), pin, action, ts))
        owner, seq_pin, seq_action, seq_ts = (np.concatenate(p) for p in zip(*parts))
        by_row = np.argsort(owner, kind="stable")  # flat values in row order
        owner, seq_pin, seq_action, seq_ts = owner[by_row], seq_pin[by_row], seq_action[by_row], seq_ts[by_row]
        self.stats.no_history += int((seq_len == 0).sum())
        jagged["seq_pin_id"] = (seq_len, seq_pin)
        jagged["seq_action"] = (seq_len, seq_action)
        jagged["seq_gap"] = (seq_len, _gap_bucket(rows["ts"][owner] - seq_ts))

        values = [self._hashed(k, jagged[k][1].astype(np.int64)) for k in ALL_SPARSE_FEATURES]
        sparse = KeyedJaggedTensor(
            keys=list(ALL_SPARSE_FEATURES),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(
                np.concatenate([jagged[k][0] for k in ALL_SPARSE_FEATURES]).astype(np.int32)
            ),
        )
        content = np.zeros((n, S.CONTENT_DIM), dtype=np.float32)
        content[pin_found] = ent.content[pin_row[pin_found]]
        if self.table == "ad_events":
            labels = {c: rows[c].astype(np.float32) for c in AD_LABELS}
        else:
            a = rows["action"]
            labels = {
                "closeup": np.isin(a, [S.Action.CLOSEUP, S.Action.CLICK, S.Action.SAVE, S.Action.LONG_CLICK]),
                "click": np.isin(a, [S.Action.CLICK, S.Action.LONG_CLICK]),
                "save": a == S.Action.SAVE,
                "long_click": a == S.Action.LONG_CLICK,
                "hide": a == S.Action.HIDE,
            }
        meta = {"user_id": rows["user_id"], "pin_id": rows["pin_id"], "ts": rows["ts"]}
        if self.table == "ad_events":
            meta["request_id"] = rows["request_id"]
        self.stats.rows_emitted += n
        return Batch(
            sparse=sparse,
            dense={
                "content_emb": torch.from_numpy(content),
                "pin_sampling_prob": torch.from_numpy(
                    self.pin_prob[np.where(pin_found, pin_row, len(self.pin_prob) - 1)].astype(np.float32)
                ),
            },
            labels={k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in labels.items()},
            meta={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in meta.items()},
        )
