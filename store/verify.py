"""`faster verify`: check feature-set directories against the shard schema (format_version 2; 1 still reads).

For every complete shard: the root attributes of schema.ROOT_ATTRS, the /videos datasets with
consistent lengths, clip starts inside the video (unless unknown: packed), labels inside the class
list, every /features/<model> as (V, N, T', H', W', C) float16 with one video per chunk and the
attributes of schema.MODEL_REQUIRED, every value finite (integrity.nonfinite_videos: one video at a
time), one configuration and one set of models across the directory, each video id in one shard
only, and the sha256 that the manifests list. Then the merged ``manifest.json`` and ``failures.jsonl`` are
(re)written from the shards that passed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile
from faster.store import manifest, schema
from faster.store.files import sha256_file
from faster.store.header import config_diff, read_header
from faster.store.integrity import nonfinite_videos

log = logging.getLogger(__name__)


def check_shard(path: Path) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """(config and ids, problems, ids) of one shard; problems name the shard and what is wrong.

    The header is read by store.header.read_header (as the reader and resume read it); then
    what the reader does not need checked up front: every attribute, the video table's values,
    chunking, and every value finite (one video at a time).
    """
    import h5py

    name = path.name
    try:
        sh = read_header(path)
    except BadFile as err:
        return None, [f"{name}: {str(err).removeprefix(f'{path}: ')}"], []
    problems: list[str] = []
    config, ids = sh.config, sh.ids
    with h5py.File(path, "r") as f:
        missing = [k for k in schema.ROOT_ATTRS if k not in f.attrs]
        if missing:
            problems.append(f"{name}: root attributes {missing} missing")
        v = f["videos"]
        V = len(ids)
        for key in ("label", "num_frames", "fps") + (("split",) if "split" in v else ()):
            if v[key].shape != (V,):
                problems.append(f"{name}: /videos/{key} has shape {v[key].shape}, expected ({V},)")
        if V and v["num_frames"].shape == (V,):
            starts, frames = sh.clip_start, v["num_frames"][()]
            # a packed video (docs/format.md "Packed feature sets") knows neither: num_frames and every start are -1
            known = ~((frames == -1) & (starts == -1).all(axis=1))
            starts, frames = starts[known], frames[known]
            if (frames < 1).any():
                problems.append(f"{name}: num_frames < 1 for {int((frames < 1).sum())} videos")
            if (starts < 0).any() or (starts >= frames[:, None]).any():
                problems.append(f"{name}: clip starts outside their video")
            if (np.diff(starts, axis=1) < 0).any():
                problems.append(f"{name}: clip starts not in increasing order")
        classes = sh.header.classes
        bad = sh.labels[(sh.labels < -1) | (sh.labels >= len(classes))]
        if bad.size:
            problems.append(f"{name}: labels {sorted(set(bad.tolist()))[:5]} outside [-1, {len(classes)})")
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: a video id appears twice")
        for model, ds in f["features"].items():
            where = f"{name}: /features/{model}"
            miss = [k for k in schema.MODEL_REQUIRED if k not in ds.attrs]
            if miss:
                problems.append(f"{where}: attributes {miss} missing")
            if ds.chunks is not None and ds.chunks[0] != 1:
                problems.append(f"{where}: chunks {ds.chunks}, expected one video per chunk")
            if ds.attrs.get("spatial_pool") and ds.shape[3:5] != (1, 1):
                problems.append(f"{where}: spatial_pool is set but the maps are {ds.shape[3]}x{ds.shape[4]}, not 1x1")
            try:
                schema.require_filters(ds, where)
            except BadFile as err:
                problems.append(str(err))
                continue
            bad = nonfinite_videos(ds, ids)
            if bad:
                problems.append(f"{where}: non-finite values for {len(bad)} videos, e.g. {bad[0]}")
    return {"config": config, "ids": ids}, problems, ids


def verify_dir(feats: str | Path) -> dict[str, Any]:
    """Check one feature-set directory and write its merged manifest and failures; return its report."""
    feats = Path(feats)
    problems: list[str] = []
    notes: list[str] = []
    shards = sorted(p for p in feats.glob(schema.SHARD_GLOB) if schema.parse_shard_name(p.name))
    if not shards:
        problems.append(f"{feats}: no complete shard (shard-<part>-<seq>.h5)")
    listed: dict[str, str] = {}
    for part in manifest.part_manifests(feats).values():
        for s in (part or {}).get("shards", []):
            listed[s["name"]] = s["sha256"]
    good: dict[str, list[str]] = {}
    checksums: dict[str, str] = {}
    reference: tuple[str, dict[str, Any]] | None = None
    owner: dict[str, str] = {}
    for path in shards:
        info, probs, ids = check_shard(path)
        problems += probs
        if info is None:
            continue
        if reference is None:
            reference = (path.name, info["config"])
        else:
            diff = config_diff(info["config"], reference[1], path.name, reference[0])
            if diff:
                problems.append(f"{path.name}: configuration differs from {reference[0]}: {'; '.join(diff[:3])}")
        digest = sha256_file(path)
        if path.name in listed and listed[path.name] != digest:
            problems.append(f"{path.name}: sha256 differs from the one its manifest lists (changed after writing)")
        elif path.name not in listed:
            notes.append(f"{path.name}: not listed in a part manifest (its writer stopped before updating it)")
        for i in ids:
            if i in owner:
                problems.append(f"video {i!r} is in both {owner[i]} and {path.name}")
            owner[i] = path.name
        checksums[path.name] = digest
        if not probs:
            good[path.name] = ids
    for name in sorted(set(listed) - {p.name for p in shards}):
        problems.append(f"{name}: listed in a manifest but missing from the directory")
    tmp = sorted(p.name for p in feats.glob(".shard-*.h5.tmp"))
    if tmp:
        notes.append(f"{len(tmp)} temporary shards of interrupted or running extractions: {', '.join(tmp[:3])}")
    merged = manifest.merge(feats, good, checksums, config=reference[1] if reference else None)
    return {"dir": str(feats), "ok": not problems, "shards": len(shards), "videos": len(owner),
            "videos_in_good_shards": merged["num_videos"],
            "failed": merged["num_failed"], "failed_by_stage": merged["failed_by_stage"],
            "models": sorted(reference[1]["models"]) if reference else [],
            "config": reference[1] if reference else None, "problems": problems, "notes": notes}


def verify(dirs: Iterable[str | Path]) -> dict[str, Any]:
    """Check feature-set directories (see the module docstring); ``report["ok"]`` says all passed."""
    reports = [verify_dir(d) for d in dirs]
    problems = [p for r in reports for p in r["problems"]]
    configs = [r["config"] for r in reports if r["config"]]
    if len(configs) > 1 and any(c["classes"] != configs[0]["classes"] for c in configs[1:]):
        problems.append("the directories have different class lists: they cannot be used together")
    return {"ok": not problems, "dirs": reports, "problems": problems,
            "videos": sum(r["videos"] for r in reports), "failed": sum(r["failed"] for r in reports)}


def repair_dir(feats: str | Path) -> list[str]:
    """Resolve video ids held by more than one shard (two extractions of one part that ran at once):
    the first copy in (part, seq) order is kept; a shard whose every video has a copy in the shards
    kept is removed; a shard holding some duplicates is rewritten without them (a new shard of the
    same part, then the old one is removed), so no video ever loses its only copy. The part manifests
    follow. Refused while a writer holds a lock on the directory. Returns one line per action."""
    from faster.errors import UserError
    from faster.store.lock import live_locks
    from faster.store.writer import ShardWriter, next_seq

    feats = Path(feats)
    locks = live_locks(feats)
    if locks:
        who = ", ".join(f"part {lk['part']} (pid {lk.get('pid')} on {lk.get('host')})" for lk in locks)
        raise UserError(f"{feats}: cannot repair while extractions write to it: {who}")
    shards = sorted((p for p in feats.glob(schema.SHARD_GLOB) if schema.parse_shard_name(p.name)),
                    key=lambda p: schema.parse_shard_name(p.name))
    owner: dict[str, str] = {}
    actions: list[str] = []
    replaced: dict[str, Path | None] = {}  # old shard name -> its rewrite (None: removed)
    for path in shards:
        try:
            sh = read_header(path)
        except BadFile:
            continue  # verify reports it; repair never touches what it cannot read
        dup = [i for i in sh.ids if i in owner]
        if not dup:
            owner.update((i, path.name) for i in sh.ids)
            continue
        where = sorted({owner[i] for i in dup})
        if len(dup) == len(sh.ids):
            path.unlink()
            replaced[path.name] = None
            actions.append(f"removed {path.name}: its {len(dup)} videos are also in {', '.join(where)}")
            continue
        keep = [r for r, i in enumerate(sh.ids) if i not in owner]
        part = schema.parse_shard_name(path.name)[0]
        import h5py

        with h5py.File(path, "r") as f, ShardWriter(feats, part=part, seq=next_seq(feats, part), header=sh.header,
                                                      capacity=len(keep)) as w:
            v = f["videos"]
            for r in keep:
                w.add(id=sh.ids[r], label=int(v["label"][r]), num_frames=int(v["num_frames"][r]),
                      fps=float(v["fps"][r]), clip_start=v["clip_start"][r],
                      features={m: f[schema.features_key(m)][r] for m in sh.header.models},
                      split=v["split"].asstr()[r] if "split" in v else None,
                      gflops={m: f[schema.gflops_key(m)][r] for m in sh.header.models
                              if schema.gflops_key(m) in f} or None)
        path.unlink()
        replaced[path.name] = w.path
        owner.update((sh.ids[r], w.path.name) for r in keep)
        actions.append(f"rewrote {path.name} as {w.path.name} without {len(dup)} videos that are also in "
                       f"{', '.join(where)} ({len(keep)} kept)")
    if replaced:
        for p, part in manifest.part_manifests(feats).items():
            if not part:
                continue
            entries = []
            for entry in part.get("shards", []):
                if entry["name"] not in replaced:
                    entries.append(entry)
                elif replaced[entry["name"]] is not None:
                    new = replaced[entry["name"]]
                    entries.append(manifest.shard_entry(new, len(read_header(new).ids)))
            part["shards"], part["videos"] = entries, sum(e["videos"] for e in entries)
            manifest.write_part_manifest(feats, p, part)
    return actions
