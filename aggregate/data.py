"""Cached maps for training and scoring aggregators: the validation split, per-epoch orders, loaders,
input statistics and the move to the device (channels-last (B, n, T', H', W', C) throughout, as on
disk). Used by fit (aggregate/fit.py), evaluate (aggregate/evaluation.py) and the policy's
reference points (aggregate/policy.py)."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from faster.errors import BadValue

TRAIN_CLIPS = ("uniform", "jitter")


def holdout(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ids held out for validation: sha1(id) / 2^64 < fraction (order- and seed-free)."""
    h = np.fromiter((int.from_bytes(hashlib.sha1(str(i).encode()).digest()[:8], "big") for i in ids),
                    dtype=np.float64, count=len(ids))
    return h / 2.0 ** 64 < fraction


def validation_videos(config: dict[str, Any], **skip: Any) -> tuple[Any, np.ndarray]:
    """(feature set, indices of its labelled validation videos) of a fit's config: its ``val`` sets,
    or the ``val_fraction`` of ``feats`` that :func:`holdout` keeps out of training."""
    from faster.store.reader import FeatureSet

    if config.get("val"):
        fs = FeatureSet(config["val"], **skip)
        return fs, np.flatnonzero(fs.labels >= 0)
    fs = FeatureSet(config["feats"], **skip)
    return fs, np.flatnonzero((fs.labels >= 0) & holdout(fs.ids, config["val_fraction"]))


def jitter_positions(num_extracted: int, num_clips: int, rng: np.random.Generator,
                     videos: int | None = None) -> Any:
    """One clip drawn at random from each of ``num_clips`` consecutive segments of the N extracted
    clips (segment k: [floor(k N / n), floor((k + 1) N / n))): ordered, distinct (--train-clips jitter;
    TSN's segment sampling). A list of n positions, or with ``videos`` an (videos, n) array: an
    independent draw per video."""
    if not 1 <= num_clips <= num_extracted:
        raise BadValue(f"--num-clips must be between 1 and the {num_extracted} extracted clips, got {num_clips}")
    edges = np.array([k * num_extracted // num_clips for k in range(num_clips + 1)])
    draw = rng.integers(edges[:-1], edges[1:], size=(1 if videos is None else videos, num_clips))
    return [int(p) for p in draw[0]] if videos is None else draw.astype(np.int64)


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``num`` training samples in ``epoch``: a function of (seed, epoch) only,
    so that a resumed run sees what the uninterrupted one saw."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num)


def loader(ds: Any, batch_size: int, workers: int, *, shuffle: bool = False, seed: int = 0, pin: bool = False) -> Any:
    """Batches of feature dataset ``ds``: one background reader thread with reused buffers
    (``workers`` 0), or a DataLoader with that many processes (compressed shards on many cores)."""
    import torch
    from torch.utils.data import DataLoader

    from faster.store.reader import ThreadedLoader

    if workers == 0:
        return ThreadedLoader(ds, batch_size, shuffle=shuffle, seed=seed, pin=pin)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      pin_memory=pin, persistent_workers=True, drop_last=False)


def inputs(batch: dict[str, Any], device: Any, sources: Any = ("expensive", "cheap")) -> dict[str, Any]:
    """float16 channels-last clips -> float32 (B, n, T', H', W', C) on ``device`` (no layout change)."""
    return {src: batch[src].to(device, non_blocking=True).float() for src in sources if src in batch}


def input_stats(fs: Any, sources: Any, train_idx: np.ndarray, *, batch_size: int, workers: int, seed: int,
                max_videos: int = 1024) -> dict[str, tuple[Any, Any]]:
    """Per source, the per-channel mean and std (float32, (C,)) of its maps over the training videos
    (a seeded sample of ``max_videos`` when there are more), every clip position and map position."""
    idx = np.sort(train_idx)
    if len(idx) > max_videos:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_videos, replace=False))
    ds = fs.dataset(sources, idx)
    sums: dict[str, list[Any]] = {}
    try:
        for batch in loader(ds, batch_size, workers, seed=seed):
            for src in ("expensive", "cheap"):
                if src not in batch:
                    continue
                x = batch[src].double().flatten(0, -2)  # (B * n * T' * H' * W', C)
                s = sums.setdefault(src, [0, 0.0, 0.0])
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + (x * x).sum(0)
    finally:
        ds.close()
    out = {}
    for src, (n, s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        out[src] = (mean.float(), var.sqrt().float())
    return out
