"""What a training command checks before it reads a feature set (fit, evaluate, ablate), and the
one definition of a non-finite video that the reader, this check and `faster verify` share.

* Every shard that a manifest lists must still have the listed size and sha256: a shard changed
  after it was written is an error naming it (or, with ``skip_bad``, left out with a warning).
  Every listing counts (the part manifest and the merged ``manifest.json``): a shard agreeing with
  one and not the other is changed. sha256 is computed once per file and cached by path, size and
  mtime (``files.user_cache``).
* A shard a manifest lists that is not in the directory is an error naming it (``skip_bad``: a
  warning; the set is read without its videos). A manifest that cannot be read is an error naming
  it (``skip_bad``: a warning, and the shards of that part are left out), never a silent skip of
  the checks it carries.
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


@dataclass
class Listings:
    """What the manifests of one directory say about its shards."""

    entries: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)  # shard name -> (manifest, entry)
    unreadable: dict[str, str] = field(default_factory=dict)  # manifest file name -> why it cannot be read
    readable: set[str] = field(default_factory=set)  # manifest file names read

    def digests(self, name: str) -> list[tuple[str, str]]:
        """(manifest, sha256) of every listing of shard ``name``."""
        return [(m, e["sha256"]) for m, e in self.entries.get(name, [])]

    def missing(self, on_disk: Iterable[str]) -> dict[str, list[str]]:
        """Listed shards that are not ``on_disk``, each with the manifests listing it. A shard only the
        merged manifest lists while its part's manifest no longer does is not missing: its writer
        dropped it (the part was extracted again since), and the next merge drops it too."""
        out = {}
        for name in sorted(set(self.entries) - set(on_disk)):
            where = sorted({m for m, _ in self.entries[name]})
            parsed = schema.parse_shard_name(name)
            if where == ["manifest.json"] and parsed and schema.manifest_name(parsed[0]) in self.readable:
                continue
            out[name] = where
        return out


def listings(directory: str | Path) -> Listings:
    """Every shard listing of the part manifests and the merged ``manifest.json`` of ``directory``,
    and the manifests that cannot be read (not JSON, not an object, shards not a list)."""
    found = Listings()
    for path in sorted(Path(directory).glob("manifest*.json")):
        stem = path.stem.split("-", 1)[1] if "-" in path.stem else ""
        if path.name != "manifest.json" and not stem.isdigit():
            continue
        try:
            m = read_json(path)
        except (ValueError, OSError) as err:
            found.unreadable[path.name] = str(err).replace(f"{str(path)!r} ", "")
            continue
        shards = m.get("shards", []) if isinstance(m, dict) else None
        if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                   and isinstance(e.get("sha256"), str) for e in shards):
            found.unreadable[path.name] = "not a manifest (expected an object whose shards list name and sha256)"
            continue
        found.readable.add(path.name)
        for entry in shards:
            found.entries.setdefault(entry["name"], []).append((path.name, entry))
    return found


def manifest_part(name: str) -> int | None:
    """The part of ``manifest-<part>.json``; None for the merged ``manifest.json``."""
    stem = Path(name).stem.split("-", 1)
    return int(stem[1]) if len(stem) == 2 and stem[1].isdigit() else None


def _nonfinite_ids(path: Path) -> dict[str, list[str]]:
    """Per model, the ids of the videos whose features are not all finite (one video read at a time)."""
    import h5py

    out: dict[str, list[str]] = {}
    with h5py.File(path, "r") as f:
        ids = list(f["videos/id"].asstr()[()])
        for model, ds in schema.feature_datasets(f):
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

    def bad(msg: str, shard: Path | None = None) -> None:
        if not skip_bad:
            raise BadFile(msg)
        log.warning("%s: left out (--skip-bad)", msg)
        if shard is not None:
            found.bad_shards.append(str(shard))
        found.problems.append(msg)

    try:
        for d in dirs:
            d = Path(d)
            listed = listings(d)
            shards = sorted(d.glob(schema.SHARD_GLOB))
            unchecked: set[int] = set()
            for name, why in listed.unreadable.items():
                part = manifest_part(name)
                what = (f"the checksums of part {part}'s shards cannot be checked" if part is not None
                        else "the checksums it lists cannot be checked")
                msg = f"{d / name}: cannot be read ({why}); {what}; `faster verify {d}` shows what is wrong"
                bad(msg)
                if part is not None:
                    unchecked.add(part)
            for name, where in listed.missing(p.name for p in shards).items():
                where = ", ".join(where)
                bad(f"{d / name}: listed in {where} but missing from the directory; its videos are not read "
                    f"(`faster verify {d}` shows what is wrong)")
            for shard in shards:
                parsed = schema.parse_shard_name(shard.name)
                if parsed and parsed[0] in unchecked:
                    found.bad_shards.append(str(shard))  # skip_bad: its part's manifest cannot be read
                    continue
                entries = listed.entries.get(shard.name, [])
                why = None
                if entries:
                    size = shard.stat().st_size
                    sizes = {e.get("bytes") for _, e in entries} - {None}
                    if sizes - {size}:
                        why = f"{size} bytes, its manifest lists {sorted(sizes - {size})[0]}"
                    else:
                        digest = cache.sha256(shard)
                        differs = [m for m, e in entries if e["sha256"] != digest]
                        if differs:
                            why = f"sha256 differs from the one {differs[0]} lists"
                if why:
                    bad(f"{shard}: changed after it was written ({why}); `faster verify {d}` shows what is wrong",
                        shard)
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
