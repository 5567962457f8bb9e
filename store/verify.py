"""`faster verify`: check feature-set directories against the shard schema (format_version 2; 1 still reads).

For every complete shard: the root attributes of schema.ROOT_ATTRS, the /videos datasets with
consistent lengths, clip starts inside the video (unless unknown: packed), labels inside the class
list, every /features/<model> as (V, N, T', H', W', C) float16 with one video per chunk and the
attributes of schema.MODEL_REQUIRED, every value finite (integrity.nonfinite_videos: one video at a
time), one configuration and one set of models across the directory, each video id in one shard
only, the sha256 that every manifest lists (part manifests and the merged one), and no listed shard
missing. Then the merged ``manifest.json`` and ``failures.jsonl`` are (re)written from the readable
shards, each under the digest a manifest recorded for it: verify never records the sha256 of a shard
it reports as changed. ``accept`` (``faster verify --accept SHARD``) is the one explicit way to
record a shard as it is now, or to forget a listed shard that is gone; ``repair_dir`` resolves
videos held twice, keeping the copy that passes the checks.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile
from faster.store import manifest, schema
from faster.store.files import read_json, sha256_file, write_json, write_jsonl
from faster.store.header import config_diff, read_header
from faster.store.integrity import Listings, listings, manifest_part, nonfinite_videos

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
        for model, ds in schema.feature_datasets(f):
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
    """Check one feature-set directory and write its merged manifest and failures; return its report.

    A shard whose sha256 differs from any manifest's listing is reported and left out of the merged
    manifest: verify never records the checksum of a shard it reports as changed (only
    ``accept`` does, when asked by name). A shard no manifest lists is recorded as it is found."""
    feats = Path(feats)
    problems: list[str] = []
    notes: list[str] = []
    shards = sorted(p for p in feats.glob(schema.SHARD_GLOB) if schema.parse_shard_name(p.name))
    if not shards:
        problems.append(f"{feats}: no complete shard (shard-<part>-<seq>.h5)")
    listed = listings(feats)
    unreadable_parts = set()
    for name, why in listed.unreadable.items():
        problems.append(f"{name}: cannot be read ({why}); the checksums it lists cannot be checked")
        part = manifest_part(name)
        if part is not None:
            unreadable_parts.add(part)
    good: dict[str, list[str]] = {}  # shards that pass every check
    merged_shards: dict[str, list[str]] = {}  # every readable shard: what the merged manifest lists
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
        differs = [m for m, listed_digest in listed.digests(path.name) if listed_digest != digest]
        changed = bool(differs) or schema.parse_shard_name(path.name)[0] in unreadable_parts
        if differs:
            problems.append(f"{path.name}: sha256 differs from the one {differs[0]} lists (changed after writing); "
                            f"`faster verify --accept {feats / path.name}` records it as it is now")
        elif not listed.digests(path.name):
            notes.append(f"{path.name}: not listed in a manifest (its writer stopped before updating it): "
                         "recorded as it is now")
        for i in ids:
            if i in owner:
                problems.append(f"video {i!r} is in both {owner[i]} and {path.name}")
            owner[i] = path.name
        # every readable shard stays listed in the merged manifest, under the digest a manifest recorded
        # for it when there is one (the part's first): a changed shard keeps its old digest, so the
        # training commands keep refusing it until it is accepted by name
        # (a shard of a part whose manifest cannot be read, listed nowhere else, has no known digest: left out)
        listed_digests = listed.digests(path.name)
        if listed_digests or not changed:
            merged_shards[path.name] = ids
            checksums[path.name] = listed_digests[0][1] if listed_digests else digest
        if not probs and not changed:
            good[path.name] = ids
    for name, where in listed.missing(p.name for p in shards).items():
        where = ", ".join(where)
        problems.append(f"{name}: listed in {where} but missing from the directory; re-extract its videos, or "
                        f"`faster verify --accept {feats / name}` to forget it")
    tmp = sorted(p.name for p in feats.glob(".shard-*.h5.tmp"))
    if tmp:
        notes.append(f"{len(tmp)} temporary shards of interrupted or running extractions: {', '.join(tmp[:3])}")
    merged, failures = manifest.merged(feats, merged_shards, checksums, config=reference[1] if reference else None,
                                       parts=manifest.part_manifests(feats, unreadable={}))
    try:
        write_json(feats / manifest.MANIFEST, merged)
        write_jsonl(feats / manifest.FAILURES, failures)
    except OSError as err:  # a read-only directory: the checks stand, the merged views are not written
        notes.append(f"{feats}: the merged {manifest.MANIFEST} and {manifest.FAILURES} were not written "
                     f"({err.strerror or err})")
    return {"dir": str(feats), "ok": not problems, "shards": len(shards), "videos": len(owner),
            "videos_in_good_shards": len({i for ids in good.values() for i in ids}),
            "failed": merged["num_failed"], "failed_by_stage": merged["failed_by_stage"],
            "models": sorted(reference[1]["models"]) if reference else [],
            "config": reference[1] if reference else None, "problems": problems, "notes": notes}


def accept(feats: str | Path, name: str) -> str:
    """Record shard ``name`` of ``feats`` as it is now (``faster verify --accept``): every manifest
    listing it gets its present size and sha256; a listed shard that is gone is forgotten (its
    listings removed). Refused for a shard that fails the schema checks, and while a writer holds the
    lock of its part. Returns one line saying what was recorded."""
    from faster.errors import UserError
    from faster.store.lock import live_locks

    feats = Path(feats)
    parsed = schema.parse_shard_name(name)
    if parsed is None:
        raise UserError(f"--accept {name!r}: not a shard name (shard-<part>-<seq>.h5)")
    held = [lk for lk in live_locks(feats) if lk["part"] == parsed[0]]
    if held:
        raise UserError(f"{feats}: cannot accept {name} while part {parsed[0]} is being written "
                        f"(pid {held[0].get('pid')} on {held[0].get('host')})")
    listed = listings(feats)
    for m, why in listed.unreadable.items():
        raise UserError(f"{feats / m}: cannot be read ({why}); fix or remove it before accepting {name}")
    path = feats / name
    if not path.exists():
        if name not in listed.entries:
            raise UserError(f"--accept {str(path)!r}: no such shard, and no manifest lists it")
        _relist(feats, listed, {name: None})
        return f"forgot {name}: it is gone (its listing removed from {', '.join(sorted({m for m, _ in listed.entries[name]}))})"
    info, problems, ids = check_shard(path)
    if problems:
        raise UserError(f"--accept {str(path)!r}: refused, it fails the checks: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    entry = manifest.shard_entry(path, len(ids))
    old = sorted({e["sha256"] for _, e in listed.entries.get(name, [])} - {entry["sha256"]})
    _relist(feats, listed, {name: entry})
    return (f"accepted {name} as it is now: sha256 {entry['sha256'][:16]}"
            + (f" (its manifests listed {', '.join(o[:16] for o in old)})" if old else ""))


def verify(dirs: Iterable[str | Path]) -> dict[str, Any]:
    """Check feature-set directories (see the module docstring); ``report["ok"]`` says all passed."""
    reports = [verify_dir(d) for d in dirs]
    problems = [p for r in reports for p in r["problems"]]
    configs = [r["config"] for r in reports if r["config"]]
    if len(configs) > 1 and any(c["classes"] != configs[0]["classes"] for c in configs[1:]):
        problems.append("the directories have different class lists: they cannot be used together")
    return {"ok": not problems, "dirs": reports, "problems": problems,
            "videos": sum(r["videos"] for r in reports), "failed": sum(r["failed"] for r in reports)}


def _copy_problem(f: Any, row: int, models: Iterable[str]) -> str | None:
    """Why the copy of a video at ``row`` of the open shard ``f`` fails the checks, or None."""
    from faster.store.integrity import finite

    for m in sorted(models):
        ds = f[schema.features_key(m)]
        try:
            schema.require_filters(ds, m)
            values = ds[row]
        except (OSError, BadFile) as err:
            return f"its {m} features cannot be read ({err})"
        if not finite(values):
            return f"non-finite {m} features"
    return None


def repair_dir(feats: str | Path) -> list[str]:
    """Resolve video ids held by more than one shard (two extractions of one part that ran at once).

    Of a video's copies the first in (part, seq) order that passes the checks is kept: its shard has
    the sha256 its manifests list (or none is listed) and its features are finite and readable. When
    no copy passes, every copy is kept and the line says so (`faster verify` still reports them). A
    shard whose every video is kept elsewhere is removed; a shard holding some of them is rewritten
    without them (a new shard of the same part, then the old one is removed), unless it changed after
    it was written (rewriting it would record its changed values as good: it is left as it is and the
    line says so). No video ever loses its only copy. The manifests follow. Refused while a writer
    holds a lock on the directory. Returns one line per action."""
    import h5py

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
    listed = listings(feats)
    headers = {}
    copies: dict[str, list[tuple[Path, int]]] = {}  # id -> (shard, row) of each copy, in (part, seq) order
    for path in shards:
        try:
            headers[path] = sh = read_header(path)
        except BadFile:
            continue  # verify reports it; repair never touches what it cannot read
        for r, i in enumerate(sh.ids):
            copies.setdefault(i, []).append((path, r))
    dups = {i: c for i, c in copies.items() if len(c) > 1}
    if not dups:
        return []
    rows_of: dict[Path, list[int]] = {}  # shard -> the rows of its duplicated videos
    for cs in dups.values():
        for path, r in cs:
            rows_of.setdefault(path, []).append(r)
    unchanged: dict[Path, str | None] = {}  # shard -> why it fails its checksum (None: it does not)
    problem: dict[tuple[Path, int], str | None] = {}  # (shard, row) -> why that copy fails its checks
    for path, rows in rows_of.items():
        digests = listed.digests(path.name)
        actual = sha256_file(path) if digests else None  # hashed now, as verify does: it decides what is deleted
        bad = [m for m, d in digests if d != actual]
        unchanged[path] = f"its sha256 differs from the one {bad[0]} lists" if bad else None
        if unchanged[path] is None:
            with h5py.File(path, "r") as f:  # once per shard, not per copy
                for r in rows:
                    problem[path, r] = _copy_problem(f, r, headers[path].header.models)
    actions: list[str] = []
    drop: dict[Path, set[str]] = {}  # shard -> ids whose kept copy is in another shard
    kept_in: dict[Path, set[Path]] = {}  # shard -> the shards keeping the copies it drops
    for i, cs in sorted(dups.items()):
        why: dict[Path, str | None] = {}
        for path, r in cs:
            why[path] = unchanged[path] if unchanged[path] is not None else problem[path, r]
        passing = [p for p, _ in cs if why[p] is None]
        if not passing:
            actions.append(f"video {i!r}: no copy passes the checks ("
                           + "; ".join(f"{p.name}: {why[p]}" for p, _ in cs) + "): kept every copy")
            continue
        keep = passing[0]
        if keep != cs[0][0]:
            actions.append(f"video {i!r}: kept the copy in {keep.name}; "
                           + "; ".join(f"{p.name}: {why[p]}" for p, _ in cs if why[p] is not None))
        for p, _ in cs:
            if p != keep:
                drop.setdefault(p, set()).add(i)
                kept_in.setdefault(p, set()).add(keep)
    replaced: dict[str, dict[str, Any] | None] = {}  # old shard name -> its rewrite's manifest entry (None: removed)
    for path in shards:
        if path not in drop:
            continue
        sh, gone = headers[path], drop[path]
        where = ", ".join(sorted(p.name for p in kept_in[path]))
        if len(gone) == len(set(sh.ids)):
            path.unlink()
            replaced[path.name] = None
            actions.append(f"removed {path.name}: its {len(gone)} videos are also in {where}")
            continue
        if unchanged[path] is not None:
            actions.append(f"left {path.name} as it is ({unchanged[path]}: rewriting it would record its values "
                           f"as good); its {len(gone)} videos also in {where} stay twice")
            continue
        keep_rows = [r for r, i in enumerate(sh.ids) if i not in gone]
        part = schema.parse_shard_name(path.name)[0]
        with h5py.File(path, "r") as f, ShardWriter(feats, part=part, seq=next_seq(feats, part), header=sh.header,
                                                      capacity=len(keep_rows)) as w:
            v = f["videos"]
            for r in keep_rows:
                w.add(id=sh.ids[r], label=int(v["label"][r]), num_frames=int(v["num_frames"][r]),
                      fps=float(v["fps"][r]), clip_start=v["clip_start"][r],
                      features={m: f[schema.features_key(m)][r] for m in sh.header.models},
                      split=v["split"].asstr()[r] if "split" in v else None,
                      gflops={m: f[schema.gflops_key(m)][r] for m in sh.header.models
                              if schema.gflops_key(m) in f} or None)
        path.unlink()
        replaced[path.name] = manifest.shard_entry(w.path, len(keep_rows), w.sha256)  # the digest the writer took
        actions.append(f"rewrote {path.name} as {w.path.name} without {len(gone)} videos that are also in "
                       f"{where} ({len(keep_rows)} kept)")
    _relist(feats, listed, replaced)
    return actions


def _relist(feats: Path, listed: Listings, new: dict[str, dict[str, Any] | None]) -> None:
    """Rewrite every manifest of ``feats`` that lists a shard of ``new``: its entry replaced by
    ``new[name]``, or removed where that is None; a part manifest's video count follows."""

    for m in sorted({m for name in new for m, _ in listed.entries.get(name, [])}):
        data = read_json(feats / m)
        entries = [new[e["name"]] if e.get("name") in new else e for e in data.get("shards", [])]
        data["shards"] = [e for e in entries if e is not None]
        if "videos" in data and manifest_part(m) is not None:
            data["videos"] = sum(int(e.get("videos", 0)) for e in data["shards"])
        write_json(feats / m, data)
