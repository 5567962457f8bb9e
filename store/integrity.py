"""What a training command checks before it reads a feature set (fit, evaluate, ablate).

* Every shard that a manifest lists must still have the listed size and sha256: a shard changed
  after it was written is an error naming it (or, with ``skip_bad``, left out with a warning).
  sha256 is computed once per file and cached by path, size and mtime (``files.user_cache``).
* With ``skip_bad``, videos whose features hold NaN or inf are found up front (one read of each
  shard, cached the same way) and left out with a warning naming them. Without it the reader
  finds them as it reads (store.reader) and stops with an error naming the shard and the video.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from faster.errors import BadFile
from faster.store import schema
from faster.store.files import ChecksumCache, read_json, user_cache

log = logging.getLogger(__name__)


@dataclass
class Integrity:
    """What ``check`` found and left out."""

    bad_shards: list[str] = field(default_factory=list)  # paths left out (skip_bad)
    bad_videos: list[str] = field(default_factory=list)  # ids left out (skip_bad)
    problems: list[str] = field(default_factory=list)  # one line per shard or video left out


def _listed(directory: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted(directory.glob("manifest*.json")):
        try:
            m = read_json(path)
        except ValueError:
            continue
        for entry in (m or {}).get("shards", []) if isinstance(m, dict) else []:
            if isinstance(entry, dict) and entry.get("name") and entry.get("sha256"):
                found[entry["name"]] = entry
    return found


def _nonfinite_ids(path: Path) -> dict[str, list[str]]:
    """Per model, the ids of the videos whose features are not all finite (one video read at a time)."""
    import h5py

    out: dict[str, list[str]] = {}
    with h5py.File(path, "r") as f:
        ids = list(f["videos/id"].asstr()[()])
        for model, ds in f["features"].items():
            bad = [ids[i] for i in range(ds.shape[0]) if not np.isfinite(ds[i]).all()]
            if bad:
                out[model] = bad
    return out


def check(dirs: Iterable[str | Path], *, skip_bad: bool = False, models: Iterable[str] | None = None,
          cache: ChecksumCache | None = None) -> Integrity:
    """Check the shards of ``dirs`` against their manifests (and, with ``skip_bad``, find the videos
    with non-finite features of ``models``); BadFile naming the first bad shard unless ``skip_bad``."""
    cache = cache or user_cache()
    models = None if models is None else set(models)
    found = Integrity()
    try:
        for d in dirs:
            d = Path(d)
            listed = _listed(d)
            for shard in sorted(d.glob(schema.SHARD_GLOB)):
                entry = listed.get(shard.name)
                why = None
                if entry is not None:
                    size = shard.stat().st_size
                    if entry.get("bytes") not in (None, size):
                        why = f"{size} bytes, its manifest lists {entry['bytes']}"
                    elif cache.sha256(shard) != entry["sha256"]:
                        why = "sha256 differs from the one its manifest lists"
                if why:
                    msg = f"{shard}: changed after it was written ({why}); `faster verify {d}` shows what is wrong"
                    if not skip_bad:
                        raise BadFile(msg)
                    log.warning("%s: left out (--skip-bad)", msg)
                    found.bad_shards.append(str(shard))
                    found.problems.append(msg)
                    continue
                if skip_bad:
                    for model, ids in cache.value(shard, "nonfinite", _nonfinite_ids).items():
                        if models is not None and model not in models:
                            continue
                        for i in ids:
                            msg = f"{shard}: video {i!r} has non-finite {model} features"
                            log.warning("%s: left out (--skip-bad)", msg)
                            found.bad_videos.append(i)
                            found.problems.append(msg)
    finally:
        cache.save()
    found.bad_videos = sorted(set(found.bad_videos))
    return found
