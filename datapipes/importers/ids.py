"""Dense id spaces and the two hashes of an import: user sampling and hashed content vectors.

Every id space (users, Pins, categories, advertisers, campaigns) is remapped to 0..n-1 in order
of first appearance, so that embedding tables are sized by what exists, not by the largest raw
id (UserBehavior's item ids reach 5M). All of it is vectorised over a block of rows: a sorted key
array searched with `searchsorted`, `np.unique` per block, never a loop over rows.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Tuple

import numpy as np

from derl.datapipes import schema as S

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _name_hash(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def sampled(users: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep mask: a user is kept iff a hash of (seed, original user id) falls below `fraction`,
    so the same users are kept in every file and on every run with that seed."""
    salt = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    h = splitmix64(users.astype(np.int64).view(np.uint64) ^ salt) >> np.uint64(11)  # 53 bits
    return h < np.uint64(int(fraction * 2.0 ** 53))


def attribute_vectors(name: str, values: np.ndarray) -> np.ndarray:
    """[n, CONTENT_DIM] fixed pseudo-random unit vectors, one per (attribute name, value): the
    Gaussian directions of feature hashing, the same for a value wherever it occurs."""
    seed = splitmix64(values.astype(np.int64).view(np.uint64) ^ _name_hash(name))
    half = S.CONTENT_DIM // 2
    counter = np.arange(1, S.CONTENT_DIM + 1, dtype=np.uint64) * _GOLDEN
    bits = splitmix64(seed[:, None] + counter[None, :]) >> np.uint64(11)
    u = bits.astype(np.float64) / 2.0 ** 53
    radius = np.sqrt(-2.0 * np.log(1.0 - u[:, :half]))  # Box-Muller; 1 - u lies in (0, 1]
    angle = 2.0 * np.pi * u[:, half:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def content(attributes: Dict[str, np.ndarray]) -> np.ndarray:
    """Each row's content: the normalised sum of its attribute values' vectors (a value of -1 is
    absent); zeros for a row with none."""
    n = len(next(iter(attributes.values()))) if attributes else 0
    total = np.zeros((n, S.CONTENT_DIM), dtype=np.float32)
    for name, values in attributes.items():
        present = values >= 0
        distinct, inverse = np.unique(values[present], return_inverse=True)
        total[present] += attribute_vectors(name, distinct)[inverse]
    norm = np.linalg.norm(total, axis=1, keepdims=True)
    return np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)


def pair_key(a: np.ndarray, b: np.ndarray, block, columns: Tuple[str, str]) -> np.ndarray:
    """One non-negative int64 key for a pair of ids, each below 2**31 (else a DataError naming
    the line of the first too large)."""
    for values, column in ((a, columns[0]), (b, columns[1])):
        big = np.flatnonzero(values >= 2 ** 31)
        if len(big):
            raise block.error(big[0], f"column {column!r}: {values[big[0]]} is too large for a "
                                      f"pair key (at most {2 ** 31 - 1})")
    return (a.astype(np.int64) << 31) | b.astype(np.int64)


_FILL = {"i": -1, "u": 0, "f": np.nan, "b": False}


class Column:
    """A growable numpy column (amortised doubling)."""

    def __init__(self, dtype: np.dtype, length: int = 0, fill=None):
        self.dtype = np.dtype(dtype)
        self.fill = _FILL[self.dtype.kind] if fill is None else fill
        self.data = np.full(max(length, 16), self.fill, dtype=self.dtype)
        self.n = length

    def extend(self, values: np.ndarray) -> None:
        start = self.n
        self.resize(start + len(values))
        self.data[start:self.n] = values

    def resize(self, n: int) -> None:
        if n > len(self.data):
            grown = np.full(max(n, 2 * len(self.data)), self.fill, dtype=self.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.n = n

    def values(self) -> np.ndarray:
        return self.data[:self.n]


class IdSpace:
    """Source keys -> dense ids 0..n-1, numbered in order of first appearance (first appearance
    by row, so the numbering does not depend on how the input is cut into blocks), with columns
    of per-id values recorded from each id's first row (`encode(keys, name=values)`)."""

    def __init__(self):
        self._sorted = np.empty(0, dtype=np.int64)  # the keys, sorted
        self._ids = np.empty(0, dtype=np.int64)  # the id of each sorted key
        self.keys = Column(np.int64)  # the keys in id order
        self.columns: Dict[str, Column] = {}

    def __len__(self) -> int:
        return self.keys.n

    def lookup(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, found): ids are -1 where a key is not in the space."""
        if not len(self._sorted):
            return np.full(len(keys), -1, dtype=np.int64), np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        found = self._sorted[pos] == keys
        return np.where(found, self._ids[pos], -1), found

    def encode(self, keys: np.ndarray, **columns) -> np.ndarray:
        """The ids of `keys`, numbering keys not seen before; `columns` (arrays per row, or
        scalars) record values for the new ids from their first row."""
        keys = np.asarray(keys, dtype=np.int64)
        distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        ids, found = self.lookup(distinct)
        new = np.flatnonzero(~found)
        by_appearance = new[np.argsort(first[new], kind="stable")]
        ids[by_appearance] = len(self) + np.arange(len(new))
        if len(new):
            rows = first[by_appearance]
            for name, values in columns.items():
                values = np.asarray(values)
                if name not in self.columns:
                    self.columns[name] = Column(values.dtype, len(self))
                self.columns[name].extend(values[rows] if values.ndim else np.full(len(rows), values))
            self.keys.extend(distinct[by_appearance])
            for column in self.columns.values():
                column.resize(len(self))  # columns not given fill for the new ids
            at = np.searchsorted(self._sorted, distinct[new])
            self._sorted = np.insert(self._sorted, at, distinct[new])
            self._ids = np.insert(self._ids, at, ids[new])
        return ids[inverse.reshape(-1)]

    def add_unique(self, keys: np.ndarray, block, rows: np.ndarray, what: str, **columns) -> np.ndarray:
        """`encode` for the rows of a table keyed by `what`, at block rows `rows`: a key on a
        second row is a DataError naming both lines (the space records each key's `line`)."""
        distinct, first, counts = np.unique(keys, return_index=True, return_counts=True)
        _, seen = self.lookup(distinct)
        if seen.any():
            row = first[np.flatnonzero(seen)[0]]
            earlier = self.column("line")[self.lookup(keys[row:row + 1])[0][0]]
            raise block.error(rows[row], f"{what} {keys[row]} repeats line {earlier}")
        if (counts > 1).any():
            twice = np.flatnonzero(keys == distinct[np.flatnonzero(counts > 1)[0]])
            raise block.error(rows[twice[1]], f"{what} {keys[twice[0]]} repeats line "
                                              f"{block.line(rows[twice[0]])}")
        return self.encode(keys, line=block.first_line + rows, **columns)

    def column(self, name: str) -> np.ndarray:
        """The values of a recorded column, in id order (its fill where none was recorded)."""
        return self.columns[name].values()
