"""The paper's clip backbones: R(2+1)D-50 and R2D-26 (Table 1), R3D-50 (Table 6).

One generic bottleneck ResNet, :class:`VideoResNet`, configured by small strategy classes: the
stem (:class:`Stem2Plus1D` for R(2+1)D, :class:`StemConv` for R2D and R3D) and the middle
convolution of every bottleneck (:class:`Conv2Plus1D`, :class:`Conv2D`, :class:`Conv3D`). The
variants differ only in the arguments their builders pass.

Table 1, R(2+1)D-50 (output sizes at L frames, 224 px):

    conv1   1x7x7, 45, stride (1,2,2) + BN/ReLU, then 3x1x1, 64      L   x 112 x 112
    pool1   1x3x3 max, stride (1,2,2)                                 L   x  56 x  56
    res2    [1x1x1, 64;  1x3x3, 144;  3x1x1, 64;  1x1x1, 256]  x 3    L   x  56 x  56
    res3    [1x1x1, 128; 1x3x3, 288;  3x1x1, 128; 1x1x1, 512]  x 4    L/2 x  28 x  28
    res4    [1x1x1, 256; 1x3x3, 576;  3x1x1, 256; 1x1x1, 1024] x 6    L/4 x  14 x  14
    res5    [1x1x1, 512; 1x3x3, 1152; 3x1x1, 512; 1x1x1, 2048] x 3    L/8 x   7 x   7

The stride 2 of res3-res5 sits in the first block's 1x3x3 (space) and 3x1x1 (time) convolutions
and in its projection shortcut, never in a 1x1x1 convolution of the residual branch: striding the
first 1x1x1 instead makes the 3x3 convolutions run on a 4x smaller map and the network ~10%
cheaper than Table 2's 30.0 / 60.0 / 119.9 GFLOPs at 8 / 16 / 32 frames (which we reproduce).
The (2+1)D middle widths follow Tran et al. 2018, Sec. 3.5: M = floor(t d^2 N_in N_out /
(d^2 N_in + t N_out)) with t=3, d=3 and N_in = N_out = the inner width (64 -> 144, ...).

R2D-26 (Table 1): conv1 8x7x7, 64, stride (8,2,2), the same pool, 2D bottlenecks [2,2,2,2] with
ResNet-50 widths, spatial stride 2 at res3-res5: L/8 x 7 x 7 x 2048, 3.2 / 6.3 / 12.7 GFLOPs.

R3D-50 (Table 6): conv1 3x7x7, 64, stride (1,2,2), the same pool and stages as R(2+1)D-50 with a
full 3x3x3 middle convolution of the inner width, strided (2,2,2) at res3-res5 like R(2+1)D so
that res5 is again L/8 x 7 x 7 x 2048: 117.8 GFLOPs per 32-frame clip (Table 6: 942.7 for 8).

FLOPs are multiply-adds of the convolutions up to res5 (BN, ReLU, pooling and the classifier are
not counted; the fc would add 0.0008 GFLOPs).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from faster.errors import BadValue

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics: bLVNet-TAM, Swin3D, VideoMAE
IMAGENET_STD = (0.229, 0.224, 0.225)

NormLayer = Callable[[int], nn.Module]


def mid_width_2plus1d(inner: int) -> int:
    """Width of the (2+1)D factorisation with the parameters of a 3x3x3 conv (Tran et al. 2018, Sec. 3.5)."""
    return (3 * 9 * inner * inner) // (9 * inner + 3 * inner)


# --- middle convolutions of a bottleneck (strategies) -------------------------------------------

class Conv2Plus1D(nn.Sequential):
    """(2+1)D: 1x3x3 to ``mid`` channels (spatial stride), BN, ReLU, 3x1x1 to ``out`` (default: back to
    ``inner``; temporal stride). VMZ's zoo networks use it too, with their own widths (vmz.py)."""

    def __init__(self, inner: int, mid: int, stride: int, temporal_stride: int, norm_layer: NormLayer,
                 out: int | None = None) -> None:
        super().__init__(
            nn.Conv3d(inner, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, inner if out is None else out, (3, 1, 1), (temporal_stride, 1, 1), (1, 0, 0), bias=False),
        )


