"""From Parquet event rows to `Batch`es: one rank's share, shuffled in a bounded buffer, prefetched.

One reader serves both sides of the system, because upstream and downstream examples differ only
in their event table:
- `engagements` (upstream): organic impressions, labels `ENGAGEMENT_LABELS` from the action;
- `ad_events` (downstream, and the ad side of upstream): labels `AD_LABELS`, plus ad features.
Each row is joined with its user's profile (`users`), its Pin's features (`pins`) and its user's
sequence as of the start of the row's day (`user_sequences` of the same `ds`).

Bad input (docs/data.md, "Bad input") is either a `DataError` naming table, file and column, or
a repair counted in `ReaderStats` on the first pass over the data; none is silent:
- refused: what `SourceTables` and `read_checked` refuse (partitions, nulls, codes outside
  their range, timestamps outside their day, ...), a label outside {0, 1}, a `request_id` seen
  twice in the day range, a sequence with an engagement at or after its day's start;
- repaired and counted: a NaN in `content_emb` (set to 0), an id beyond the model's vocabulary
  (hashed into it, id mod size), a user or Pin missing from its table (kept, with empty
  features), `converted` on an unclicked ad row (set to 0).
Rows are dropped only by `drop_last` (the final partial batch), and that is counted too.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from derl.datapipes import schema as S
from derl.datapipes.batch import AD_LABELS, NUM_POSITIONS, Batch
from derl.datapipes.features import FeatureJoiner, ReaderStats
from derl.datapipes.sources import (
    DataError,
    DayRange,
    ReadUnit,
    SourceTables,
    read_checked,
    shard_units,
    unique_order,
)

# A join adds dense features to a batch from its rows (user_id, pin_id, ts, day_start, ...);
# it runs inside `_to_batch`, so in the prefetch thread, off the training step.
DenseJoin = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


@dataclass
class ReaderConfig:
    batch_size: int = 2048
    shuffle_buffer: int = 65_536  # rows mixed at a time; 0 keeps file order
    prefetch: int = 4  # batches built ahead by a background thread; 0 builds inline
    seed: int = 0
    drop_last: bool = False


# How long a consumer that stops early waits for the prefetch thread to finish the item it is
# building (after that the daemon thread is left to end on its own).
PREFETCH_JOIN_S = 60.0


def prefetched(make: Callable[[], Iterator[Batch]], depth: int) -> Iterator[Batch]:
    """Run `make()` in a background thread, `depth` items ahead; errors surface to the caller.

    A consumer may stop early (a training loop takes a fixed number of steps, then closes its
    stream): every hand-over, the end marker and an error included, gives up once `stop` is
    set, so the thread never waits on a queue nobody reads, and closing never blocks on it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

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
        thread.join(PREFETCH_JOIN_S)  # not left inside torch code at interpreter exit, if it can help


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
        joins: Sequence[DenseJoin] = (),
        joiner: Optional[FeatureJoiner] = None,
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
        every = self.sources.units(table, days)
        self.units: List[ReadUnit] = shard_units(every, rank, world_size)
        self.joiner = joiner or FeatureJoiner(self.sources, vocab)
        self.stats = self.joiner.stats
        self.joins = list(joins)
        self._epoch = 0
        self.pin_prob = self._scan(every)

    def _scan(self, units: Sequence[ReadUnit]) -> np.ndarray:
        """One pass over the whole day range (every rank's units, so all ranks agree): refuses a
        `request_id` seen twice (the impression would count twice), and returns P(a row shows
        Pin p) per Pin row, plus a last slot for Pins missing from `pins`: the q of the
        contrastive logQ correction."""
        pins = self.joiner.entities.pins
        counts = np.zeros(len(pins.sorted) + 1, dtype=np.int64)  # slot -1: unknown Pins
        files = list(dict.fromkeys((u.path, u.day) for u in units))
        ads = self.table == "ad_events"
        requests = []
        for path, day in files:
            t = read_checked(path, self.spec, columns=["pin_id", "request_id"] if ads else ["pin_id"], day=day)
            row, found = pins.rows(t.column("pin_id").to_numpy())
            counts += np.bincount(np.where(found, row, len(counts) - 1), minlength=len(counts))
            if ads:
                requests.append(t.column("request_id").to_numpy())
        if ads:
            file_of = np.repeat(np.arange(len(files)), [len(r) for r in requests])
            unique_order(np.concatenate(requests), "request_id", [p for p, _ in files], file_of)
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
            # The data is described once, on the first pass: later epochs (and the read-ahead
            # into them) count into a scratch, so each repair is reported once per row.
            self.joiner.stats = self.stats if epoch == 0 else ReaderStats()
            for i, rows in enumerate(self._row_batches(epoch)):
                if i >= skip:
                    yield self._to_batch(rows)

        if self.config.prefetch <= 0:
            return make()
        return prefetched(make, self.config.prefetch)

    # -- rows -------------------------------------------------------------------------------

    def read_columns(self, path: Path, day: Optional[str], columns: Sequence[str]) -> Dict[str, np.ndarray]:
        """Some columns of one file of the table, checked."""
        table = read_checked(path, self.spec, columns=list(columns), day=day)
        return {c: table.column(c).to_numpy() for c in columns}

    def read_unit(self, unit: ReadUnit) -> Dict[str, np.ndarray]:
        """One unit's rows, checked (labels in {0, 1}; a conversion without a click repaired)."""
        columns = self.spec.schema.names
        table = read_checked(unit.path, self.spec, unit.row_group, columns, unit.day)
        rows = {c: table.column(c).to_numpy() for c in columns}
        if self.table == "ad_events":
            for c in AD_LABELS:
                bad = (rows[c] != 0) & (rows[c] != 1)
                if bad.any():
                    raise DataError(f"{unit.path}: column {c!r} has {int(bad.sum())} labels outside {{0, 1}}")
            orphan = (rows["converted"] == 1) & (rows["clicked"] == 0)
            if orphan.any():
                self.joiner.stats.repair("converted_without_click", int(orphan.sum()))
                rows["converted"] = np.where(orphan, 0, rows["converted"]).astype(np.int8)
        rows["day_start"] = np.full(table.num_rows, S.day_start_ts(S.parse_day(unit.day)))
        self.joiner.stats.rows_read += table.num_rows
        return rows

    def _row_batches(self, epoch: int) -> Iterator[Dict[str, np.ndarray]]:
        """Rows in batch-sized chunks: units in day order (shuffled within a day); each time
        `shuffle_buffer` rows have gathered they are permuted and emitted in full batches, the
        remainder (less than a batch) carried into the next window. No row outlives its window,
        so a batch spans at most a couple of days and the sequence cache stays small."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.rank, epoch])
        order = sorted(range(len(self.units)), key=lambda i: (self.units[i].day, rng.random()))
        buffer: List[Dict[str, np.ndarray]] = []
        buffered = 0

        def drain() -> Iterator[Dict[str, np.ndarray]]:
            nonlocal buffer, buffered
            rows = {k: np.concatenate([b[k] for b in buffer]) for k in buffer[0]}
            if cfg.shuffle_buffer:
                perm = rng.permutation(buffered)
                rows = {k: v[perm] for k, v in rows.items()}
            n_out = buffered // cfg.batch_size * cfg.batch_size
            for s in range(0, n_out, cfg.batch_size):
                yield {k: v[s : s + cfg.batch_size] for k, v in rows.items()}
            buffer = [{k: v[n_out:] for k, v in rows.items()}]
            buffered -= n_out

        for i in order:
            buffer.append(self.read_unit(self.units[i]))
            buffered += len(buffer[-1]["ts"])
            if buffered >= max(cfg.shuffle_buffer, cfg.batch_size):
                yield from drain()
        if buffered:
            yield from drain()
        if buffered:  # a final partial batch
            if cfg.drop_last:
                self.joiner.stats.rows_dropped["drop_last"] += buffered
            else:
                yield buffer[0]

    # -- joins ------------------------------------------------------------------------------

    def _to_batch(self, rows: Dict[str, np.ndarray]) -> Batch:
        n = len(rows["ts"])
        jagged, dense = self.joiner.user_features(rows["user_id"], rows["day_start"])
        pin_jagged, content, pin_row, labels = row_features(self.joiner, self.table, rows)
        jagged.update(pin_jagged)
        meta = {"user_id": rows["user_id"], "pin_id": rows["pin_id"], "ts": rows["ts"]}
        if self.table == "ad_events":
            meta["request_id"] = rows["request_id"]
        self.joiner.stats.rows_emitted += n
        dense["content_emb"] = torch.from_numpy(content)
        dense["pin_sampling_prob"] = torch.from_numpy(self.pin_prob[pin_row].astype(np.float32))
        for join in self.joins:
            dense.update({k: torch.from_numpy(v) for k, v in join(rows).items()})
        return Batch(
            sparse=self.joiner.sparse(jagged, n),
            dense=dense,
            labels={k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in labels.items()},
            meta={k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in meta.items()},
        )


def row_features(joiner: FeatureJoiner, table: str, rows: Dict[str, np.ndarray]):
    """(the rows' Pin and context features, their content [n, CONTENT_DIM], each Pin's row in
    `pins` (-1: unknown), the labels): an ad row carries its own advertiser, campaign and slot;
    an organic row's labels come from its action."""
    n = len(rows["ts"])
    jagged, content, pin_row = joiner.pin_features(rows["pin_id"])
    one = np.ones(n, dtype=np.int64)
    jagged["surface"] = (one, rows["surface"].astype(np.int64))
    jagged["hour"] = (one, (rows["ts"] // 3600) % S.NUM_HOURS)
    if table == "ad_events":  # the impression's own ad ids, and its slot
        jagged["advertiser_id"] = (one, rows["advertiser_id"])
        jagged["campaign_id"] = (one, rows["campaign_id"])
        jagged["position"] = (one, np.minimum(rows["position"], NUM_POSITIONS - 1).astype(np.int64))
        labels = {c: rows[c] for c in AD_LABELS}
    else:
        a = rows["action"]
        labels = {
            "closeup": np.isin(a, [S.Action.CLOSEUP, S.Action.CLICK, S.Action.SAVE, S.Action.LONG_CLICK]),
            "click": np.isin(a, [S.Action.CLICK, S.Action.LONG_CLICK]),
            "save": a == S.Action.SAVE,
            "long_click": a == S.Action.LONG_CLICK,
            "hide": a == S.Action.HIDE,
        }
    return jagged, content, pin_row, labels
