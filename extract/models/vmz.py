"""VMZ's video ResNets: R(2+1)D-34 / -152 (Tran et al. 2018; Ghadiyaram et al. 2019) and ir- / ip-CSN-152
(Tran et al. 2019, "Video Classification with Channel-Separated Convolutional Networks", Sec. 3-4).

These are the networks of ``facebookresearch/VMZ`` (``pt/vmz/models``) and ``ig65m-pytorch``, whose
published weights (IG-65M, Sports-1M, Kinetics) are plain state dicts in torchvision's
``VideoResNet`` key layout (``stem.0.weight``, ``layer1.0.conv1.0.0.weight``, ..., ``fc.*``). The
modules here use the same attribute names, so those files load key for key (the classifier is
dropped); ``forward`` returns ``layer4``'s map. Written from the published definitions:

    r2plus1d_34   BasicBlock [3,4,6,3], stem 1x7x7,45 (stride 1,2,2) -> 3x1x1,64, no max-pool
    r2plus1d_152  Bottleneck [3,8,36,3], the same stem, then a 1x3x3 max-pool (stride 1,2,2)
    ir_csn_152    Bottleneck [3,8,36,3], stem 3x7x7,64 + max-pool, middle: depthwise 3x3x3
    ip_csn_152    as ir-CSN with a 1x1x1 conv + BN before the depthwise 3x3x3

The (2+1)D convolution is 1x3x3 (spatial stride) to M channels, BN, ReLU, then 3x1x1 (temporal
stride); M = (in*out*27) // (in*9 + 3*out) from that convolution's own channels (Tran et al. 2018,
Sec. 3.5): 144 inside a 64-wide bottleneck, 230 then 288 for the first BasicBlock of 64 -> 128.
(torchvision's own builder computes M from the block's input for both convolutions of a block;
ig65m-pytorch patches exactly that difference.) Stages 2-4 stride 2 in time and space, also in
the depthwise 3x3x3 and the projection shortcut (stride 2,2,2). Every BatchNorm has eps 1e-3, as
VMZ sets it (Caffe2's); its momentum only matters in training. Inputs are RGB in [0, 1]
normalised with the Kinetics mean / std.

Outputs: T' = ceil(L / 8); H' = H / 16 for r2plus1d_34 (no max-pool), H / 32 for the others.
Native inputs (VMZ's model zoo): R(2+1)D at 112 px (8 or 32 frames for -34, 32 for -152), CSN at
32 x 224 px. FLOPs are multiply-adds of the convolutions (the classifier is not counted).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from faster.errors import BadValue
from faster.extract.models import resnet
from faster.extract.models.resnet import KINETICS_MEAN, KINETICS_STD, VideoResNet

BN_EPS = 1e-3
NormLayer = Callable[[int], nn.Module]
NORM: NormLayer = functools.partial(nn.BatchNorm3d, eps=BN_EPS)
WIDTHS = (64, 128, 256, 512)  # planes of layer1..layer4


def mid_width(in_ch: int, out_ch: int) -> int:
    """Width between the 1x3x3 and the 3x1x1 of a (2+1)D conv with the parameters of a 3x3x3 in_ch -> out_ch."""
    return (in_ch * out_ch * 27) // (in_ch * 9 + 3 * out_ch)


# --- middle convolutions (strategies): (in, out, stride, norm) -> module -------------------------

class Conv2Plus1D(resnet.Conv2Plus1D):
    """1x3x3 to mid_width(in, out) (stride 1,s,s), BN, ReLU, 3x1x1 to ``out_ch`` (stride s,1,1)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__(in_ch, mid_width(in_ch, out_ch), stride, stride, norm_layer, out=out_ch)


class DepthwiseConv3D(nn.Conv3d):
    """ir-CSN: a channel-wise 3x3x3 (one group per channel), stride (s,s,s)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> None:
        if in_ch != out_ch:
            raise BadValue(f"a depthwise convolution keeps its width, got {in_ch} -> {out_ch}")
        super().__init__(in_ch, out_ch, 3, stride, 1, groups=in_ch, bias=False)


class IPDepthwiseConv3D(nn.Sequential):
    """ip-CSN: 1x1x1 (channel interaction), BN, then the depthwise 3x3x3 (no ReLU between)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 1, bias=False),
            norm_layer(out_ch),
            DepthwiseConv3D(out_ch, out_ch, stride, norm_layer),
        )


Middle = Callable[[int, int, int, NormLayer], nn.Module]


# --- blocks (torchvision's attribute names, so the published keys fit) ---------------------------

def _shortcut(in_ch: int, out_ch: int, stride: int, norm_layer: NormLayer) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False), norm_layer(out_ch))


class BasicBlock(nn.Module):
    """Two middle convolutions (the first carries the stride) with BN, plus the shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, middle: Middle, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(middle(in_ch, planes, stride, norm_layer), norm_layer(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(middle(planes, planes, 1, norm_layer), norm_layer(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, planes, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    """1x1x1 to ``planes``, the middle convolution (stride), 1x1x1 to 4 x ``planes``, plus the shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, middle: Middle, norm_layer: NormLayer) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Sequential(nn.Conv3d(in_ch, planes, 1, bias=False), norm_layer(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(middle(planes, planes, stride, norm_layer), norm_layer(planes),
                                   nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv3d(planes, out_ch, 1, bias=False), norm_layer(out_ch))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


# --- stems (strategies) --------------------------------------------------------------------------

def _pool() -> nn.Module:
    return nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))