class Conv2D(nn.Sequential):
    """2D: a 1x3x3 convolution per frame (R2D); time is never strided inside the stages."""

    def __init__(self, inner: int, mid: int, stride: int, temporal_stride: int, norm_layer: NormLayer) -> None:
        assert temporal_stride == 1, "a 2D middle convolution cannot stride in time"
        super().__init__(nn.Conv3d(inner, inner, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False))


class Conv3D(nn.Sequential):
    """3D: a full 3x3x3 convolution of the inner width (R3D)."""

    def __init__(self, inner: int, mid: int, stride: int, temporal_stride: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.Conv3d(inner, inner, (3, 3, 3), (temporal_stride, stride, stride), (1, 1, 1), bias=False))


MiddleConv = Callable[[int, int, int, int, NormLayer], nn.Module]


# --- stems (strategies): conv1 of Table 1 -------------------------------------------------------

class Stem2Plus1D(nn.Sequential):
    """R(2+1)D conv1: 1x7x7 to ``mid`` (stride 1,2,2), BN, ReLU, 3x1x1 to ``width``, BN, ReLU."""

    def __init__(self, width: int, mid: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.Conv3d(3, mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), (1, 1, 1), (1, 0, 0), bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
        )
        self.temporal_stride = 1
        self.min_frames = 1


class StemConv(nn.Sequential):
    """A single t x 7 x 7 conv1 (stride t_stride,2,2), BN, ReLU: R2D (8x7x7, stride 8) and R3D (3x7x7)."""

    def __init__(self, width: int, kernel_t: int, stride_t: int, norm_layer: NormLayer) -> None:
        # R2D's 8x7x7 with stride 8 has no temporal padding (L -> L/8); R3D's 3x7x7 keeps L.
        pad_t = 0 if stride_t == kernel_t else kernel_t // 2
        super().__init__(
            nn.Conv3d(3, width, (kernel_t, 7, 7), (stride_t, 2, 2), (pad_t, 3, 3), bias=False),
            norm_layer(width),
            nn.ReLU(inplace=True),
        )
        self.temporal_stride = stride_t
        self.min_frames = kernel_t - 2 * pad_t


