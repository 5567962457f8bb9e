"""The clips `faster train-clip` learns from and validates on (docs/train-clip.md).

Training (the paper's recipe, after PySlowFast's Kinetics one): per video and epoch, ``clip_len``
frames ``frame_stride`` apart at a random start; the short side jittered in [256, 320] pixels at a
224 crop (scaled to ``size``); a random ``size`` x ``size`` crop; a horizontal flip with
probability 1/2. Every draw is a function of (seed, epoch, video, repeat) (:func:`draws`), not of
an RNG's state, so a resumed run sees the clips the uninterrupted one saw.

Work is split as extraction splits it: the decode processes (faster.extract.decoders, decord and
PyAV as ``--decoder`` chooses) only decode and resize, each clip to a square "canvas" whose side is the top
of the jitter range (short side resized to it, centre square kept); the crop, the scale (the crop
is ``size * canvas / scale`` canvas pixels wide, resized to ``size``), the flip and the
normalisation run on the training device, on uint8 batches (:func:`augment`). Keeping the centre
square means a wide (16:9) video's outer sixths are never seen in training; the test protocol's
centre crop does not see them either.

Validation is Table 2's protocol: ``num_clips`` uniformly spaced clips (N x L = 256 in the
paper), short side to size * 8/7 and the centre crop (extraction's sampling), the clips' softmax
averaged into the video's scores: video@1, and clip@1 over every clip.

A video that fails to decode is handed to ``on_failure`` and replaced by the next one of the
rank's stream (its share of the epoch, then a reshuffled copy of it), so an epoch always takes
its ``steps`` full batches and every rank the same number of steps.
"""
from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue
from faster.extract.video import VideoItem
from faster.sampling import Sampling, round_half_up

log = logging.getLogger(__name__)

JITTER = (256, 320)  # the training short side at a 224 crop (the paper's setup; PySlowFast's TRAIN_JITTER_SCALES)


@dataclass(frozen=True)
class Augment:
    """The training clip: ``clip_len`` frames ``frame_stride`` apart, a ``size`` crop out of a short
    side drawn in ``scale`` (pixels), flipped with probability 1/2 when ``flip``."""

    clip_len: int
    size: int
    scale: tuple[int, int]
    frame_stride: int = 1
    flip: bool = True

    @classmethod
    def paper(cls, clip_len: int, size: int, frame_stride: int = 1, flip: bool = True) -> Augment:
        """Short side in [256, 320] at a 224 crop, scaled to ``size``."""
        lo, hi = (round_half_up(size * v / 224) for v in JITTER)
        return cls(clip_len, size, (lo, hi), frame_stride, flip)

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not self.size <= lo <= hi:
            raise BadValue(f"scale jitter {self.scale} must satisfy size {self.size} <= low <= high")

    @property
    def canvas(self) -> int:
        """The side of the square each decode worker resizes a clip's frames to: the top of the jitter."""
        return self.scale[1]

    def sampling(self, start: float | None = None) -> Sampling:
        """How a decode worker reads one training clip starting at fraction ``start`` of the video."""
        return Sampling(clip_len=self.clip_len, num_clips=1, size=self.canvas, short_side=self.canvas,
                        frame_stride=self.frame_stride, start=start)


def draws(seed: int, epoch: int, video: int, repeat: int, augment: Augment) -> tuple[float, float, float, float, bool]:
    """(start, scale, top, left, flip) of one training clip: start/top/left fractions in [0, 1], the
    short side ``scale`` in pixels; a pure function of its arguments."""
    rng = np.random.default_rng([seed, epoch, video, repeat])
    start, scale, top, left, coin = rng.random(5)
    lo, hi = augment.scale
    return float(start), float(lo + scale * (hi - lo)), float(top), float(left), bool(augment.flip and coin < 0.5)


