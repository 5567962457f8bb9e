"""Expensive:cheap clip patterns (paper Tables 3 and 4; docs/format.md "Patterns").

``all-e``: every clip expensive. ``all-c``: every clip cheap. ``first``: only clip 0 expensive
(Table 3). ``1:N``: positions 0, N+1, 2(N+1), ... expensive, the rest cheap, valid only when N+1
divides the number of clips (Table 4 leaves the other cells empty). ``1:0`` equals ``all-e``.
These are the fixed schedules; aggregate/schedule.py puts them beside the learned policy.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

from faster.errors import BadValue

_RATIO = re.compile(r"^1:(\d+)$")
NAMED = ("all-e", "all-c", "first")


def check(pattern: str) -> str:
    """Return ``pattern`` if its syntax is valid; raise BadValue naming it otherwise."""
    if pattern in NAMED or _RATIO.match(pattern):
        return pattern
    raise BadValue(f"unknown pattern {pattern!r}; expected all-e, all-c, first or 1:N with N >= 0 "
                   f"(expensive clips 0, N+1, 2(N+1), ...; 1:0 is all-e)")


def expensive_mask(pattern: str, num_clips: int) -> list[bool]:
    """True at the clip positions the expensive backbone processes."""
    check(pattern)
    if num_clips < 1:
        raise BadValue(f"num_clips must be >= 1, got {num_clips}")
    if pattern == "all-e":
        return [True] * num_clips
    if pattern == "all-c":
        return [False] * num_clips
    if pattern == "first":
        return [i == 0 for i in range(num_clips)]
    x = int(_RATIO.match(pattern).group(1))
    if num_clips % (x + 1):
        raise BadValue(f"pattern {pattern!r} needs the number of clips to be a multiple of {x + 1}, "
                         f"got {num_clips}")
    return [i % (x + 1) == 0 for i in range(num_clips)]


def is_valid(pattern: str, num_clips: int) -> bool:
    try:
        expensive_mask(pattern, num_clips)
    except ValueError:
        return False
    return True


def counts(pattern: str, num_clips: int) -> tuple[int, int]:
    """(#expensive, #cheap) clips."""
    mask = expensive_mask(pattern, num_clips)
    return sum(mask), num_clips - sum(mask)


def subset_positions(num_extracted: int, num_clips: int) -> list[int]:
    """Which of N extracted clips a run on n of them uses: round(i * (N-1) / (n-1)), half up."""
    if not 1 <= num_clips <= num_extracted:
        raise BadValue(f"--num-clips must be between 1 and the {num_extracted} extracted clips, "
                         f"got {num_clips}")
    if num_clips == 1:
        return [0]
    return [int(math.floor(i * (num_extracted - 1) / (num_clips - 1) + 0.5)) for i in range(num_clips)]


def sources(positions: Sequence[int], mask: Sequence[bool], expensive: str,
            cheap: str) -> dict[str, tuple[str, list[int]]]:
    """Source ("expensive", "cheap") -> (model, the extracted clip positions it reads) for ``mask``
    over ``positions``; a source with no position is left out (an expensive position never reads
    cheap features). ``positions`` may also be an (videos, n) array, one draw per video
    (``--train-clips jitter``): the mask applies to each row and each source gets such an array."""
    if getattr(positions, "ndim", 1) == 2:
        keep = [bool(m) for m in mask]
        return {src: (model, positions[:, [k for k, m in enumerate(keep) if m == want]])
                for src, model, want in (("expensive", expensive, True), ("cheap", cheap, False)) if want in keep}
    out: dict[str, tuple[str, list[int]]] = {}
    for src, model, want in (("expensive", expensive, True), ("cheap", cheap, False)):
        pos = [int(p) for p, m in zip(positions, mask) if bool(m) == want]
        if pos:
            out[src] = (model, pos)
    return out


def video_gflops(num_expensive: int, num_cheap: int, expensive_gflops: float, cheap_gflops: float,
                 aggregator_gflops: float) -> float:
    """A pattern's cost per video (docs/format.md "Patterns"): #E x E + #C x C per-clip GFLOPs + the
    aggregator's own (Table 4's GFLOPs column)."""
    return num_expensive * float(expensive_gflops) + num_cheap * float(cheap_gflops) + float(aggregator_gflops)