# --- the generic network ------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1x1 to ``inner``, the middle convolution (carrying the stride), 1x1x1 to ``out``, plus the shortcut."""

    def __init__(self, in_ch: int, inner: int, out_ch: int, *, middle: MiddleConv, mid: int, stride: int,
                 temporal_stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, inner, 1, bias=False)
        self.bn1 = norm_layer(inner)
        self.conv2 = middle(inner, mid, stride, temporal_stride, norm_layer)
        self.bn2 = norm_layer(inner)
        self.conv3 = nn.Conv3d(inner, out_ch, 1, bias=False)
        self.bn3 = norm_layer(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if in_ch != out_ch or stride != 1 or temporal_stride != 1:
            # projection shortcut, strided like the residual branch
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, (temporal_stride, stride, stride), bias=False), norm_layer(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class VideoResNet(nn.Module):
    """conv1, pool1, res2..res5 of a bottleneck video ResNet; ``forward`` returns res5.

    Maps float (B, 3, L, H, W), normalised with ``mean``/``std``, to (B, C, T', H', W') with
    C = ``out_channels``, T' = L / ``temporal_stride``, H' = H / ``spatial_stride``.
    """

    layer = "res5"
    mean = KINETICS_MEAN
    std = KINETICS_STD
    spatial_stride = 32

    def __init__(self, *, stem: nn.Module, middle: MiddleConv, depths: Sequence[int], inner: Sequence[int],
                 mids: Sequence[int], expansion: int = 4, temporal_strides: Sequence[int] = (1, 2, 2, 2),
                 norm_layer: NormLayer = nn.BatchNorm3d) -> None:
        super().__init__()
        if not len(depths) == len(inner) == len(mids) == len(temporal_strides) == 4:
            raise BadValue(f"expected 4 stages, got depths={depths!r} inner={inner!r} mids={mids!r}")
        self.conv1 = stem
        self.pool1 = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        in_ch = _stem_width(stem)
        for i, (depth, width, mid, t_stride) in enumerate(zip(depths, inner, mids, temporal_strides)):
            blocks = []
            for j in range(depth):
                first = j == 0
                blocks.append(Bottleneck(
                    in_ch, width, width * expansion, middle=middle, mid=mid,
                    stride=2 if first and i > 0 else 1, temporal_stride=t_stride if first else 1,
                    norm_layer=norm_layer))
                in_ch = width * expansion
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
        self.out_channels = in_ch
        self.temporal_stride = stem.temporal_stride
        for s in temporal_strides:
            self.temporal_stride *= s
        self.min_frames = stem.min_frames
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init of the convolutions (fan-out, as torchvision's video ResNets), BN to identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3 or L < self.min_frames:
            raise BadValue(f"{getattr(self, 'name', type(self).__name__)} expects (B, 3, L>={self.min_frames}, H, W), "
                             f"got {tuple(x.shape)}")
        x = self.pool1(self.conv1(x))  # (B, 64, L / stem stride, H/4, W/4)
        x = self.res2(x)
        x = self.res3(x)
        x = self.res4(x)
        return self.res5(x)  # (B, out_channels, T', H/32, W/32)


def _stem_width(stem: nn.Module) -> int:
    convs = [m for m in stem.modules() if isinstance(m, nn.Conv3d)]
    return convs[-1].out_channels


# --- builders: one per variant ------------------------------------------------------------------

FULL_INNER = (64, 128, 256, 512)      # Table 1: inner widths of res2..res5
TINY_INNER = (4, 8, 16, 16)          # test variants: outputs 16/32/64/64, runs in ms at 8x32x32
FULL_STEM, TINY_STEM = 64, 8
FULL_STEM_MID, TINY_STEM_MID = 45, 6  # Table 1: R(2+1)D conv1 1x7x7, 45


def _r2plus1d50(inner: Sequence[int], stem_width: int, stem_mid: int) -> VideoResNet:
    return VideoResNet(stem=Stem2Plus1D(stem_width, stem_mid, nn.BatchNorm3d), middle=Conv2Plus1D,
                       depths=(3, 4, 6, 3), inner=inner, mids=[mid_width_2plus1d(w) for w in inner])


def _r2d26(inner: Sequence[int], stem_width: int) -> VideoResNet:
    return VideoResNet(stem=StemConv(stem_width, 8, 8, nn.BatchNorm3d), middle=Conv2D, depths=(2, 2, 2, 2),
                       inner=inner, mids=inner, temporal_strides=(1, 1, 1, 1))


def _r3d50(inner: Sequence[int], stem_width: int) -> VideoResNet:
    return VideoResNet(stem=StemConv(stem_width, 3, 1, nn.BatchNorm3d), middle=Conv3D, depths=(3, 4, 6, 3),
                       inner=inner, mids=inner)


def r2plus1d50() -> VideoResNet:
    """R(2+1)D-50, the paper's expensive backbone (Table 1): 30.0 GFLOPs per 8-frame clip at 224 px."""
    return _r2plus1d50(FULL_INNER, FULL_STEM, FULL_STEM_MID)


def r2d26() -> VideoResNet:
    """R2D-26, the paper's cheap backbone (Table 1): 3.2 GFLOPs per 8-frame clip at 224 px."""
    return _r2d26(FULL_INNER, FULL_STEM)


def r3d50() -> VideoResNet:
    """R3D-50, the alternative expensive backbone of Table 6: 117.8 GFLOPs per 32-frame clip."""
    return _r3d50(FULL_INNER, FULL_STEM)


def r2plus1d50_tiny() -> VideoResNet:
    """R(2+1)D-50's structure and strides with narrow widths (res5: 64 channels), for tests."""
    return _r2plus1d50(TINY_INNER, TINY_STEM, TINY_STEM_MID)


def r2d26_tiny() -> VideoResNet:
    """R2D-26's structure and strides with narrow widths (res5: 64 channels), for tests."""
    return _r2d26(TINY_INNER, TINY_STEM)


def r3d50_tiny() -> VideoResNet:
    """R3D-50's structure and strides with narrow widths (res5: 64 channels), for tests."""
    return _r3d50(TINY_INNER, TINY_STEM)
