"""The snapshot root on disk: its layout, its versions, their verification, pins and clean-up.

Everything here works on files and manifests only (no vectors in memory): what `derl snapshots
list / verify / gc` needs, what the reader checks before it opens a version, and what the writer
fills in when it commits one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyarrow.parquet as pq

from derl.datapipes.snapshots.parts import embedding_type, part_paths, stored_type

MANIFEST = "manifest.json"
LATEST = "LATEST"
ENTITIES = ("users", "pins")
ADS_INDEX = "ads.faiss"
ADS_IDS = "ads_ids.parquet"
PINS = "pins"  # <root>/pins/<owner>.json: {"version": ..., "owner": ...}


class SnapshotError(ValueError):
    """A snapshot that is missing, incomplete, tampered with, or of the wrong shape."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions(root: Path) -> List[str]:
    """Complete versions under `root` (folders with a manifest), oldest first."""
    return sorted(p.name for p in Path(root).iterdir() if (p / MANIFEST).is_file()) if Path(root).is_dir() else []


def latest(root: Path) -> Optional[str]:
    """The version LATEST names, or None without a LATEST file."""
    path = Path(root) / LATEST
    return path.read_text().strip() if path.is_file() else None


def resolve(root: Path, version: Optional[str] = None) -> Path:
    """The folder of `version`, or of the one LATEST names."""
    root = Path(root)
    if version is None:
        version = latest(root)
        if version is None:
            raise SnapshotError(f"{root}: no {LATEST} file, so no complete snapshot")
    path = root / version
    if not (path / MANIFEST).is_file():
        raise SnapshotError(f"{path}: no such snapshot version (no {MANIFEST})")
    return path


def verify(path: Path) -> dict:
    """Check a snapshot folder against its manifest; return the manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path / MANIFEST}: unreadable manifest ({e})") from e
    listed = manifest.get("files", {})
    for rel, digest in listed.items():
        f = path / rel
        if not f.is_file():
            raise SnapshotError(f"{path}: manifest names {rel}, which is not there")
        if sha256(f) != digest:
            raise SnapshotError(f"{f}: checksum mismatch (manifest {digest[:12]}…): the file changed")
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise SnapshotError(f"{path}: files not in the manifest: {', '.join(extra[:5])}")
    dim = manifest["dim"]
    for domain, info in manifest["domains"].items():
        for entity in ENTITIES:
            for part in part_paths(path / domain / entity):
                got = stored_type(part)
                if got != embedding_type(dim):
                    raise SnapshotError(f"{part}: embedding type {got}, manifest says dimension {dim}")
        ids = pq.read_metadata(path / domain / ADS_IDS).num_rows
        if ids != info["rows"]["ads"]:
            raise SnapshotError(f"{path / domain}: ads_ids has {ids} rows, manifest says {info['rows']['ads']}")
    return manifest


def cut_days(root: Path) -> List[Tuple[str, str]]:
    """(cut day, version) of every complete version, by cut day."""
    out = []
    for v in versions(root):
        manifest = json.loads((Path(root) / v / MANIFEST).read_text())
        out.append((manifest["cut_day"], v))
    return sorted(out)


def pin(root: Path, version: str, owner: str) -> Path:
    """Record that `owner` (e.g. a downstream model) depends on `version`: gc keeps it."""
    resolve(root, version)
    folder = Path(root) / PINS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(owner.encode()).hexdigest()[:16]}.json"
    path.write_text(json.dumps({"version": version, "owner": owner}))
    return path


def pinned(root: Path) -> Dict[str, List[str]]:
    """version -> owners that pin it."""
    out: Dict[str, List[str]] = {}
    for f in sorted((Path(root) / PINS).glob("*.json")):
        p = json.loads(f.read_text())
        out.setdefault(p["version"], []).append(p["owner"])
    return out


def gc(root: Path, keep: int, dry_run: bool = False) -> Dict[str, List[str]]:
    """Remove all but the `keep` newest versions, never LATEST nor a pinned one, and the
    leftovers of killed exports (hidden `.*.tmp-*` folders)."""
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    root = Path(root)
    all_versions = versions(root)
    current = latest(root)
    protected = set(all_versions[-keep:]) | set(pinned(root)) | ({current} if current else set())
    removed = [v for v in all_versions if v not in protected]
    leftovers = sorted(p.name for p in root.glob(".*.tmp-*") if p.is_dir())
    if not dry_run:
        for name in removed + leftovers:
            shutil.rmtree(root / name)
    return {"removed": removed, "kept": [v for v in all_versions if v in protected],
            "pinned": sorted(set(pinned(root)) & set(all_versions)), "leftovers_removed": leftovers}
