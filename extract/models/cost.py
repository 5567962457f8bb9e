"""What a backbone costs and gives per clip, without running it: GFLOPs counted as multiply-adds
(the paper's convention, Table 2) and the shape of its last-stage map.

Counted on meta tensors through :func:`faster.macs.count_macs`: no weights are allocated and no
real forward runs (:func:`build_on_meta`), so a full-size backbone costs milliseconds. Reproduces
Table 2 (R2D-26 3.17 / 6.33 / 12.67, R(2+1)D-50 29.98 / 59.96 / 119.92 at 8 / 16 / 32 frames,
224 px) and Table 6 (R3D-50 117.84 per 32-frame clip, 942.7 for 8 clips).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from faster.errors import BadValue

if TYPE_CHECKING:
    from torch import nn


@functools.cache
def clip_gflops(name: str, clip_len: int, size: int = 224) -> float:
    """GFLOPs (multiply-adds / 1e9) of one ``clip_len``-frame clip at ``size`` x ``size`` through ``name``."""
    return _meta_forward(name, clip_len, size)[0] / 1e9


def feature_shape(name: str, clip_len: int, size: int = 224) -> tuple[int, int, int, int]:
    """(C, T', H', W') of the map ``name`` gives for one clip, e.g. (2048, 1, 7, 7) for r2plus1d50 at 8x224."""
    return _meta_forward(name, clip_len, size)[1]


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_")


def build_on_meta(builder: Callable[[], nn.Module]) -> nn.Module:
    """``builder()`` on the meta device, its random init skipped: the architecture without weights,
    for counting its cost or reading its attributes (``models.describe``)."""
    import torch

    with torch.device("meta"), _no_random_init():
        return builder()


@contextlib.contextmanager
def _no_random_init():
    """torch.nn.init's fills as no-ops while a backbone is built on the meta device.

    A meta tensor has no values to fill, but its random fills go through torch._refs, whose first
    use imports torch._dynamo: most of `faster flops`'s and an extraction's start-up (BENCHMARKS.md
    "Start-up"). The layers call these functions through the module (``init.x_``), so replacing the
    module attributes for the duration of the build is enough.
    """
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _identity(x):
    return x


@functools.cache
def _meta_forward(name: str, clip_len: int, size: int) -> tuple[int, tuple[int, int, int, int]]:
    """(multiply-adds, (C, T', H', W')) of one clip through ``name``: counted once per machine and
    configuration (faster.macs.cached_count), then read from the per-user cache."""
    import sys

    from faster.extract.models import get
    from faster.macs import cached_count

    if clip_len < 1 or size < 1:
        raise BadValue(f"clip_len and size must be >= 1, got clip_len={clip_len}, size={size}")
    builder = get(name)
    sources = [getattr(sys.modules.get(builder.__module__), "__file__", "") or "", __file__]
    sources += [str(p) for p in getattr(builder, "sources", ())]  # e.g. an hf: directory's config.json
    macs, shape = cached_count(f"backbone|{name}|{clip_len}|{size}", sources,
                               lambda: _count_backbone(name, builder, clip_len, size))
    return int(macs), tuple(int(v) for v in shape)


def _count_backbone(name: str, builder, clip_len: int, size: int) -> list:
    import torch

    from faster.macs import count_macs

    model = build_on_meta(builder).eval()
    model.name = name
    clip = torch.empty(1, 3, clip_len, size, size, device="meta")  # (B, 3, L, H, W)
    for m in model.modules():  # shape-preserving and not counted; their meta kernels import torch._dynamo
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.forward = _identity
    out = []
    try:
        macs = count_macs(lambda x: out.append(model(x)), clip)
    except RuntimeError as err:  # e.g. a kernel larger than the (padded) input
        raise BadValue(f"{name} cannot run a {clip_len}-frame clip at {size} px: "
                       f"{str(err).splitlines()[0]}") from None
    _, C, T, H, W = out[0].shape  # (1, C, T', H', W')
    return [macs, [C, T, H, W]]
