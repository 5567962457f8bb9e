"""Manifests and failure lists of a feature-set directory (docs/format.md "Directory layout").

Each writing process (a *part*) owns ``manifest-<part>.json`` (its configuration and its complete
shards with their sha256) and ``failures-<part>.jsonl`` (one JSON object per video it could not
extract: id, stage, error, time). Nobody else writes them, so parallel processes never collide.
``merge`` builds the directory-wide views ``manifest.json`` and ``failures.jsonl`` from the parts
and the shards themselves (the shards are the truth: a shard no manifest lists is still counted,
a failure of a video that some shard holds is dropped). JSON files are replaced atomically.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from faster.errors import BadFile, BadValue
from faster.store import schema
from faster.store.files import append_jsonl, read_json, read_jsonl, sha256_file, write_json, write_jsonl

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
STAGES = ("missing", "open", "decode", "timeout", "crash", "pack")  # "pack": a file `faster pack` could not use


def part_manifests(out_dir: str | Path, unreadable: dict[str, str] | None = None) -> dict[int, dict[str, Any]]:
    """Every ``manifest-<part>.json`` of the directory, by part number. A file that is not a JSON
    object raises BadFile naming it; with ``unreadable`` given, it is left out and recorded there
    (file name -> why) instead."""
    out = {}
    for p in sorted(Path(out_dir).glob("manifest-*.json")):
        stem = p.stem.split("-", 1)[1]
        if not stem.isdigit():
            continue
        try:
            m = read_json(p)
            if m is not None and not isinstance(m, dict):
                raise BadFile(f"{str(p)!r} is not a manifest (a JSON object)")
        except (BadFile, OSError) as err:
            if unreadable is None:
                raise
            unreadable[p.name] = str(err)
            continue
        out[int(stem)] = m
    return out


def write_part_manifest(out_dir: str | Path, part: int, manifest: dict[str, Any]) -> None:
    write_json(Path(out_dir) / schema.manifest_name(part), manifest)


def failure_record(video_id: str, stage: str, error: str, **extra: Any) -> dict[str, Any]:
    """One line of a failures file."""
    if stage not in STAGES:
        raise BadValue(f"unknown failure stage {stage!r}; expected one of {STAGES}")
    return {"id": video_id, "stage": stage, "error": error, "time": round(time.time(), 3), **extra}


def read_failures(path: str | Path) -> list[dict[str, Any]]:
    """The records of one failures file; a line cut short by a crash is skipped."""
    return [r for r in read_jsonl(path) if isinstance(r, dict) and "id" in r]


def all_failures(out_dir: str | Path) -> list[dict[str, Any]]:
    """Records of every ``failures-<part>.jsonl``, each with its ``part``."""
    records = []
    for p in sorted(Path(out_dir).glob("failures-*.jsonl")):
        stem = p.stem.split("-", 1)[1]
        if stem.isdigit():
            records.extend({**r, "part": int(stem)} for r in read_failures(p))
    return records


def latest_failures(records: Iterable[dict[str, Any]], done: set[str]) -> list[dict[str, Any]]:
    """The most recent record per video id, leaving out videos that some shard holds; sorted by id."""
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["id"] in done:
            continue
        if r["id"] not in latest or r.get("time", 0) >= latest[r["id"]].get("time", 0):
            latest[r["id"]] = r
    return [latest[k] for k in sorted(latest)]


class FailureLog:
    """``failures-<part>.jsonl`` of one process: appended line by line (flushed) as videos fail."""

    def __init__(self, out_dir: str | Path, part: int):
        self.path = Path(out_dir) / schema.failures_name(part)
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        self.count += 1

    def compact(self, done: set[str]) -> None:
        """Rewrite the file with the latest record per video not in ``done`` (removed when none is left)."""
        keep = latest_failures(read_failures(self.path), done)
        if not keep:
            self.path.unlink(missing_ok=True)
            return
        write_jsonl(self.path, keep)


def shard_entry(path: str | Path, videos: int, sha256: str | None = None) -> dict[str, Any]:
    path = Path(path)
    part, seq = schema.parse_shard_name(path.name) or (-1, -1)
    return {"name": path.name, "part": part, "seq": seq, "videos": videos, "bytes": path.stat().st_size,
            "sha256": sha256 or sha256_file(path)}


def merge(out_dir: str | Path, shard_videos: dict[str, list[str]], checksums: dict[str, str] | None = None,
          config: dict[str, Any] | None = None, parts: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the merged ``manifest.json`` and ``failures.jsonl`` of a directory (:func:`merged`) and
    return the manifest."""
    manifest, failures = merged(out_dir, shard_videos, checksums, config, parts)
    write_json(Path(out_dir) / MANIFEST, manifest)
    write_jsonl(Path(out_dir) / FAILURES, failures)
    return manifest


def merged(out_dir: str | Path, shard_videos: dict[str, list[str]], checksums: dict[str, str] | None = None,
           config: dict[str, Any] | None = None,
           parts: dict[int, dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The merged manifest of a directory and its failures (the latest record per video not in a
    shard), not written.

    ``shard_videos`` maps every complete shard's file name to the video ids it holds (the caller
    read them, e.g. verify); ``checksums`` gives known sha256 (from verify or the part manifests,
    else they are computed here); ``parts``: the part manifests when the caller has read them.
    """
    out_dir = Path(out_dir)
    parts = part_manifests(out_dir) if parts is None else parts
    known: dict[str, str] = {}
    for m in parts.values():
        for s in (m or {}).get("shards", []):
            if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("sha256"), str):
                known[s["name"]] = s["sha256"]  # a malformed entry (verify reports its manifest): no digest
    known.update(checksums or {})
    if config is None:
        config = next((m.get("config") for m in parts.values() if m and m.get("config")), None)
    shards = [shard_entry(out_dir / name, len(ids), known.get(name)) for name, ids in sorted(shard_videos.items())]
    done = {i for ids in shard_videos.values() for i in ids}
    failures = latest_failures(all_failures(out_dir), done)
    manifest = {
        "format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "config": config,
        "parts": sorted(parts), "shards": shards, "num_videos": len(done), "num_failed": len(failures),
        "failed_by_stage": {st: sum(1 for r in failures if r["stage"] == st) for st in STAGES
                            if any(r["stage"] == st for r in failures)},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return manifest, failures