def augment(frames: Any, params: Any, augment: Augment, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """(B, L, C, C, 3) uint8 canvases on the training device, ``params`` (B, 4): scale, top, left,
    flip per clip -> (B, 3, L, size, size) float, normalised: the crop, the scale, the flip (the
    one resize: the crop window is size * C / scale canvas pixels, resized to size)."""
    import torch
    from torch.nn import functional

    from faster.extract.video import normalise_clips

    b, _, c = frames.shape[:3]
    size = augment.size
    x = frames.permute(0, 1, 4, 2, 3).float()  # (B, L, 3, C, C)
    out = []
    for i, (scale, top, left, flip) in enumerate(params.tolist()):
        w = min(c, max(size, round_half_up(size * c / scale)))
        y0, x0 = round_half_up(top * (c - w)), round_half_up(left * (c - w))
        xi = x[i, :, :, y0:y0 + w, x0:x0 + w]
        if w != size:
            xi = functional.interpolate(xi, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flip > 0.5:
            xi = xi.flip(-1)
        out.append(xi)
    x = torch.stack(out).permute(0, 1, 3, 4, 2)  # (B, L, size, size, 3), values in [0, 255]
    return normalise_clips(x, mean, std)


@dataclass
class Batch:
    frames: Any  # (B, L, C, C, 3) uint8 canvases
    labels: Any  # (B,) int64
    params: Any  # (B, 4) float: scale, top, left, flip


class EpochStream:
    """One rank's training clips of one epoch, as batches of ``batch_size``, in a fixed order.

    The order is a permutation drawn from (seed, epoch); the rank takes its share
    (:meth:`faster.engine.Distributed.shard`), followed by a reshuffled copy of that share from
    which failed videos are replaced. ``steps`` batches are taken: len(share) // batch_size (at
    least one). A resumed epoch passes ``start`` (the stream entries used so far: the saved
    :meth:`position`) and ``done`` (the batches taken so far); iteration then yields the rest.
    """

    def __init__(self, items: list[VideoItem], *, seed: int, epoch: int, dist: Any, batch_size: int, aug: Augment,
                 workers: int, decoder: str = "auto", timeout: float = 300.0, pin_memory: bool = False,
                 start: int = 0, done: int = 0, on_failure: Callable[[Any], None] | None = None):
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        share = dist.shard(order)
        backup = np.random.default_rng([seed, epoch, 1 + dist.rank]).permutation(share)
        self.entries = [(int(v), 0) for v in share] + [(int(v), 1) for v in backup]
        self.batch = min(batch_size, len(share))
        self.steps = max(1, len(share) // batch_size) if len(share) else 0
        self.items, self.seed, self.epoch, self.aug = items, seed, epoch, aug
        self.workers, self.decoder, self.timeout, self.pin_memory = workers, decoder, timeout, pin_memory
        self.start = self._position = int(start)
        self.done = int(done)
        self.on_failure = on_failure

    def position(self) -> int:
        return self._position

    def __iter__(self) -> Iterator[Batch]:
        import torch

        from faster.extract.decoders import DecodePool, Failed, InlineDecoder

        entries = self.entries[self.start:]
        todo = [self.items[v] for v, _ in entries]
        params = [draws(self.seed, self.epoch, v, r, self.aug) for v, r in entries]
        samplings = [self.aug.sampling(p[0]) for p in params]
        base = self.aug.sampling(0.0)
        if self.workers > 0:
            dec = DecodePool(todo, base, workers=self.workers, timeout=self.timeout, pin_memory=self.pin_memory,
                             decoder=self.decoder, samplings=samplings)
        else:
            dec = InlineDecoder(todo, base, decoder=self.decoder, samplings=samplings)
        waiting: dict[int, Any] = {}
        nxt = 0  # index into ``entries`` of the next result to use
        frames: list[Any] = []
        labels: list[int] = []
        rows: list[tuple[float, float, float, float]] = []
        remaining = self.steps - self.done
        try:
            while remaining > 0:
                while nxt not in waiting:
                    if nxt >= len(entries):
                        raise BadFile(f"epoch {self.epoch}: too many videos failed to decode to fill "
                                      f"{self.steps} batches of {self.batch} (see failures.jsonl)")
                    try:
                        r = dec.get(timeout=1.0)
                    except queue.Empty:
                        continue
                    if r is None:
                        raise RuntimeError(f"the decoder ended without video {nxt} of the stream")
                    waiting[r.index] = r
                r = waiting.pop(nxt)
                nxt += 1
                if isinstance(r, Failed):
                    if self.on_failure is not None:
                        self.on_failure(r)
                    continue
                frames.append(r.frames[0])  # (L, C, C, 3)
                labels.append(r.item.label)
                rows.append(params[nxt - 1][1:4] + (float(params[nxt - 1][4]),))  # scale, top, left, flip
                if len(frames) == self.batch:
                    self._position = self.start + nxt
                    remaining -= 1
                    yield Batch(torch.stack(frames), torch.tensor(labels, dtype=torch.int64),
                                torch.tensor(rows, dtype=torch.float32))
                    frames, labels, rows = [], [], []
        finally:
            dec.close()


def validation_sampling(clip_len: int, num_clips: int, size: int, frame_stride: int = 1) -> Sampling:
    """Table 2's test clips: ``num_clips`` uniform clips, short side size * 8/7, centre crop."""
    return Sampling(clip_len=clip_len, num_clips=num_clips, size=size, frame_stride=frame_stride)


def validate(model: Any, items: list[VideoItem], sampling: Sampling, *, device: Any, batch_size: int, workers: int,
             autocast: Callable[[], Any], decoder: str = "auto", timeout: float = 300.0,
             on_failure: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Score ``items`` with Table 2's protocol: {"ids", "labels", "probs" (videos x classes, the
    clips' softmax averaged), "clip_correct" (per video, clips whose own argmax is the label),
    "clips"}. Videos that fail go to ``on_failure`` and are left out."""
    import torch

    from faster.extract.decoders import DecodePool, Failed, InlineDecoder

    model.eval()
    mean, std = model.backbone.mean, model.backbone.std
    ids, labels, probs, clip_correct = [], [], [], []
    dec = (DecodePool(items, sampling, workers=workers, timeout=timeout, decoder=decoder,
                      pin_memory=device.type == "cuda") if workers > 0 else
           InlineDecoder(items, sampling, decoder=decoder))
    from faster.extract.video import normalise_clips

    try:
        with torch.no_grad():
            for r in dec:
                if isinstance(r, Failed):
                    if on_failure is not None:
                        on_failure(r)
                    continue
                clips = r.frames.to(device, non_blocking=True)
                p = []
                for k in range(0, len(clips), batch_size):
                    with autocast():
                        logits = model(normalise_clips(clips[k:k + batch_size], mean, std))
                    p.append(torch.softmax(logits.float(), dim=1))
                p = torch.cat(p)
                ids.append(r.item.id)
                labels.append(r.item.label)
                probs.append(p.mean(0).cpu())
                clip_correct.append(int((p.argmax(1) == r.item.label).sum()))
    finally:
        dec.close()
    model.train()
    return {"ids": ids, "labels": labels, "probs": torch.stack(probs).numpy() if probs else np.zeros((0, 0)),
            "clip_correct": clip_correct, "clips": sampling.clips}
