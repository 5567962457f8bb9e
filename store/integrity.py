"""What a training command checks before it reads a feature set (fit, evaluate, ablate), and the
one definition of a non-finite video that the reader, this check and `faster verify` share.

* Every shard that a manifest lists must still have the listed size and sha256: a shard changed
  after it was written is an error naming it (or, with ``skip_bad``, left out with a warning).
  sha256 is computed once per file and cached by path, size and mtime (``files.user_cache``).
* With ``skip_bad``, videos whose features hold NaN or inf are found up front (one read of each
  shard, cached the same way) and left out with a warning naming them. Without it the reader
  finds them as it reads (store.reader) and stops with an error naming the shard and the video.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def finite(values: np.ndarray) -> bool:
    """Whether every value is finite (no NaN, no inf): the test the reader, ``check`` and verify apply."""
    return bool(np.isfinite(values).all())


def nonfinite_videos(features: Any, ids: Sequence[str]) -> list[str]:
    """The ids of the videos (rows) of ``features``, an h5py ``/features/<model>`` dataset, whose
    values are not all finite; read one video at a time, so memory stays at one video."""
    return [ids[i] for i in range(features.shape[0]) if not finite(features[i])]


def nonfinite_message(shard: str | Path, video: str, model: str) -> str:
    """The one-line description of a damaged video, as the reader and ``check`` report it."""
    return f"{shard}: video {video!r} has non-finite {model} features"


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
            schema.require_filters(ds, f"{path}: features/{model}")  # zstd/lz4: import hdf5plugin first
            bad = nonfinite_videos(ds, ids)
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
                            msg = nonfinite_message(shard, i, model)
                            log.warning("%s: left out (--skip-bad)", msg)
                            found.bad_videos.append(i)
                            found.problems.append(msg)
    finally:
        cache.save()
    found.bad_videos = sorted(set(found.bad_videos))
    return found
