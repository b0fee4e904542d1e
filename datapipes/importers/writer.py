"""The half of an import every format shares: filters, dense ids, day partitions, the last passes.

A format module reads its files (`WorldWriter.csv`) and hands the writer rows with source ids:
organic actions (`organic`), ad Pins (`pins.add_unique`), ad impressions (`ad_impressions`). The
writer drops what is not to be imported (sampled-out users, rows outside the data's window or
the days asked for), each drop counted by reason, numbers ids densely and writes each day's
partition as rows come. Once the input is read (`finish`) it removes duplicate ad impressions a
day at a time, writes a day without events inside a table's days as an empty partition marked
so (counted in the report), writes `users` and `pins`, replays the engagements day by day into the
sequences-as-of-start-of-day table, and writes `_world.json` and `import_report.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derl.datapipes import schema as S
from derl.datapipes.importers.ids import Column, IdSpace, content, sampled
from derl.datapipes.importers.stream import BLOCK_BYTES, Block, InputFile, csv_blocks
from derl.datapipes.sequences import SequenceBuffer
from derl.datapipes.sources import DataError
from derl.datapipes.world import WORLD_META, world_id

REPORT = "import_report.json"
SEQUENCE_LENGTH = 32
_MERGE_ROWS = 1 << 20  # engagements merged into the sequence buffer at a time
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class ImportOptions:
    """How to import, beside the format and the files (`derl import`'s flags)."""

    sample_users: Optional[float] = None  # keep this fraction of the users (hashed, with `seed`)
    seed: int = 0
    from_day: Optional[str] = None  # import only these days (the world's clock)
    until: Optional[str] = None
    days: int = 8  # seq-lines: how many days to lay each user's items over
    row_group_size: int = 131_072
    block_bytes: int = BLOCK_BYTES  # how much of an input is parsed at a time
    progress: bool = False

    def check(self) -> None:
        """Refuse a bad option by its flag, before anything is read."""
        if self.sample_users is not None and not 0 < self.sample_users <= 1:
            raise ValueError(f"--sample-users must be a fraction in (0, 1], got {self.sample_users}")
        if self.days < 3:
            raise ValueError(f"--days must be at least 3 (earlier items, then the second-to-last "
                             f"and the last day), got {self.days}")
        for flag, day in (("--from-day", self.from_day), ("--until", self.until)):
            if day is not None:
                try:
                    S.parse_day(day)
                except ValueError as e:
                    raise ValueError(f"{flag}: {e}") from None
        if self.from_day and self.until and self.until < self.from_day:
            raise ValueError(f"--from-day {self.from_day} is after --until {self.until}")
        if self.row_group_size < 1:
            raise ValueError(f"row_group_size must be positive, got {self.row_group_size}")


@dataclass(frozen=True)
class PinFields:
    """Which recorded Pin columns (source values) make the contract's Pin columns: `category`,
    `advertiser_id` and `campaign_id` are numbered densely from them, `content` names the
    attributes hashed into `content_emb` (attribute name -> column)."""

    category: Optional[str] = None
    advertiser: Optional[str] = None
    campaign: Optional[str] = None
    content: Dict[str, str] = field(default_factory=dict)


class Report:
    """Every input read, and every row dropped or value repaired, by reason and input kind."""

    def __init__(self):
        self.inputs: List[InputFile] = []
        self.dropped: Dict[str, Counter] = defaultdict(Counter)
        self.repaired: Dict[str, Counter] = defaultdict(Counter)

    def drop(self, reason: str, kind: str, n) -> None:
        if n:
            self.dropped[reason][kind] += int(n)

    def repair(self, reason: str, kind: str, n) -> None:
        if n:
            self.repaired[reason][kind] += int(n)

    def counts(self) -> dict:
        return {"dropped": {r: dict(c) for r, c in sorted(self.dropped.items())},
                "repaired": {r: dict(c) for r, c in sorted(self.repaired.items())}}


def day_name(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=int(day))).isoformat()


