"""The aggregator's own cost per video (the "+ FAST-GRU" share of Table 4's GFLOPs).

Counted, not hand-written: the aggregator's batched forward runs on meta tensors under
faster.macs.count_macs (multiply-adds, the paper's convention). For FAST-GRU this comes out at
3.5 C^2 multiply-adds per map position for each of the steps 1..N-1 (o_0 = x_0 is free), plus the
final fc: e.g. 20.1 GFLOPs for 32-frame x 8-clip R(2+1)D-50 maps (4 x 7 x 7 x 2048), the gap
between Table 2's 959.2 and Table 4's 979.2.

A long video is arithmetic, not a longer count: an aggregator's cost is a sum of per-clip steps, so
masks of up to ``2 * EXACT_CLIPS`` clips are counted as they are, and a longer one is the count of
its first ``2 * EXACT_CLIPS`` clips plus, for every later clip, the counted cost of one more step
after a clip of the same kind (``(previous, this)``: expensive or cheap). The step costs are
checked against an exact count first (the first ``EXACT_CLIPS`` clips plus steps must give the
count of ``2 * EXACT_CLIPS``); an aggregator they do not describe is counted whole, with a warning.
So `faster flops --num-clips 100000` costs what 32 clips do.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from faster.errors import BadValue
from faster.macs import cached_count, count_macs

log = logging.getLogger(__name__)


EXACT_CLIPS = 16  # masks up to twice this are counted whole; longer ones add counted per-clip steps


def count_gflops(agg: str, kwargs: dict[str, Any], mask: Sequence[bool]) -> float:
    """GFLOPs (multiply-adds / 1e9) of one video through aggregator ``agg`` built with ``kwargs``
    (including its alignment projections) for the expensive ``mask`` of the clips; counted once per
    machine and configuration, then read from the per-user cache (faster.macs.cached_count). A mask
    longer than ``2 * EXACT_CLIPS`` is arithmetic on counted per-clip steps (module docstring)."""
    mask = [bool(m) for m in mask]
    P = EXACT_CLIPS
    if len(mask) <= 2 * P:
        return _exact(agg, kwargs, mask)
    step = _steps(agg, kwargs, mask)  # step_gflops(...)[-1] without its other prefixes
    if step is None:  # not a sum of per-clip steps: count the whole mask
        return _exact(agg, kwargs, mask)
    return _exact(agg, kwargs, mask[:2 * P]) + sum(step[mask[k - 1], mask[k]] for k in range(2 * P, len(mask)))


def step_gflops(agg: str, kwargs: dict[str, Any], mask: Sequence[bool]) -> list[float]:
    """``count_gflops`` of every prefix of ``mask`` (``mask[:1]``, ..., the whole mask): what a video
    left after s clips costs, for every s, in time linear in the mask's length."""
    mask = [bool(m) for m in mask]
    head = [_exact(agg, kwargs, mask[:s]) for s in range(1, min(len(mask), 2 * EXACT_CLIPS) + 1)]
    if len(mask) <= 2 * EXACT_CLIPS:
        return head
    step = _steps(agg, kwargs, mask)
    if step is None:  # not a sum of per-clip steps: count the whole mask (slow for a long one)
        return head + [_exact(agg, kwargs, mask[:s]) for s in range(len(head) + 1, len(mask) + 1)]
    out, total = head, head[-1]
    for k in range(len(head), len(mask)):
        total += step[mask[k - 1], mask[k]]
        out.append(total)
    return out


def _steps(agg: str, kwargs: dict[str, Any], mask: list[bool]) -> dict[tuple[bool, bool], float] | None:
    """The counted cost of one more clip ``b`` after a clip ``a``, for each (a, b) in ``mask``; None
    (with a warning) when they do not reproduce the exact count of the first 2 * EXACT_CLIPS clips."""
    P = EXACT_CLIPS
    pairs = {(mask[k - 1], mask[k]) for k in range(P, len(mask))}
    base = {a: _exact(agg, kwargs, [a] * P) for a in {a for a, _ in pairs}}
    step = {(a, b): _exact(agg, kwargs, [a] * P + [b]) - base[a] for a, b in pairs}
    predicted = _exact(agg, kwargs, mask[:P]) + sum(step[mask[k - 1], mask[k]] for k in range(P, 2 * P))
    exact = _exact(agg, kwargs, mask[:2 * P])
    if not math.isclose(predicted, exact, rel_tol=1e-9, abs_tol=1e-12):
        log.warning("%s: the cost of %d clips is not a sum of per-clip steps (%.6g counted, %.6g from the "
                    "steps): counting all %d clips", agg, 2 * P, exact, predicted, len(mask))
        return None
    return step


def _exact(agg: str, kwargs: dict[str, Any], mask: Sequence[bool]) -> float:
    """The counted GFLOPs of ``mask`` (a meta forward over its clips), cached per user."""
    import json
    import sys

    from faster.aggregate import get

    cls = get(agg)
    sources = sorted({getattr(sys.modules.get(c.__module__), "__file__", "") or "" for c in cls.__mro__
                      if c.__module__.startswith("faster.")} | {__file__})
    key = f"aggregator|{agg}|{json.dumps(kwargs, sort_keys=True, default=str)}|{''.join('E' if m else 'C' for m in mask)}"
    return float(cached_count(key, sources, lambda: _count(agg, kwargs, mask)))


def _count(agg: str, kwargs: dict[str, Any], mask: Sequence[bool]) -> float:
    import torch

    from faster.aggregate.models import build

    with torch.device("meta"):
        model = build(agg, **kwargs).eval()
    sources = kwargs["sources"]
    n = {"expensive": sum(bool(m) for m in mask), "cheap": sum(not m for m in mask)}
    # one video as the shards store it, channels last: (1, n, T', H', W', C) per source
    x = {src: torch.empty((1, n[src], *sources[src][1:], sources[src][0]), device="meta")
         for src in sources if n[src]}
    with torch.no_grad():
        macs = count_macs(model, x, list(mask))
    return macs / 1e9


def aggregator_gflops(agg: str, channels: int, grid: tuple[int, int, int], num_clips: int,
                      num_classes: int = 400) -> float:
    """The aggregator's own GFLOPs per video for N = ``num_clips`` maps of ``grid`` (T', H', W') x
    ``channels`` from sources of equal shape (no alignment projections), as in the paper."""
    if num_clips < 1:
        raise BadValue(f"num_clips must be >= 1, got {num_clips}")
    shape = [int(channels), *(int(g) for g in grid)]
    kwargs = {"num_classes": num_classes, "sources": {"expensive": shape, "cheap": shape}, "dropout": 0.0}
    mask = [i % 2 == 0 for i in range(num_clips)]  # any mix: the sources have equal shapes
    return count_gflops(agg, kwargs, mask)
