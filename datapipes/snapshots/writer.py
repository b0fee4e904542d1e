"""Writing a snapshot version so that a reader sees all of it or none of it.

Every rank of a run writes its parts into one hidden folder, `<root>/.<version>.tmp-<run id>`
(the launcher's run id, so all ranks agree on it; the process id when run alone). Once every
part is there, one process builds the ad indexes and commits: the sha256 of every file goes into
the manifest, the manifest is written, the folder is renamed into place, and LATEST is written
last (beside, then renamed). A run that dies before the commit leaves only the hidden folder
(which `gc` clears) and the old LATEST.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from derl.datapipes.snapshots.index import build_ads_index
from derl.datapipes.snapshots.parts import part_name
from derl.datapipes.snapshots.store import LATEST, MANIFEST, SnapshotError, sha256


class SnapshotWriter:
    """Version `version` of dimension `dim` under `root`, being written in `folder`."""

    def __init__(self, root: Path, version: str, dim: int, run_id: Optional[str] = None):
        self.root, self.version, self.dim = Path(root), version, dim
        run_id = run_id or os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
        self.folder = self.root / f".{version}.tmp-{run_id}"
        self.final = self.root / version

    def prepare(self) -> "SnapshotWriter":
        """An empty `folder` (one process, before any rank writes into it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return self

    def part(self, domain: str, entity: str, rank: int) -> Path:
        """Where `rank` writes its part of the (domain, entity) table."""
        return self.folder / domain / entity / part_name(rank)

    def ads_index(self, domain: str, ad_ids: np.ndarray, prior: Optional[np.ndarray] = None) -> Dict[str, object]:
        """The domain's ad index over the sorted `ad_ids`, from its Pin parts (all written)."""
        return build_ads_index(self.folder / domain, ad_ids, self.dim, self.version, prior)

    def commit(self, manifest: dict, replace: bool = False) -> dict:
        """Publish the version: `manifest` with its version first and the sha256 of every file
        last, renamed into place (over an existing version only with `replace`), then LATEST.
        Returns the manifest as written."""
        files = {str(p.relative_to(self.folder)): sha256(p) for p in sorted(self.folder.rglob("*")) if p.is_file()}
        manifest = {"version": self.version, **manifest, "files": files}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if self.final.exists():
            if not replace:
                raise SnapshotError(f"{self.final}: version exists; pass --overwrite to replace it")
            shutil.rmtree(self.final)
        self.folder.rename(self.final)
        latest = self.root / f".{LATEST}.tmp"
        latest.write_text(self.version + "\n")
        latest.rename(self.root / LATEST)
        return manifest