def _epoch_day(day: str) -> int:
    return (S.parse_day(day) - _EPOCH).days


def _day_file(folder: Path, day: int) -> Path:
    return folder / f"ds={day_name(day)}" / "part-0.parquet"


def _dates(days: np.ndarray) -> pa.Array:
    return pa.array(days.astype(np.int32)).cast(pa.date32())


def _nullable(values: np.ndarray) -> pa.Array:
    """A recorded column with its fill (-1, NaN) as null: the value is absent for that row."""
    if values.dtype.kind == "i":
        return pa.array(values, mask=values < 0)
    if values.dtype.kind == "f":
        return pa.array(values, mask=np.isnan(values))
    return pa.array(values)


def _dense(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Values numbered 0..n-1 in order of first appearance along the rows; -1 where absent."""
    out = np.full(len(values), -1, dtype=np.int64)
    distinct, first, inverse = np.unique(values[present], return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    out[present] = rank[inverse.reshape(-1)]
    return out


class _DayFiles:
    """One day-partitioned table being written as rows come: a ParquetWriter per day (one file,
    `ds=.../part-0.parquet`), each buffering rows up to a row group."""

    def __init__(self, folder: Path, row_group_size: int):
        self.folder = folder
        self.row_group_size = row_group_size
        self.schema: Optional[pa.Schema] = None
        self.writers: Dict[int, pq.ParquetWriter] = {}
        self.pending: Dict[int, List[pa.Table]] = defaultdict(list)
        self.buffered: Counter = Counter()
        self.rows: Counter = Counter()

    def path(self, day: int) -> Path:
        return _day_file(self.folder, day)

    def add(self, days: np.ndarray, columns: Dict[str, object]) -> None:
        if not len(days):
            return
        table = pa.table(columns) if self.schema is None else pa.table(columns, schema=self.schema)
        self.schema = table.schema
        order = np.argsort(days, kind="stable")
        distinct, starts = np.unique(days[order], return_index=True)
        for day, a, b in zip(distinct.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
            self.pending[day].append(table.take(order[a:b]))
            self.buffered[day] += b - a
            self.rows[day] += b - a
            if self.buffered[day] >= self.row_group_size:
                self._flush(day, final=False)

    def _flush(self, day: int, final: bool) -> None:
        table = pa.concat_tables(self.pending.pop(day))
        if day not in self.writers:
            self.path(day).parent.mkdir(parents=True, exist_ok=True)
            self.writers[day] = pq.ParquetWriter(self.path(day), self.schema, compression="zstd")
        whole = len(table) if final else len(table) // self.row_group_size * self.row_group_size
        self.writers[day].write_table(table.slice(0, whole), row_group_size=self.row_group_size)
        self.buffered[day] = len(table) - whole
        if whole < len(table):
            self.pending[day] = [table.slice(whole)]

    def close(self) -> Dict[int, int]:
        """Write what is buffered; rows per day (epoch days), in day order."""
        for day in list(self.pending):
            self._flush(day, final=True)
        for w in self.writers.values():
            w.close()
        return dict(sorted(self.rows.items()))

    def write_days_without_events(self) -> List[str]:
        """Once closed: each day between the first and the last with rows that has none gets a
        partition of zero rows marked as a day without events (`schema.DAY_WITHOUT_EVENTS`),
        so that the table's days stay consecutive; returns those days."""
        empty = S.gaps([day_name(d) for d in sorted(self.rows)])
        for day in empty:
            path = self.path(_epoch_day(day))
            path.parent.mkdir(parents=True)
            pq.write_table(self.schema.empty_table().replace_schema_metadata(S.DAY_WITHOUT_EVENTS), path,
                           compression="zstd")
        return empty


class WorldWriter:
    """Writes one imported world into `root` (a hidden folder, renamed into place by the caller)."""

    def __init__(self, root: Path, fmt: str, clock: str, pin_fields: PinFields, options: ImportOptions):
        self.root, self.fmt, self.clock, self.pin_fields, self.options = root, fmt, clock, pin_fields, options
        self.report = Report()
        self.users = IdSpace()
        self.pins = IdSpace()
        # The users' profile: a space keyed by source user id, and which of its columns are
        # the contract's country, age_bucket, gender (the rest are kept as extra columns).
        self.profile: Optional[Tuple[IdSpace, Dict[str, str]]] = None
        self._user_first = Column(np.int64, fill=np.iinfo(np.int64).max)  # first event day
        self._pin_first = Column(np.int64, fill=np.iinfo(np.int64).max)
        self.engagements = _DayFiles(root / "engagements", options.row_group_size)
        self.staged_ads = _DayFiles(root / ".staging" / "ad_events", options.row_group_size)
        root.mkdir(parents=True)

    def csv(self, path: Path, kind: str, names: Sequence[str], types: Dict[str, pa.DataType],
            header: bool, delimiter: str = ",") -> Iterator[Block]:
        """The blocks of one input, which the report lists once it is read."""
        return csv_blocks(path, kind, names, types, header, delimiter, self.report.inputs,
                          self.options.progress, self.options.block_bytes)

    def keep(self, kind: str, users: np.ndarray, ts: Optional[np.ndarray] = None,
             window: Optional[Tuple[str, str]] = None) -> np.ndarray:
        """Which rows to import: those of sampled users (else `sampled_out`), inside the data's
        documented `window` of days (else `ts_outside_window`) and the days asked for (else
        `outside_day_range`). A dropped row is counted once, under the first reason."""
        o = self.options
        keep = np.ones(len(users), dtype=bool)
        if o.sample_users is not None:
            keep = sampled(users, o.sample_users, o.seed)
            self.report.drop("sampled_out", kind, (~keep).sum())
        if ts is not None:
            for reason, (first, last) in (("ts_outside_window", window or (None, None)),
                                          ("outside_day_range", (o.from_day, o.until))):
                inside = np.ones(len(ts), dtype=bool)
                if first:
                    inside &= ts >= _epoch_day(first) * S.SECONDS_PER_DAY
                if last:
                    inside &= ts < (_epoch_day(last) + 1) * S.SECONDS_PER_DAY
                self.report.drop(reason, kind, (keep & ~inside).sum())
                keep &= inside
        return keep

    def _seen(self, first: Column, ids: np.ndarray, days: np.ndarray, size: int) -> None:
        first.resize(size)
        np.minimum.at(first.values(), ids, days)

    def organic(self, kind: str, users: np.ndarray, ts: np.ndarray, action: np.ndarray,
                pin_keys: np.ndarray, window: Optional[Tuple[str, str]] = None,
                source_action: Optional[pa.Array] = None, **pin_columns: np.ndarray) -> None:
        """Organic actions (one row each, on the home feed): `ts` on the world's clock, `action`
        codes of `schema.Action`; `pin_columns` (source values per row) are recorded for new Pins."""
        keep = self.keep(kind, users, ts, window)
        pins = self.pins.encode(pin_keys[keep], **{k: v[keep] for k, v in pin_columns.items()})
        users, ts = self.users.encode(users[keep]), ts[keep]
        days = ts // S.SECONDS_PER_DAY
        self._seen(self._user_first, users, days, len(self.users))
        self._seen(self._pin_first, pins, days, len(self.pins))
        columns = {"user_id": users, "pin_id": pins, "action": action[keep].astype(np.int8), "ts": ts,
                   "surface": np.full(len(ts), S.Surface.HOME_FEED, dtype=np.int8)}
        if source_action is not None:
            columns["source_action"] = source_action.filter(pa.array(keep))
        self.engagements.add(days, columns)

    def ad_impressions(self, kind: str, request_id: np.ndarray, users: np.ndarray,
                       ts: np.ndarray, ad_keys: np.ndarray, surface: np.ndarray, clicked: np.ndarray,
                       window: Optional[Tuple[str, str]] = None) -> None:
        """Ad impressions of the ad Pins keyed `ad_keys`; one whose ad has no Pin is dropped
        (`ad_without_feature`). Staged per day: `finish` removes duplicates a day at a time."""
        keep = self.keep(kind, users, ts, window)
        pins, found = self.pins.lookup(ad_keys)
        self.report.drop("ad_without_feature", kind, (keep & ~found).sum())
        keep &= found
        users, pins, ts = self.users.encode(users[keep]), pins[keep], ts[keep]
        days = ts // S.SECONDS_PER_DAY
        self._seen(self._user_first, users, days, len(self.users))
        self._seen(self._pin_first, pins, days, len(self.pins))
        self.staged_ads.add(days, {"request_id": request_id[keep], "user_id": users, "pin_id": pins,
                                   "ts": ts, "surface": surface[keep].astype(np.int8),
                                   "clicked": clicked[keep].astype(np.int8)})

    # -- once the input is read -------------------------------------------------------------

    def finish(self) -> dict:
        """Everything after the input: ads deduplicated, users, pins, sequences, the metadata."""
        t0 = time.time()
        eng_rows, ad_rows = self.engagements.close(), self.staged_ads.close()
        if not eng_rows:
            raise DataError(f"no organic actions left to import (dropped: "
                            f"{json.dumps(self.report.counts()['dropped'])}); a world needs engagements")
        first, last = min([*eng_rows, *ad_rows]), max([*eng_rows, *ad_rows])
        days = list(range(first, last + 1))

        pin_cols = self._pin_columns(first)
        ads = self._write_ads(ad_rows, pin_cols) if ad_rows else {"rows": 0, "clicks": 0}
        empty = {t: d for t, d in (("engagements", self.engagements.write_days_without_events()),
                                   ("ad_events", ads.get("days_without_events", []))) if d}
        rows = {"users": self._write_users(first), "pins": self._write_pins(pin_cols),
                "engagements": sum(eng_rows.values())}
        if ad_rows:
            rows["ad_events"], rows["clicks"] = ads["rows"], ads["clicks"]
        rows["user_sequences"] = self._write_sequences(days, eng_rows, ads.get("days", {}))

        o = self.options
        sampling = {"sample_users": o.sample_users, **({"seed": o.seed} if o.sample_users else {})}
        meta = {"source": "import", "format": self.fmt, "inputs": [i.path for i in self.report.inputs],
                "clock": self.clock, "days": [day_name(d) for d in days], "rows": rows,
                **({"ctr": ads["clicks"] / ads["rows"]} if ad_rows else {}),
                "conversions": False, **sampling, **({"days_without_events": empty} if empty else {})}
        meta["world_id"] = world_id({"inputs": [i.sha256 for i in self.report.inputs],
                                     **{k: v for k, v in meta.items() if k != "inputs"}})
        (self.root / WORLD_META).write_text(json.dumps(meta, indent=2))
        tables = {"engagements": eng_rows, "ad_events": ads.get("days", {})}
        report = {"format": self.fmt, "clock": self.clock, **sampling,
                  "inputs": [asdict(i) for i in self.report.inputs], "rows": rows,
                  "days": {t: [day_name(min(r)), day_name(max(r))] for t, r in tables.items() if r},
                  **({"days_without_events": empty} if empty else {}),
                  **self.report.counts(), "finish_seconds": round(time.time() - t0, 1)}
        (self.root / REPORT).write_text(json.dumps(report, indent=2))
        return report

    def _pin_columns(self, first_day: int) -> Dict[str, np.ndarray]:
        """The contract's Pin columns that are numbered or derived at the end (over Pins in id
        order): category, advertiser, campaign, created day."""
        f, n = self.pin_fields, len(self.pins)
        is_ad = self.pins.column("is_ad") if "is_ad" in self.pins.columns else np.zeros(n, dtype=bool)

        def dense(name: Optional[str], present: np.ndarray) -> np.ndarray:
            return _dense(self.pins.column(name), present) if name else np.full(n, -1, dtype=np.int64)

        category = dense(f.category, np.ones(n, dtype=bool)) if f.category else np.zeros(n, dtype=np.int64)
        self._pin_first.resize(n)
        created = self._pin_first.values()
        return {"is_ad": is_ad, "category": category, "advertiser": dense(f.advertiser, is_ad),
                "campaign": dense(f.campaign, is_ad),
                "created": np.where(created == self._pin_first.fill, first_day, created)}

    def _write_ads(self, ad_rows: Dict[int, int], pin_cols: Dict[str, np.ndarray]) -> dict:
        """The final `ad_events`, a day at a time (memory: one day of impressions): of
        impressions repeated with the same user, time, ad and placement one is kept, the
        clicked copy where the copies disagree."""
        from tqdm import tqdm

        total = clicks = 0
        days = {}
        out = _DayFiles(self.root / "ad_events", self.options.row_group_size)
        for day in tqdm(ad_rows, desc="ad events", unit="day", disable=not self.options.progress, leave=False):
            t = pq.read_table(self.staged_ads.path(day))
            c = {k: t.column(k).to_numpy() for k in t.column_names}
            keys = (c["surface"], c["pin_id"], c["ts"], c["user_id"])
            order = np.lexsort((c["request_id"], 1 - c["clicked"], *keys))
            starts = np.ones(len(order), dtype=bool)
            starts[1:] = np.any([k[order][1:] != k[order][:-1] for k in keys], axis=0)
            group_start = np.flatnonzero(starts)
            lo = np.minimum.reduceat(c["clicked"][order], group_start)
            hi = np.maximum.reduceat(c["clicked"][order], group_start)
            self.report.drop("duplicate_impression", "ad_events", len(order) - len(group_start))
            self.report.repair("duplicate_clicks_disagree_kept_clicked", "ad_events", (lo != hi).sum())
            kept = np.sort(order[group_start])
            pin = c["pin_id"][kept]
            out.add(np.full(len(kept), day), {
                "request_id": c["request_id"][kept], "user_id": c["user_id"][kept], "pin_id": pin,
                "advertiser_id": pin_cols["advertiser"][pin], "campaign_id": pin_cols["campaign"][pin],
                "ts": c["ts"][kept], "surface": c["surface"][kept],
                "position": np.zeros(len(kept), dtype=np.int16), "clicked": c["clicked"][kept],
                "converted": np.zeros(len(kept), dtype=np.int8)})
            total += len(kept)
            clicks += int(c["clicked"][kept].sum())
            days[day] = len(kept)
        out.close()
        shutil.rmtree(self.root / ".staging")
        return {"rows": total, "clicks": clicks, "days": days,
                "days_without_events": out.write_days_without_events()}

    def _write_table(self, name: str, columns: Dict[str, pa.Array], n: int) -> int:
        rg = self.options.row_group_size
        path = self.root / name / "part-0.parquet"
        path.parent.mkdir(parents=True)
        with pq.ParquetWriter(path, pa.table(columns).schema, compression="zstd") as w:
            for a in range(0, n, rg):
                w.write_table(pa.table({k: v[a:a + rg] for k, v in columns.items()}), row_group_size=rg)
        return n

    def _write_users(self, first_day: int) -> int:
        n = len(self.users)
        self._user_first.resize(n)
        source = self.users.keys.values()
        codes = {"country": np.int32, "age_bucket": np.int8, "gender": np.int8}
        columns = {"user_id": pa.array(np.arange(n, dtype=np.int64))}
        profile: Dict[str, np.ndarray] = {}
        if self.profile is not None:
            space, contract = self.profile
            rows, found = space.lookup(source)
            self.report.repair("no_profile_codes_0", "users", (~found).sum())
            self.report.drop("profile_of_user_without_events", "user_profile", len(space) - found.sum())
            renamed = {v: k for k, v in contract.items()}
            profile = {renamed.get(name, name): np.where(found, space.column(name)[rows], 0)
                       for name in space.columns if name != "line"}
        for name, dtype in codes.items():
            columns[name] = pa.array(profile.pop(name, np.zeros(n)).astype(dtype))
        columns["signup_ds"] = _dates(self._user_first.values())
        columns["source_user_id"] = pa.array(source)
        columns.update({k: pa.array(v) for k, v in profile.items()})
        return self._write_table("users", columns, n)

    def _write_pins(self, cols: Dict[str, np.ndarray]) -> int:
        n, rg = len(self.pins), self.options.row_group_size
        content_emb = []
        for a in range(0, n, rg):  # hashed a row group at a time: [n, 32] floats stay bounded
            attrs = {name: self.pins.column(col)[a:a + rg] for name, col in self.pin_fields.content.items()}
            emb = content(attrs) if attrs else np.zeros((min(rg, n - a), S.CONTENT_DIM), np.float32)
            content_emb.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), S.CONTENT_DIM))
        columns = {
            "pin_id": pa.array(np.arange(n, dtype=np.int64)),
            "category": pa.array(cols["category"].astype(np.int32)),
            "content_emb": pa.chunked_array(content_emb, S.PINS.schema.field("content_emb").type).combine_chunks(),
            "is_ad": pa.array(cols["is_ad"]),
            "advertiser_id": _nullable(cols["advertiser"]),
            "campaign_id": _nullable(cols["campaign"]),
            "created_ds": _dates(cols["created"]),
        }
        columns.update({name: _nullable(self.pins.column(name)) for name in self.pins.columns
                        if name not in ("line", "is_ad")})
        return self._write_table("pins", columns, n)

    def _write_sequences(self, days: List[int], eng_rows: Dict[int, int], ad_rows: Dict[int, int]) -> int:
        """`user_sequences` for every day, as of its start: day D's rows (the users active on D,
        by an organic or ad event, who have history) come from the buffer before D's
        engagements are merged into it, read back in batches of `_MERGE_ROWS`."""
        from tqdm import tqdm

        buffer = SequenceBuffer(len(self.users), SEQUENCE_LENGTH)
        rg = self.options.row_group_size
        written = 0
        for day in tqdm(days, desc="user sequences", unit="day", disable=not self.options.progress, leave=False):
            files = [pq.ParquetFile(p) for p in (self.engagements.path(day) if day in eng_rows else None,
                                                 _day_file(self.root / "ad_events", day) if day in ad_rows
                                                 else None) if p]
            active = np.zeros(len(self.users), dtype=bool)
            for f in files:
                for g in range(f.num_row_groups):
                    active[f.read_row_group(g, ["user_id"]).column(0).to_numpy()] = True
            users = np.flatnonzero(active)
            path = _day_file(self.root / "user_sequences", day)
            path.parent.mkdir(parents=True)
            with pq.ParquetWriter(path, S.USER_SEQUENCES.schema, compression="zstd") as w:
                for a in range(0, len(users), rg):
                    table = buffer.rows(users[a:a + rg])
                    if table.num_rows:
                        w.write_table(table, row_group_size=rg)
                        written += table.num_rows
            if day in eng_rows:  # merged in batches of whole row groups, fewer merges of the held
                columns = ["user_id", "pin_id", "action", "ts"]
                for t in files[0].iter_batches(batch_size=_MERGE_ROWS, columns=columns):
                    buffer.append(*(t.column(k).to_numpy() for k in columns))
        return written
