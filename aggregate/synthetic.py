"""Synthetic feature sets with a planted signal, written with the store's public FeatureSetWriter.

Used by the tests, `benchmarks/fit.py` and the ablation tests: a feature set that looks like an
extraction (root attributes, per-model provenance, uniform clip starts) whose class is decided by

  * ``"order"`` (2 classes): two pulses, along fixed directions a and b of the channel space, are
    added to all map positions of two clips i < j; class 0 has a at i and b at j, class 1 the
    reverse. Every clip-level statistic is the same for both classes, so an order-blind aggregator
    (avg pooling) stays at chance while a recurrent one can learn it.
  * ``"static"``: a class direction is added to every clip (any aggregator can learn it).
  * ``"spot"``: the class shows in one clip per video only, at a random position, and only in the
    first ("expensive") model's map; every other model's map has a class-agnostic cue at that clip.
    A fixed pattern sees the class only when its expensive positions happen to hit the clip; a
    learned policy (pattern adaptive) can read the cue and spend the expensive model there.
  * ``"mixed"`` (the early-exit test): half the videos (drawn per video) are ``"static"``, their
    class in every clip of every model's map; the other half are ``"spot"``, their class in the
    expensive map of one clip only, with the class-agnostic cue in the other models' maps there.
    An easy video can be left after its first clip; a hard one only once its clip is read (and
    read with the expensive model).
  * ``"events"`` (2 classes, the cluster-and-aggregate test): two event directions a and b; each
    video holds a, b, both or neither, each present event added to one random clip with a random
    sign (+-). Class 1 ("exactly_one") when exactly one of them occurs anywhere in the video, class
    0 ("none_or_both") otherwise: an XOR of presences, and a presence whose sign is random, so a
    per-clip score that is monotone in one direction (avg pooling's linear classifier) cannot read
    it; the clusters of a VLAD can.
  * ``"arrangement"`` (2 classes, the temporal-aggregation test): the events a and b, in random
    order, in two neighbouring clips (class 0, "neighbours") or at least 3 clips apart (class 1,
    "far_apart"). Every video holds one a clip and one b clip, so the multiset of clips, all that an
    order-blind aggregator (avg, a VLAD) sees, has the same distribution in both classes.
  * ``"none"``: noise only (throughput benchmarks).

The cheap model's features carry the same signal with more noise.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from faster.errors import BadValue
from faster.sampling import clip_starts
from faster.store.header import Header, ModelHeader
from faster.store.writer import FeatureSetWriter

SIGNALS = ("order", "static", "spot", "mixed", "events", "arrangement", "none")
CLASSES = {"order": ["a_before_b", "b_before_a"], "events": ["none_or_both", "exactly_one"],
           "arrangement": ["neighbours", "far_apart"]}
DEFAULT_MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}


def write_synthetic(out: str | Path, *, num_videos: int, num_clips: int = 8, clip_len: int = 8,
                    models: dict[str, Sequence[int]] | None = None, signal: str = "order",
                    num_classes: int = 2, amplitude: float = 1.0, noise: Sequence[float] = (0.5, 1.0),
                    gflops: Sequence[float] = (30.0, 3.2), seed: int = 0, shard_size: int = 64, part: int = 0,
                    id_prefix: str = "vid", first_id: int = 0, compression: str = "none",
                    num_frames: int = 300, unlabelled: int = 0, weights: str = "synthetic") -> Path:
    """Write ``num_videos`` videos of ``models`` (name -> per-clip (T', H', W', C); the first is
    "expensive", noise[0]/gflops[0], the others noise[1]/gflops[1]) to directory ``out``; the last
    ``unlabelled`` of them carry their class's signal but label -1 (distillation through unlabelled
    videos). ``weights``: the provenance the shards record; the synthetic "backbone" (its class
    directions) is the same for every ``seed``, which only draws other videos."""
    if signal not in SIGNALS:
        raise BadValue(f"unknown signal {signal!r}; expected one of {SIGNALS}")
    if signal == "order" and (num_classes != 2 or num_clips < 2):
        raise BadValue("the order signal needs num_classes=2 and num_clips >= 2")
    if signal == "events" and (num_classes != 2 or num_clips < 2):
        raise BadValue("the events signal needs num_classes=2 and num_clips >= 2")
    if signal == "arrangement" and (num_classes != 2 or num_clips < 4):
        raise BadValue("the arrangement signal needs num_classes=2 and num_clips >= 4")
    models = dict(models or DEFAULT_MODELS)
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = list(models)
    shapes = {m: tuple(int(s) for s in models[m]) for m in names}
    # fixed directions per model (unit vectors in its channel space), independent of the videos
    drng = np.random.default_rng(12345)
    dirs = {m: drng.standard_normal((num_classes + 2, shapes[m][-1])) for m in names}
    for m in names:
        dirs[m] /= np.linalg.norm(dirs[m], axis=1, keepdims=True)
    classes = CLASSES.get(signal) or [f"class{c:02d}" for c in range(num_classes)]
    far = [(i, j) for i in range(num_clips) for j in range(i + 3, num_clips)]  # arrangement: pairs >= 3 apart
    header = Header(clip_len=clip_len, num_clips=num_clips, frame_stride=1, size=32, classes=classes,
                    software_version="synthetic", torch_version="none",
                    models={m: ModelHeader(gflops_per_clip=float(gflops[0] if k == 0 else gflops[1]), layer="res5",
                                           weights=weights, mean=[0.45] * 3, std=[0.225] * 3,
                                           compute_dtype="float32") for k, m in enumerate(names)})
    starts = clip_starts(num_frames, num_clips, clip_len)
    with FeatureSetWriter(out, header, part=part, num_parts=part + 1, shard_size=shard_size,
                          compression=compression) as w:
        for k in range(num_videos):
            label = int(rng.integers(num_classes))
            i, j = sorted(rng.choice(num_clips, size=2, replace=False)) if signal == "order" else (0, 0)
            spot = int(rng.integers(num_clips))
            easy = signal == "mixed" and bool(rng.integers(2))  # mixed: this video shows its class in every clip
            events = _events(rng, signal, label, num_clips, far)  # [(clip, direction index, sign)]
            feats = {}
            for mk, m in enumerate(names):
                sigma = noise[0] if mk == 0 else noise[1]
                x = rng.standard_normal((num_clips, *shapes[m]), dtype=np.float32) * sigma  # (N, T', H', W', C)
                if signal == "order":
                    first, second = (dirs[m][0], dirs[m][1]) if label == 0 else (dirs[m][1], dirs[m][0])
                    x[i] += amplitude * first
                    x[j] += amplitude * second
                elif signal == "static" or easy:
                    x += amplitude * dirs[m][label]
                elif signal in ("spot", "mixed"):
                    x[spot] += amplitude * (dirs[m][label] if mk == 0 else dirs[m][num_classes])
                for clip, d, sign in events:
                    x[clip] += sign * amplitude * dirs[m][d]
                feats[m] = x
            w.add(id=f"{id_prefix}{first_id + k:06d}.mp4", label=-1 if k >= num_videos - unlabelled else label,
                  num_frames=num_frames, fps=30.0,
                  clip_start=starts, features=feats)
    return out



def _events(rng: np.random.Generator, signal: str, label: int, num_clips: int,
            far: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The (clip, direction 0 = a / 1 = b, sign) events of one video of the events or arrangement
    signal (none for the others: no draw, so their videos stay as they were)."""
    if signal == "events":
        present = [[0], [1]][int(rng.integers(2))] if label == 1 else [[], [0, 1]][int(rng.integers(2))]
        clips = rng.choice(num_clips, size=len(present), replace=False)
        signs = rng.choice([-1.0, 1.0], size=len(present))
        return [(int(c), d, float(s)) for c, d, s in zip(clips, present, signs)]
    if signal == "arrangement":
        if label == 0:
            i = int(rng.integers(num_clips - 1))
            pair = (i, i + 1)
        else:
            pair = far[int(rng.integers(len(far)))]
        first = int(rng.integers(2))  # which of a, b comes first
        return [(pair[0], first, 1.0), (pair[1], 1 - first, 1.0)]
    return []
