"""The aggregator's own cost per video (the "+ FAST-GRU" share of Table 4's GFLOPs).

Counted, not hand-written: the aggregator's batched forward runs on meta tensors under
faster.macs.count_macs (multiply-adds, the paper's convention). For FAST-GRU this comes out at
3.5 C^2 multiply-adds per map position for each of the steps 1..N-1 (o_0 = x_0 is free), plus the
final fc: e.g. 20.1 GFLOPs for 32-frame x 8-clip R(2+1)D-50 maps (4 x 7 x 7 x 2048), the gap
between Table 2's 959.2 and Table 4's 979.2.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from faster.errors import BadValue
from faster.macs import cached_count, count_macs


def count_gflops(agg: str, kwargs: dict[str, Any], mask: Sequence[bool]) -> float:
    """GFLOPs (multiply-adds / 1e9) of one video through aggregator ``agg`` built with ``kwargs``
    (including its alignment projections) for the expensive ``mask`` of the clips; counted once per
    machine and configuration, then read from the per-user cache (faster.macs.cached_count)."""
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
