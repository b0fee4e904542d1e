"""Loading interaction sequences and the leave-one-out split.

    seqs = load(path)            # any of FORMATS, detected from the content
    split = Split(seqs)          # users with at least 3 items

Formats (`detect_format`):
- `seq-lines`: one line per user, `user item1 item2 ...`, items in time order (the S3-Rec data:
  Amazon Beauty, Sports_and_Outdoors);
- `recbole`: RecBole's atomic `.inter` file, tab-separated, a header of `name:type` fields
  (`user_id:token`, `item_id:token`, `timestamp:float`; other columns ignored);
- `ml-100k`: MovieLens-100K `u.data`, `user item rating timestamp`, tab-separated, no header;
- `ml-1m`: MovieLens-1M `ratings.dat`, `user::item::rating::timestamp`.
From interaction files a user's items are ordered by timestamp, ties by file order (a stable
sort); every interaction counts (no rating threshold). Item ids: kept when they are positive
integers that fill at least half of 1..max (the S3-Rec files are 1..N already), otherwise
remapped to 1..N by first appearance. Id 0 is padding everywhere.

The split (the protocol of the published tables): per user, the last item is the test target,
the one before it the validation target, the rest the training sequence. Validation sees the
training items as history; test sees training + validation items. A stage's history fed to a
model is its last `max_len` items; the items removed from the ranking are all earlier items
of the user (not only the last max_len).

Sequences are held as CSR (offsets, items) int64 tensors; every per-user operation below is
a vectorised gather, no Python loop over users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

FORMATS = ("seq-lines", "recbole", "ml-100k", "ml-1m")
EVAL_SPLITS = ("val", "test")
MIN_ITEMS = 3  # one training item, the validation and the test target


@dataclass
class Sequences:
    """Every user's items in time order, as CSR: user u's items are items[offsets[u]:offsets[u+1]]."""

    offsets: torch.Tensor  # int64 [U + 1]
    items: torch.Tensor  # int64 [total], ids in 1..n_items
    n_items: int
    fmt: str = "seq-lines"
    dropped_users: int = 0  # users with fewer than MIN_ITEMS items (Split leaves them out)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_lists(cls, seqs: List[List[int]], n_items: int = 0, fmt: str = "seq-lines") -> "Sequences":
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        items = torch.tensor([i for s in seqs for i in s], dtype=torch.long)
        n = max(n_items, int(items.max()) if len(items) else 0)
        return cls(offsets, items, n, fmt)

    def to_lists(self) -> List[List[int]]:
        o = self.offsets.tolist()
        it = self.items.tolist()
        return [it[o[u]:o[u + 1]] for u in range(self.n_users)]


def detect_format(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = [line.rstrip("\n") for _, line in zip(range(50), f) if line.strip()]
    if not head:
        raise ValueError(f"{path}: empty")
    first = head[0]
    if "::" in first:
        return "ml-1m"
    if "\t" in first and any(":" in field for field in first.split("\t")):
        return "recbole"
    fields = [line.split("\t") for line in head]
    if all(len(f) == 4 for f in fields) and all(x.strip().lstrip("-").replace(".", "", 1).isdigit()
                                               for f in fields for x in f):
        return "ml-100k"
    return "seq-lines"


def load(path: Path, fmt: str = "auto") -> Sequences:
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "seq-lines":
        users, lists = [], []
        with open(path) as f:
            for line in f:
                tok = line.split()
                if len(tok) >= 2:
                    users.append(tok[0])
                    lists.append(tok[1:])
        flat = [i for s in lists for i in s]
        ids, n_items = _item_ids(flat)
        lengths = np.array([len(s) for s in lists], dtype=np.int64)
        return _sequences(np.repeat(np.arange(len(lists)), lengths), ids, None, n_items, fmt)
    if fmt == "recbole":
        with open(path) as f:
            header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
            col = {name: i for i, name in enumerate(header)}
            missing = {"user_id", "item_id"} - set(col)
            if missing:
                raise ValueError(f"{path}: RecBole header lacks {sorted(missing)}")
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        users = [r[col["user_id"]] for r in rows]
        items = [r[col["item_id"]] for r in rows]
        ts = [float(r[col["timestamp"]]) for r in rows] if "timestamp" in col else None
    else:
        sep = "::" if fmt == "ml-1m" else None
        with open(path) as f:
            rows = [line.strip().split(sep) for line in f if line.strip()]
        users = [r[0] for r in rows]
        items = [r[1] for r in rows]
        ts = [float(r[3]) for r in rows]
    user_idx = _first_appearance(users)
    ids, n_items = _item_ids(items)
    return _sequences(user_idx, ids, None if ts is None else np.asarray(ts), n_items, fmt)


def _first_appearance(tokens: List[str]) -> np.ndarray:
    index: Dict[str, int] = {}
    return np.fromiter((index.setdefault(t, len(index)) for t in tokens), dtype=np.int64, count=len(tokens))


def _item_ids(tokens: List[str]) -> Tuple[np.ndarray, int]:
    """Item tokens -> ids in 1..N (kept if dense positive integers, else by first appearance)."""
    try:
        ids = np.asarray([int(t) for t in tokens], dtype=np.int64)
        if len(ids) and ids.min() >= 1 and ids.max() <= 2 * len(np.unique(ids)):
            return ids, int(ids.max())
    except ValueError:
        pass
    ids = _first_appearance(tokens) + 1
    return ids, int(ids.max()) if len(ids) else 0


def _sequences(users: np.ndarray, items: np.ndarray, ts, n_items: int, fmt: str) -> Sequences:
    """Group interactions by user (users in first-appearance order), in time order, ties by file order."""
    order = np.arange(len(users))
    if ts is not None:
        order = order[np.argsort(ts, kind="stable")]
    order = order[np.argsort(users[order], kind="stable")]
    users, items = users[order], items[order]
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    keep_user = counts >= MIN_ITEMS
    keep = keep_user[users]
    counts = counts[keep_user]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return Sequences(torch.from_numpy(offsets), torch.from_numpy(items[keep].copy()), n_items, fmt,
                     dropped_users=int((~keep_user).sum()))


class Split:
    """The leave-one-out split of `seqs` (users with fewer than MIN_ITEMS items left out)."""

    def __init__(self, seqs: Sequences) -> None:
        lengths = seqs.lengths
        if (lengths < MIN_ITEMS).any():
            keep = (lengths >= MIN_ITEMS).nonzero().squeeze(1).tolist()
            lists = seqs.to_lists()
            seqs = Sequences.from_lists([lists[u] for u in keep], seqs.n_items, seqs.fmt)
        self.seqs = seqs
        self.n_items = seqs.n_items
        self.n_users = seqs.n_users
        self.offsets, self.items = seqs.offsets, seqs.items
        self.start = self.offsets[:-1]
        end = self.offsets[1:]
        # The end (exclusive) of each stage's history: train ends before validation's target.
        self.ends = {"train": end - 2, "val": end - 2, "test": end - 1}
        self.targets = {"val": self.items[end - 2], "test": self.items[end - 1]}
        self.train_len = self.ends["train"] - self.start

    # -- windows ----------------------------------------------------------------------------

    def window(self, end: torch.Tensor, width: int, users: torch.Tensor = None) -> torch.Tensor:
        """[len(users), width]: each user's last `width` items before `end`, right-aligned, 0-padded."""
        users = torch.arange(self.n_users) if users is None else users
        e = end[users]
        idx = e[:, None] - width + torch.arange(width)[None, :]
        ok = idx >= self.start[users][:, None]
        return torch.where(ok, self.items[idx.clamp(min=0)], torch.zeros((), dtype=torch.long))

    def history(self, stage: str, max_len: int, users: torch.Tensor = None) -> torch.Tensor:
        """A stage's model input: the last max_len items before its target."""
        return self.window(self.ends[stage], max_len, users)

    def train_windows(self, max_len: int) -> torch.Tensor:
        """[U, max_len + 1]: the last max_len + 1 training items; inputs [:, :-1], targets [:, 1:]."""
        return self.window(self.ends["train"], max_len + 1)

    def seen(self, stage: str, users: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, items): every item of users[row] before the stage's target (the whole history)."""
        s, e = self.start[users], self.ends[stage][users]
        n = e - s
        rows = torch.repeat_interleave(torch.arange(len(users)), n)
        first = torch.repeat_interleave(s - torch.cumsum(n, 0) + n, n)
        return rows, self.items[first + torch.arange(int(n.sum()))]

    # -- training statistics ----------------------------------------------------------------

    def train_items(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(users, items) of every training interaction."""
        users = torch.arange(self.n_users)
        return self.seen("train", users)

    def train_counts(self) -> torch.Tensor:
        """[n_items + 1] training-interaction count per item (index 0: padding, 0)."""
        return torch.bincount(self.train_items()[1], minlength=self.n_items + 1)

    def stats(self) -> Dict[str, int]:
        return {"users": self.n_users, "items": self.n_items, "interactions": int(len(self.items)),
                "train_interactions": int(self.train_len.sum()),
                "train_positions": int((self.train_len - 1).clamp(min=0).sum()),
                "dropped_users": self.seqs.dropped_users}
