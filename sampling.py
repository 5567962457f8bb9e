"""Uniform clip sampling (paper, "Experimental Setups": N clips of L frames spread over the video).

start_i = round(i * (F - span) / (N - 1)) for N > 1 and the centred start for N = 1, where
span = (L - 1) * stride + 1. A video shorter than one span starts every clip at 0 and repeats its
last frame (``frame_indices`` clamps). Rounding is half-up everywhere, so extraction and predict
agree bit for bit.

``Sampling`` is the one value that says which clips of a video are decoded and at what size:
extraction builds it from its configuration, predict from a fitted run's extraction values, and
the decoders (faster.extract.video, faster.extract.decoders) take it as it is.

Models at their own sampling (``--clip-len NAME=L --frame-stride NAME=S``, docs/format.md "Clip
sampling"): every model's clip covers the same time span, L x S frames, from the same clip start,
as SlowFast's two pathways sample one clip (Feichtenhofer et al. 2019, Sec. 3: the Slow pathway's
T frames at stride tau, the Fast pathway's alpha*T at tau/alpha). ``clip_grid`` gives the one
sampling every model's frames are drawn from (stride g = the gcd of the strides, enough frames for
the longest reach), decoded once; ``grid_frames`` the frames of the grid one model takes (every
S/g-th). With one sampling for every model the grid is that sampling itself.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from faster.errors import BadValue


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def clip_span(clip_len: int, frame_stride: int = 1) -> int:
    """Frames covered by one clip: (L - 1) * s + 1."""
    return (clip_len - 1) * frame_stride + 1


def clip_starts(num_frames: int, num_clips: int, clip_len: int, frame_stride: int = 1) -> list[int]:
    """First frame of each of ``num_clips`` clips, spread evenly over ``num_frames`` frames."""
    if num_frames < 1:
        raise BadValue(f"num_frames must be >= 1, got {num_frames}")
    if num_clips < 1 or clip_len < 1 or frame_stride < 1:
        raise BadValue(f"num_clips, clip_len and frame_stride must be >= 1, got "
                         f"{num_clips}, {clip_len}, {frame_stride}")
    room = max(num_frames - clip_span(clip_len, frame_stride), 0)
    if num_clips == 1:
        return [room // 2]
    return [round_half_up(i * room / (num_clips - 1)) for i in range(num_clips)]


def frame_indices(starts: list[int], num_frames: int, clip_len: int, frame_stride: int = 1) -> list[list[int]]:
    """Frame index of every frame of every clip, clamped to the last frame that exists."""
    last = num_frames - 1
    return [[min(s + j * frame_stride, last) for j in range(clip_len)] for s in starts]


def clip_grid(per_model: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(clip_len, frame_stride) of the grid every model's frames are taken from, for each model's
    (clip_len L, frame_stride S): stride g = gcd of the S, and as many frames as the model reaching
    furthest needs ((L - 1) * S / g + 1). Every model's clip must cover the same span L x S (so clip
    position t is the same moment for each); BadValue naming two models and their spans otherwise."""
    if not per_model:
        raise BadValue("no models to sample for")
    checked = {m: (_count(f"{m} clip_len", L), _count(f"{m} frame_stride", S)) for m, (L, S) in per_model.items()}
    first, (L0, S0) = next(iter(checked.items()))
    for m, (L, S) in checked.items():
        if L * S != L0 * S0:
            raise BadValue(f"clip span mismatch: {first} covers {L0} x {S0} = {L0 * S0} frames, {m} {L} x {S} = "
                           f"{L * S}; every model's clip must cover the same span (clip_len x frame_stride)")
    g = math.gcd(*(S for _, S in checked.values()))
    return max((L - 1) * S // g + 1 for L, S in checked.values()), g


def grid_frames(clip_len: int, frame_stride: int, grid_stride: int) -> tuple[int, ...]:
    """The frames of a clip grid at ``grid_stride`` (``clip_grid``) that a model sampling ``clip_len``
    frames ``frame_stride`` apart takes: every (frame_stride / grid_stride)-th from the first."""
    if frame_stride % grid_stride:
        raise BadValue(f"frame_stride {frame_stride} is not a multiple of the grid's stride {grid_stride}")
    step = frame_stride // grid_stride
    return tuple(range(0, clip_len * step, step))


def _count(name: str, value: object) -> int:
    """``value`` as an int >= 1; BadValue naming ``name`` otherwise."""
    try:
        number = operator.index(value)  # ints and numpy integers; not floats or strings
    except TypeError:
        raise BadValue(f"{name} must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or number < 1:
        raise BadValue(f"{name} must be >= 1, got {value}")
    return int(number)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Which clips of a video are decoded, and how (docs/format.md "Clip sampling").

    ``num_clips`` clips of ``clip_len`` frames, ``frame_stride`` apart, spread uniformly over the
    video; each frame's short side resized to ``size`` * 8/7 and the centre ``size`` x ``size``
    crop kept. ``positions``, when given, keeps only those of the ``num_clips`` clips, in that
    order (predict on a fitted run's subset): their frames are exactly those a full decode gives
    at those positions. Validated once, here: every count >= 1, positions distinct and in
    [0, num_clips) (stored as a tuple of ints).

    Training (``faster train-clip``) decodes one clip per video differently: ``start``, a fraction
    in [0, 1], puts the one clip (``num_clips`` must be 1) at frame round(start * (frames - span))
    instead of the middle, and ``short_side`` resizes the short side to that many pixels instead of
    size * 8/7 (>= ``size``; equal to it keeps the centre square).
    """

    clip_len: int
    num_clips: int
    size: int
    frame_stride: int = 1
    positions: tuple[int, ...] | None = None
    short_side: int | None = None
    start: float | None = None

    def __post_init__(self) -> None:
        for name in ("clip_len", "num_clips", "size", "frame_stride"):
            object.__setattr__(self, name, _count(name, getattr(self, name)))
        if self.positions is not None:
            object.__setattr__(self, "positions", _positions(self.positions, self.num_clips))
        if self.short_side is not None:
            short = _count("short_side", self.short_side)
            if short < self.size:
                raise BadValue(f"short_side must be >= size {self.size}, got {short}")
            object.__setattr__(self, "short_side", short)
        if self.start is not None:
            if self.num_clips != 1:
                raise BadValue(f"a clip start is for one clip per video, got num_clips={self.num_clips}")
            if not 0.0 <= float(self.start) <= 1.0:
                raise BadValue(f"clip start must be a fraction in [0, 1], got {self.start!r}")
            object.__setattr__(self, "start", float(self.start))

    @property
    def resize_short(self) -> int:
        """The short side frames are resized to before the centre crop."""
        return self.short_side if self.short_side is not None else round_half_up(self.size * 8 / 7)

    @property
    def clips(self) -> int:
        """Clips decoded per video: ``len(positions)``, else ``num_clips``."""
        return self.num_clips if self.positions is None else len(self.positions)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """One video's decoded clips: (clips, L, size, size, 3) uint8 RGB."""
        return (self.clips, self.clip_len, self.size, self.size, 3)

    @property
    def span(self) -> int:
        """Frames covered by one clip."""
        return clip_span(self.clip_len, self.frame_stride)

    def starts(self, num_frames: int) -> list[int]:
        """First frame of each decoded clip of a video of ``num_frames`` frames (at ``positions`` only)."""
        if self.start is not None:
            return [round_half_up(self.start * max(num_frames - self.span, 0))]
        starts = clip_starts(num_frames, self.num_clips, self.clip_len, self.frame_stride)
        return starts if self.positions is None else [starts[p] for p in self.positions]

    def frame_indices(self, starts: list[int], num_frames: int) -> list[list[int]]:
        """Frame index of every frame of the clips starting at ``starts``, clamped to the last frame."""
        return frame_indices(starts, num_frames, self.clip_len, self.frame_stride)


def _positions(positions: Iterable[int], num_clips: int) -> tuple[int, ...]:
    try:
        values = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise BadValue(f"clip positions {positions!r} must be integers in [0, {num_clips})") from None
    if not values or len(set(values)) != len(values) or not all(0 <= p < num_clips for p in values):
        raise BadValue(f"clip positions {list(values)} must be distinct indices in [0, {num_clips})")
    return values
