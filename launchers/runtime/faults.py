"""Fault injection for the tests, through one hook.

`DERL_FAULT=<point>[:<n>]` in a stage's environment makes its last rank kill itself (SIGKILL,
no clean-up, as a lost host would) when it reaches `point` for the n-th time (default: the
first). `DERL_FAULT=<point>:<n>:INT` presses Ctrl-C there instead: SIGINT to the whole
process group, as a terminal sends it (start the stage in a session of its own). The stages
name their points: `upstream-step` after each training step, `export-parts` once every part
of a snapshot is written, and the snapshot commit's filesystem steps (`snapshot-manifest`,
`snapshot-in-place`, `snapshot-latest-beside`, `snapshot-latest`, `snapshot-old-removed`;
datapipes/snapshots/writer.py). A process that is not one of several ranks (the commit runs in
rank 0 alone) calls `reached(point)`: it is its own last rank. Unset, `reached` is a dictionary
lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_PLAN = os.environ.get("DERL_FAULT", "")
_seen: Counter = Counter()


def reached(point: str, rank: int = 0, world_size: int = 1) -> None:
    if not _PLAN:
        return
    name, n, how = (_PLAN.split(":") + ["", ""])[:3]
    if name != point or rank != world_size - 1:
        return
    _seen[point] += 1
    if _seen[point] == int(n or 1):
        if how == "INT":
            os.killpg(0, signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
