"""Interleaving readers in fixed proportions, deterministically by step, for ever.

An upstream domain trains on more than one table (engagement: organic engagements and ad
clicks; conversion: ad conversions with organic saves as auxiliary tasks). Which reader feeds
step i is a pure function of i (smooth weighted round robin), and each reader's position is
(epoch, batches into the epoch), so a resumed run continues with exactly the batch it would
have seen.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from derl.datapipes.batch import Batch
from derl.datapipes.readers import ExampleReader


class MixedStream:
    def __init__(self, readers: Sequence[ExampleReader], shares: Sequence[float]):
        if len(readers) != len(shares) or not readers:
            raise ValueError("one share per reader, at least one reader")
        self.readers = list(readers)
        self.shares = np.asarray(shares, dtype=np.float64) / float(np.sum(shares))
        self.per_epoch = []
        for r in self.readers:
            n = r.num_rows // r.config.batch_size if r.config.drop_last else -(-r.num_rows // r.config.batch_size)
            if n == 0:
                raise ValueError(
                    f"{r.table} on rank {r.rank} has {r.num_rows} rows, fewer than one batch of "
                    f"{r.config.batch_size}"
                )
            self.per_epoch.append(n)

    def _picks(self) -> Iterator[int]:
        """Reader of step 0, 1, 2, ...: each step goes to the reader most owed its share."""
        credit = np.zeros(len(self.readers))
        while True:
            credit += self.shares
            j = int(np.argmax(credit))
            credit[j] -= 1.0
            yield j

    def positions(self, step: int) -> List[Tuple[int, int]]:
        """(epoch, batches into it) of each reader after `step` steps."""
        picks = np.fromiter(itertools.islice(self._picks(), step), dtype=np.int64, count=step)
        used = np.bincount(picks, minlength=len(self.readers))
        return [divmod(int(u), n) for u, n in zip(used, self.per_epoch)]

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        streams = [self._cycle(r, e, s) for r, (e, s) in zip(self.readers, self.positions(start_step))]
        try:
            for j in itertools.islice(self._picks(), start_step, None):
                yield next(streams[j])
        finally:
            for s in streams:
                s.close()

    @staticmethod
    def _cycle(reader: ExampleReader, epoch: int, skip: int) -> Iterator[Batch]:
        while True:
            yield from reader.batches(epoch, skip)
            epoch, skip = epoch + 1, 0
