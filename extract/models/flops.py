"""Per-clip cost of a backbone in GFLOPs, counted as multiply-adds (the paper's convention, Table 2).

Counted on meta tensors through :func:`faster.flops.count_macs`: no weights are allocated and no
real forward runs, so a full-size backbone costs milliseconds. Reproduces Table 2 (R2D-26
3.17 / 6.33 / 12.67, R(2+1)D-50 29.98 / 59.96 / 119.92 at 8 / 16 / 32 frames, 224 px) and Table 6
(R3D-50 117.84 per 32-frame clip, 942.7 for 8 clips).
"""
from __future__ import annotations

import functools

from faster.errors import BadValue


@functools.lru_cache(maxsize=None)
def clip_gflops(name: str, clip_len: int, size: int = 224) -> float:
    """GFLOPs (multiply-adds / 1e9) of one ``clip_len``-frame clip at ``size`` x ``size`` through ``name``."""
    return _meta_forward(name, clip_len, size)[0] / 1e9


def feature_shape(name: str, clip_len: int, size: int = 224) -> tuple[int, int, int, int]:
    """(C, T', H', W') of the map ``name`` gives for one clip, e.g. (2048, 1, 7, 7) for r2plus1d50 at 8x224."""
    return _meta_forward(name, clip_len, size)[1]


@functools.lru_cache(maxsize=None)
def _meta_forward(name: str, clip_len: int, size: int) -> tuple[int, tuple[int, int, int, int]]:
    import torch

    from faster.extract.models import get
    from faster.flops import count_macs

    builder = get(name)
    if clip_len < 1 or size < 1:
        raise BadValue(f"clip_len and size must be >= 1, got clip_len={clip_len}, size={size}")
    with torch.device("meta"):
        model = builder().eval()
        model.name = name
        clip = torch.empty(1, 3, clip_len, size, size)  # (B, 3, L, H, W)
    out = []
    try:
        macs = count_macs(lambda x: out.append(model(x)), clip)
    except RuntimeError as err:  # e.g. a kernel larger than the (padded) input
        raise BadValue(f"{name} cannot run a {clip_len}-frame clip at {size} px: "
                         f"{str(err).splitlines()[0]}") from None
    _, C, T, H, W = out[0].shape  # (1, C, T', H', W')
    return macs, (C, T, H, W)
