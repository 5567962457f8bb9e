"""`faster verify`: check feature-set directories against the shard schema (format_version 1).

For every complete shard: the root attributes of schema.ROOT_ATTRS, the /videos datasets with
consistent lengths, clip starts inside the video, labels inside the class list, every
/features/<model> as (V, N, T', H', W', C) float16 with one video per chunk and the provenance
attributes of schema.MODEL_ATTRS, every value finite (read one video at a time), one
configuration and one set of models across the directory, each video id in one shard only, and
the sha256 that the manifests list. Then the merged ``manifest.json`` and ``failures.jsonl`` are
(re)written from the shards that passed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from faster.store import manifest as mf
from faster.store import schema
from faster.store.writer import sha256_file

log = logging.getLogger(__name__)

_MODEL_CONFIG = ("layer", "weights", "mean", "std", "compute_dtype")


_attr = schema.plain_attr


def _config_of(f) -> dict[str, Any]:
    a = f.attrs
    classes = a.get("classes", "[]")
    classes = json.loads(_attr(classes)) if isinstance(_attr(classes), str) else _attr(classes)
    models = {}
    for name, ds in (f["features"].items() if "features" in f else []):
        models[name] = {k: _attr(ds.attrs[k]) for k in _MODEL_CONFIG if k in ds.attrs}
    return {"clip_len": _attr(a.get("clip_len")), "num_clips": _attr(a.get("num_clips")),
            "frame_stride": _attr(a.get("frame_stride")), "size": _attr(a.get("size")), "classes": classes,
            "models": models}


def shard_info(path: str | Path) -> dict[str, Any]:
    """{"config": the shard's configuration (as pipeline.config_dict writes it), "ids": its video ids}."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f["videos/id"][()]]
            return {"config": _config_of(f), "ids": ids}
    except (OSError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a readable feature shard: {err}") from err


def config_diff(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between two configurations (empty when they agree)."""
    diffs = []
    for key in ("clip_len", "num_clips", "frame_stride", "size"):
        if found.get(key) != wanted.get(key):
            diffs.append(f"{key} {found.get(key)} there, {wanted.get(key)} here")
    if list(found.get("classes") or []) != list(wanted.get("classes") or []):
        diffs.append(f"classes differ ({len(found.get('classes') or [])} there, {len(wanted.get('classes') or [])} here)")
    fm, wm = found.get("models") or {}, wanted.get("models") or {}
    if set(fm) != set(wm):
        diffs.append(f"models {sorted(fm)} there, {sorted(wm)} here")
    for m in sorted(set(fm) & set(wm)):
        for k in _MODEL_CONFIG:
            a, b = fm[m].get(k), wm[m].get(k)
            if k in ("mean", "std"):
                same = a is not None and b is not None and np.allclose(np.asarray(a, float), np.asarray(b, float))
            else:
                same = a == b
            if not same:
                diffs.append(f"{m} {k} {a} there, {b} here")
    return diffs


def check_shard(path: Path) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """(config and ids, problems, ids) of one shard; problems name the shard and what is wrong."""
    import h5py

    problems: list[str] = []
    name = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        return None, [f"{name}: cannot be opened as HDF5 ({err})"], []
    with f:
        a = f.attrs
        if _attr(a.get("format")) != schema.FORMAT:
            problems.append(f"{name}: format {_attr(a.get('format'))!r}, expected {schema.FORMAT!r}")
        if _attr(a.get("format_version")) != schema.FORMAT_VERSION:
            problems.append(f"{name}: format_version {_attr(a.get('format_version'))!r}, expected {schema.FORMAT_VERSION}")
        missing = [k for k in schema.ROOT_ATTRS if k not in a]
        if missing:
            problems.append(f"{name}: root attributes {missing} missing")
        if "videos" not in f or "features" not in f:
            return None, problems + [f"{name}: /videos or /features missing"], []
        v = f["videos"]
        absent = [k for k in schema.VIDEO_FIELDS if k not in v]
        if absent:
            return None, problems + [f"{name}: /videos/{absent} missing"], []
        config = _config_of(f)
        V = v["id"].shape[0]
        N = config["num_clips"]
        ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in v["id"][()]]
        for key in ("label", "num_frames", "fps") + (("split",) if "split" in v else ()):
            if v[key].shape != (V,):
                problems.append(f"{name}: /videos/{key} has shape {v[key].shape}, expected ({V},)")
        if v["clip_start"].shape != (V, N):
            problems.append(f"{name}: /videos/clip_start has shape {v['clip_start'].shape}, expected ({V}, {N})")
        elif V:
            starts, frames = v["clip_start"][()], v["num_frames"][()]
            if (frames < 1).any():
                problems.append(f"{name}: num_frames < 1 for {int((frames < 1).sum())} videos")
            if (starts < 0).any() or (starts >= frames[:, None]).any():
                problems.append(f"{name}: clip starts outside their video")
            if (np.diff(starts, axis=1) < 0).any():
                problems.append(f"{name}: clip starts not in increasing order")
        labels = v["label"][()]
        classes = config["classes"] or []
        bad = labels[(labels < -1) | (labels >= len(classes))]
        if bad.size:
            problems.append(f"{name}: labels {sorted(set(bad.tolist()))[:5]} outside [-1, {len(classes)})")
        if len(set(ids)) != len(ids):
            problems.append(f"{name}: a video id appears twice")
        if not config["models"]:
            problems.append(f"{name}: no /features/<model> dataset")
        for model, ds in f["features"].items():
            where = f"{name}: /features/{model}"
            miss = [k for k in schema.MODEL_ATTRS if k not in ds.attrs]
            if miss:
                problems.append(f"{where}: attributes {miss} missing")
            if ds.dtype != np.float16:
                problems.append(f"{where}: dtype {ds.dtype}, expected float16")
            if ds.ndim != len(schema.FEATURE_AXES) or ds.shape[:2] != (V, N):
                problems.append(f"{where}: shape {ds.shape}, expected ({V}, {N}, T', H', W', C)")
                continue
            if ds.chunks is not None and ds.chunks[0] != 1:
                problems.append(f"{where}: chunks {ds.chunks}, expected one video per chunk")
            bad = [ids[i] for i in range(V) if not np.isfinite(ds[i]).all()]
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
    for m in mf.part_manifests(feats).values():
        for s in (m or {}).get("shards", []):
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
            diff = config_diff(info["config"], reference[1])
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
    merged = mf.merge(feats, good, checksums, config=reference[1] if reference else None)
    return {"dir": str(feats), "ok": not problems, "shards": len(shards), "videos": merged["num_videos"],
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