class R2Plus1DStem(nn.Sequential):
    """1x7x7 to 45 (stride 1,2,2), BN, ReLU, 3x1x1 to 64, BN, ReLU[, 1x3x3 max-pool (stride 1,2,2)]."""

    def __init__(self, norm_layer: NormLayer, pool: bool) -> None:
        layers = [nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False), norm_layer(45), nn.ReLU(inplace=True),
                  nn.Conv3d(45, 64, (3, 1, 1), 1, (1, 0, 0), bias=False), norm_layer(64), nn.ReLU(inplace=True)]
        super().__init__(*layers, *([_pool()] if pool else []))
        self.spatial_stride = 4 if pool else 2


class Conv3DStem(nn.Sequential):
    """3x7x7 to 64 (stride 1,2,2), BN, ReLU, 1x3x3 max-pool (stride 1,2,2)."""

    def __init__(self, norm_layer: NormLayer) -> None:
        super().__init__(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), norm_layer(64),
                         nn.ReLU(inplace=True), _pool())
        self.spatial_stride = 4


# --- the generic network -------------------------------------------------------------------------

class VMZResNet(nn.Module):
    """stem, layer1..layer4 of VMZ's video ResNet; ``forward`` returns layer4's map (B, C, ceil(L/8), H', W')."""

    layer = "layer4"
    mean = KINETICS_MEAN
    std = KINETICS_STD
    temporal_stride = 8
    min_frames = 1

    def __init__(self, *, stem: nn.Module, block: type[BasicBlock] | type[Bottleneck], middle: Middle,
                 depths: Sequence[int], native_input: tuple[int, int],
                 norm_layer: NormLayer = NORM) -> None:
        super().__init__()
        if len(depths) != 4:
            raise BadValue(f"expected 4 stages, got depths={depths!r}")
        self.stem = stem
        in_ch = 64
        for i, (depth, planes) in enumerate(zip(depths, WIDTHS)):
            blocks = []
            for j in range(depth):
                blocks.append(block(in_ch, planes, 2 if i > 0 and j == 0 else 1, middle, norm_layer))
                in_ch = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = in_ch
        self.spatial_stride = stem.spatial_stride * 8
        self.native_input = native_input  # (frames, pixels) of the published checkpoints
        self.reset_parameters()

    # He init of the convolutions (fan-out), BN to identity: as our ResNets and torchvision's
    reset_parameters = VideoResNet.reset_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3:
            raise BadValue(f"{getattr(self, 'name', type(self).__name__)} expects (B, 3, L, H, W), got {tuple(x.shape)}")
        x = self.stem(x)  # (B, 64, L, H/2 or H/4, W/2 or W/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (B, out_channels, ceil(L/8), H/spatial_stride, W/spatial_stride)


# --- builders: one per published variant ---------------------------------------------------------

# name -> (stem, block, middle convolution, depths, native (frames, px))
_CONFIGS = {
    "r2plus1d_34": (lambda: R2Plus1DStem(NORM, pool=False), BasicBlock, Conv2Plus1D, (3, 4, 6, 3), (8, 112)),
    "r2plus1d_152": (lambda: R2Plus1DStem(NORM, pool=True), Bottleneck, Conv2Plus1D, (3, 8, 36, 3), (32, 112)),
    "ir_csn_152": (lambda: Conv3DStem(NORM), Bottleneck, DepthwiseConv3D, (3, 8, 36, 3), (32, 224)),
    "ip_csn_152": (lambda: Conv3DStem(NORM), Bottleneck, IPDepthwiseConv3D, (3, 8, 36, 3), (32, 224)),
}


def _vmz(name: str, depths: Sequence[int] | None = None) -> VMZResNet:
    """The VMZ network ``name``; ``depths`` overrides its blocks per stage (shallow variants for tests)."""
    stem, block, middle, default_depths, native = _CONFIGS[name]
    return VMZResNet(stem=stem(), block=block, middle=middle, depths=depths or default_depths, native_input=native)


def r2plus1d_34() -> VMZResNet:
    """VMZ / ig65m-pytorch R(2+1)D-34 (IG-65M, Kinetics; 8 or 32 frames at 112 px): 512 channels, H/16."""
    return _vmz("r2plus1d_34")


def r2plus1d_152() -> VMZResNet:
    """VMZ R(2+1)D-152 (IG-65M, Sports-1M, Kinetics; 32 frames at 112 px): 2048 channels, H/32."""
    return _vmz("r2plus1d_152")


def ir_csn_152() -> VMZResNet:
    """VMZ ir-CSN-152 (IG-65M, Sports-1M, Kinetics; 32 frames at 224 px): 2048 channels, H/32."""
    return _vmz("ir_csn_152")


def ip_csn_152() -> VMZResNet:
    """VMZ ip-CSN-152 (Sports-1M, Kinetics; 32 frames at 224 px): 2048 channels, H/32."""
    return _vmz("ip_csn_152")
