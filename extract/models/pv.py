"""pytorchvideo's Kinetics-400 models up to their head, built by pytorchvideo itself (optional extra ``zoo``).

``pip install -e ".[zoo]"`` installs pytorchvideo 0.1.5. Only ``pytorchvideo.models`` is imported
(its ``transforms`` package does not import on current torchvision). Each backbone is
``pytorchvideo.models.hub.<arch>(pretrained=False)`` truncated before its head
(``blocks[:-1]``): the zoo files (``R2PLUS1D_16x4_R50.pyth``, ``SLOW_8x8_R50.pyth``,
``X3D_XS.pyth``, ``X3D_S.pyth``, ``X3D_M.pyth``, ``CSN_32x2_R101.pyth``: ``torch.save`` dicts whose
``"model_state"`` is the model's state dict) load key for key, the head's keys dropped.

``forward`` returns the output of ``blocks[-2]`` (the last stage, "res5"; for X3D before its
head's conv5): (B, C, T', H/32, W/32). pytorchvideo's ``r2plus1d_r50`` is its own network (stem 64
wide, temporal-first factorisation, no parameter-matched widths), not the paper's R(2+1)D-50.
Inputs are RGB in [0, 1] normalised with mean 0.45 and std 0.225 (pytorchvideo's Kinetics
statistics). Native inputs (frames, crop) are those of the zoo's test views.
"""
from __future__ import annotations

import torch
from torch import nn

from faster.errors import BadValue

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
INSTALL = 'pip install -e ".[zoo]"'

# registry name -> (pytorchvideo.models.hub builder, channels out, temporal stride, native (frames, px))
_MODELS = {
    "pv_r2plus1d_r50": ("r2plus1d_r50", 2048, 4, (16, 256)),
    "pv_slow_r50": ("slow_r50", 2048, 1, (8, 256)),
    "pv_x3d_xs": ("x3d_xs", 192, 1, (4, 182)),
    "pv_x3d_s": ("x3d_s", 192, 1, (13, 182)),
    "pv_x3d_m": ("x3d_m", 192, 1, (16, 256)),
    "pv_csn_r101": ("csn_r101", 2048, 8, (32, 256)),
}


def _hub(name: str):
    try:
        from pytorchvideo.models import hub
    except ImportError as err:
        raise BadValue(f"backbone {name!r} needs pytorchvideo ({type(err).__name__}: {err}); "
                         f"install the optional extra: {INSTALL}") from None
    return hub


class PytorchvideoBackbone(nn.Module):
    """``blocks[:-1]`` of a pytorchvideo model; ``forward`` returns the last stage's map."""

    layer = "res5"
    mean = MEAN
    std = STD
    spatial_stride = 32
    min_frames = 1

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _MODELS:
            raise BadValue(f"unknown pytorchvideo backbone {name!r}; expected one of {', '.join(_MODELS)}")
        arch, self.out_channels, self.temporal_stride, self.native_input = _MODELS[name]
        net = getattr(_hub(name), arch)(pretrained=False)
        self.arch = arch
        self.blocks = nn.ModuleList(list(net.blocks)[:-1])  # pytorchvideo's keys: blocks.0 ... blocks.4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3:
            raise BadValue(f"{getattr(self, 'name', self.arch)} expects (B, 3, L, H, W), got {tuple(x.shape)}")
        for block in self.blocks:
            x = block(x)
        return x  # (B, out_channels, L / temporal_stride, H/32, W/32)


def pv_r2plus1d_r50() -> PytorchvideoBackbone:
    """pytorchvideo R(2+1)D-R50 (R2PLUS1D_16x4_R50.pyth): 2048 channels, T' = L/4."""
    return PytorchvideoBackbone("pv_r2plus1d_r50")


def pv_slow_r50() -> PytorchvideoBackbone:
    """pytorchvideo Slow-R50 (SLOW_8x8_R50.pyth): 2048 channels, T' = L."""
    return PytorchvideoBackbone("pv_slow_r50")


def pv_x3d_xs() -> PytorchvideoBackbone:
    """pytorchvideo X3D-XS (X3D_XS.pyth): 192 channels, T' = L."""
    return PytorchvideoBackbone("pv_x3d_xs")


def pv_x3d_s() -> PytorchvideoBackbone:
    """pytorchvideo X3D-S (X3D_S.pyth): 192 channels, T' = L."""
    return PytorchvideoBackbone("pv_x3d_s")


def pv_x3d_m() -> PytorchvideoBackbone:
    """pytorchvideo X3D-M (X3D_M.pyth): 192 channels, T' = L."""
    return PytorchvideoBackbone("pv_x3d_m")


def pv_csn_r101() -> PytorchvideoBackbone:
    """pytorchvideo ir-CSN-R101 (CSN_32x2_R101.pyth): 2048 channels, T' = L/8."""
    return PytorchvideoBackbone("pv_csn_r101")
