"""User sequences: the last L positive engagements of each user, kept and materialised.

The world generator writes `user_sequences/ds=d` for the users active on day d. Export needs
every user's sequence as of a cut day, active that day or not: `sequences_as_of` replays the
engagement log before the cut through the same `SequenceBuffer`, for the users it is given.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from derl.datapipes import schema as S
from derl.datapipes.sources import IdIndex, SourceTables, read_checked


class SequenceBuffer:
    """Each user's last L positive engagements, right-aligned with -1 padding on the left.

    Users are row positions 0..n-1 (the world's dense user ids, or positions in an id list)."""

    def __init__(self, num_users: int, length: int):
        self.pin = np.full((num_users, length), -1, dtype=np.int64)
        self.action = np.zeros((num_users, length), dtype=np.int8)
        self.ts = np.zeros((num_users, length), dtype=np.int64)
        self.length = length

    def rows(self, users: np.ndarray, ids: Optional[np.ndarray] = None) -> pa.Table:
        """The sequences of rows `users` as a user_sequences table, with `ids[users]` (default:
        the rows themselves) as user_id; users with no history are omitted."""
        pin, action, ts = self.pin[users], self.action[users], self.ts[users]
        valid = pin >= 0
        counts = valid.sum(axis=1)
        keep = counts > 0
        offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int32)
        mask = valid[keep]
        return pa.table(
            {
                "user_id": pa.array((users if ids is None else ids[users])[keep].astype(np.int64)),
                "seq_pin_id": pa.ListArray.from_arrays(offsets, pa.array(pin[keep][mask])),
                "seq_action": pa.ListArray.from_arrays(offsets, pa.array(action[keep][mask])),
                "seq_ts": pa.ListArray.from_arrays(offsets, pa.array(ts[keep][mask])),
            },
            schema=S.USER_SEQUENCES.schema,
        )

    def append(self, user: np.ndarray, pin: np.ndarray, action: np.ndarray, ts: np.ndarray) -> None:
        """Merge events (any order) into the users' histories by timestamp, stable (held events
        before new ones on a tie, new ones in their given order) and keep the newest L per user,
        oldest first. Merging, not appending, lets a day arrive in chunks that are not in time
        order (an import reads a day's partition row group by row group)."""
        L = self.length
        users, row_new = np.unique(user, return_inverse=True)
        held_pin = self.pin[users]
        held = held_pin >= 0  # [A, L], each row's held events already in time order
        row = np.concatenate([np.nonzero(held)[0], row_new.reshape(-1)])
        all_pin = np.concatenate([held_pin[held], pin])
        all_action = np.concatenate([self.action[users][held], action])
        all_ts = np.concatenate([self.ts[users][held], ts])
        # By (user row, ts), stable: held first, then the new in their order. One int64 key
        # sorts several times faster than lexsort where the ts span fits in 32 bits.
        span = int(all_ts.max() - all_ts.min()) if len(all_ts) else 0
        if span < 2 ** 32 and len(users) < 2 ** 31:
            order = np.argsort((row << 32) | (all_ts - all_ts.min()), kind="stable")
        else:
            order = np.lexsort((all_ts, row))
        row, all_pin, all_action, all_ts = row[order], all_pin[order], all_action[order], all_ts[order]
        # Place each user's newest <= L events right-aligned into an [A, L] block.
        ends = np.cumsum(np.bincount(row, minlength=len(users)))
        rank_from_end = ends[row] - np.arange(len(row)) - 1
        take = rank_from_end < L
        row, col = row[take], L - 1 - rank_from_end[take]
        new_pin = np.full((len(users), L), -1, dtype=np.int64)
        new_action = np.zeros((len(users), L), dtype=np.int8)
        new_ts = np.zeros((len(users), L), dtype=np.int64)
        new_pin[row, col], new_action[row, col], new_ts[row, col] = all_pin[take], all_action[take], all_ts[take]
        self.pin[users], self.action[users], self.ts[users] = new_pin, new_action, new_ts


def sequences_as_of(sources: SourceTables, day: str, length: int, users: np.ndarray) -> pa.Table:
    """The user_sequences rows `users` would have on `day`: each one's last `length`
    engagements other than plain impressions, strictly before the day's start."""
    index = IdIndex(users, sources.root / "users", "user_id")
    buffer = SequenceBuffer(len(users), length)
    before = [d for d in sources.days("engagements") if d < day]
    if before:
        for d, path in sources.files("engagements", (before[0], before[-1])):
            t = read_checked(path, S.ENGAGEMENTS, columns=["user_id", "pin_id", "action", "ts"], day=d)
            t = t.filter(pc.not_equal(t.column("action"), S.Action.IMPRESSION))
            row, found = index.rows(t.column("user_id").to_numpy())
            if found.any():
                buffer.append(row[found], t.column("pin_id").to_numpy()[found],
                              t.column("action").to_numpy()[found], t.column("ts").to_numpy()[found])
    return buffer.rows(np.arange(len(users)), ids=users)
