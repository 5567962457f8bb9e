"""bLVNet-TAM (Fan et al., NeurIPS 2019, "More Is Less: Learning Efficient Video Representations by
Big-Little Network and Depthwise Temporal Aggregation") as a clip backbone: ``blvnet_tam50`` and
``blvnet_tam101``, bLResNet-50 / -101 with alpha = 2, beta = 4 and a TAM of 3 blending frames.

Written from the public code (IBM/bLVNet-TAM, ``core/models/blvnet_tam_backbone.py``, Apache-2.0),
with the attribute names of its ``bLVNet_TAM_BACKBONE``, so its files load key for key: the released
``*-bLVNet-TAM-{50,101}-a2-b4-f{N}x2.pth.tar`` (``bLVNet_TAM``'s state dict: ``baseline_model.*``,
``new_fc.*``) and the ImageNet bLResNet files of IBM/BigLittleNet for initialisation (the same keys
without the TAMs, which are then set to the identity); :mod:`.layouts` converts both.

A clip of L frames (L even: ``--clip-len`` is the total frame count, 16 for the paper's "8x2") is
run as L 2D frames. The network, at 224 px:

    conv1 7x7, 64, stride 2 + BN/ReLU, on every frame                     L     x 112 x 112
    TAM over the L frames; frames 1, 3, 5, ... take the big branch (b_conv0 3x3 s2, BN), frames
    0, 2, 4, ... the little one (l_conv0 3x3 to 32, l_conv1 3x3 s2, l_conv2 1x1 to 64, BN/ReLU
    between); frame 2k+1's big and frame 2k's little maps are added, ReLU, bl_init 1x1 + BN/ReLU:
    one fused map per pair of frames                                      L/2   x  56 x  56
    layer1..3 (bLModule, widths 256, 512, 1024): the fused map stands in both slots of its pair;
    TAM over the L slots; the odd slots through the big branch (depth-1 bottlenecks, the first
    strided 2, no ReLU after the last), the even ones through the little branch (max(1,
    depth // 4 - 1) bottlenecks of width / 2, stride 1) and little_e (1x1 back to the width, BN);
    the big map is upsampled to the little one's size (nearest), added, ReLU, and one fusion
    bottleneck (stride 2, 2, 1) gives the pair's next map                  L/2 x 28 / 14 / 14
    layer4: bottlenecks with a TAM in front of each (over the L/2 fused maps), the first strided
    2; its map is what this backbone returns                             L/2   x   7 x   7 x 2048

Bottlenecks are ResNet's (1x1, 3x3 with the stride, 1x1 to 4x the inner width); a projection
shortcut is a 3x3 average pool (stride 2, padding 1) when the block strides, then 1x1 + BN when
the width changes, and it projects the TAM's output while the identity shortcut keeps the block's
input. A TAM gives frame t ReLU(prev * x[t-1] + curr * x[t] + next * x[t+1]) with per-channel
weights (three depthwise 1x1 convolutions), zero beyond the clip's ends; with curr = 1 and prev =
next = 0 it is the identity on the non-negative maps it reads, and the network equals the same
network without TAMs (``BLVNetTAM(..., tam=False)``).

Where the public code copies each fused map into both slots of its pair and gathers the odd and
even slots back, this one keeps one map per pair and computes the TAM of the two slots from it
(:meth:`TAM.pairs`): the same numbers, half the TAM's work in layer1..3 (0.01 GFLOPs of 23.8 at
16 x 224). On the CPU a TAM's depthwise 1x1 convolutions run as the per-channel products they are
(PyTorch runs them group by group there); on CUDA and when counted they are convolutions. Inputs
are RGB in [0, 1] normalised with the ImageNet mean / std, as the public code's transforms do.
FLOPs are multiply-adds of the convolutions, as for every backbone here.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from faster.errors import BadValue
from faster.extract.models.resnet import IMAGENET_MEAN, IMAGENET_STD

DEPTHS = {50: (3, 4, 6, 3), 101: (4, 8, 18, 3)}
WIDTHS = (256, 512, 1024, 2048)  # output channels of layer1..layer4
STEM = 64
EXPANSION = 4


def _earlier(x: torch.Tensor) -> torch.Tensor:
    """(N, T, ...) -> each frame t gets frame t-1's value (zero at t = 0)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def _later(x: torch.Tensor) -> torch.Tensor:
    """(N, T, ...) -> each frame t gets frame t+1's value (zero at the last frame)."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


class TAM(nn.Module):
    """Temporal aggregation module with 3 blending frames: ReLU(prev * x[t-1] + curr * x[t] + next * x[t+1])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.prev = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.next = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.curr = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def _blend(self, x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prev * x, curr * x, next * x), each (N, frames, C, H, W)."""
        convs = (self.prev, self.curr, self.next)
        if x.device.type == "cpu":  # the same products: PyTorch's CPU depthwise 1x1 conv runs group by group,
            # 3-100x slower than a broadcast product (worst in bf16 channels-last, extraction's CPU mode)
            out = tuple(x * conv.weight.view(1, -1, 1, 1).to(x.dtype) for conv in convs)
        else:  # CUDA's depthwise kernels are fine; on meta tensors the convolutions are what cost.py counts
            out = tuple(conv(x) for conv in convs)
        return tuple(t.unflatten(0, (-1, frames)) for t in out)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (N * frames, C, H, W), each clip's frames in a row; the same shape back."""
        p, c, n = self._blend(x, frames)
        return self.relu(_earlier(p) + c + _later(n)).flatten(0, 1)

    def pairs(self, x: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The TAM over a clip of 2 * frames slots in which slots 2k and 2k+1 both hold x's frame k,
        returned as (even slots, odd slots), each (N * frames, C, H, W).

        Slot 2k reads frames k-1, k, k; slot 2k+1 reads k, k, k+1.
        """
        p, c, n = self._blend(x, frames)
        even = self.relu(_earlier(p) + c + n)
        odd = self.relu(p + c + _later(n))
        return even.flatten(0, 1), odd.flatten(0, 1)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """bLNet's projection: a 3x3 average pool (stride 2) if the block strides, a 1x1 + BN if the width changes."""
    layers: list[nn.Module] = []
    if stride != 1:
        layers.append(nn.AvgPool2d(3, stride=2, padding=1))
    if in_ch != out_ch:
        layers += [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
    return nn.Sequential(*layers) if layers else None


class Bottleneck(nn.Module):
    """1x1, 3x3 (stride), 1x1 to ``out_ch`` (inner width out_ch / 4), optionally with a TAM in front."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, last_relu: bool = True, tam: bool = False) -> None:
        super().__init__()
        inner = out_ch // EXPANSION
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)
        self.tam = TAM(in_ch) if tam else None
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor, frames: int = 0) -> torch.Tensor:
        identity = x
        if self.tam is not None:
            x = self.tam(x, frames)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)  # the projection reads the TAM's output, the identity its input
        out = out + identity
        return self.relu(out) if self.last_relu else out


class Stage(nn.ModuleList):
    """``blocks`` bottlenecks, the first with the stride and the projection; ``last_relu=False`` drops
    the ReLU after the last one (only when there are several, as bLNet builds its big branch)."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, stride: int = 1, last_relu: bool = True,
                 tam: bool = False) -> None:
        super().__init__(
            Bottleneck(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1,
                       last_relu=last_relu if (j == blocks - 1 and blocks > 1) else True, tam=tam)
            for j in range(blocks))

    def forward(self, x: torch.Tensor, frames: int = 0) -> torch.Tensor:
        for block in self:
            x = block(x, frames)
        return x


class BigLittle(nn.Module):
    """bLNet's module for bLVNet: the big branch on the odd slots, the little one on the even slots, fused."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, alpha: int, beta: int,
                 tam: bool = True) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.big = Stage(in_ch, out_ch, depth - 1, stride=2, last_relu=False)
        self.little = Stage(in_ch, out_ch // alpha, max(1, depth // beta - 1))
        self.little_e = nn.Sequential(nn.Conv2d(out_ch // alpha, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.fusion = Stage(out_ch, out_ch, 1, stride=stride)
        self.tam = TAM(in_ch) if tam else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x: (N * frames, C, H, W), one fused map per pair of slots; the next fused maps back."""
        little, big = (x, x) if self.tam is None else self.tam.pairs(x, frames)
        big = self.big(big)
        little = self.little_e(self.little(little))
        big = F.interpolate(big, size=little.shape[-2:])  # nearest, the big branch strides once more
        return self.fusion(self.relu(big + little))


class BLVNetTAM(nn.Module):
    """bLVNet-TAM up to layer4: (B, 3, L, H, W), L even -> (B, 2048, L/2, H/32, W/32)."""

    layer = "layer4"
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    out_channels = WIDTHS[-1]
    temporal_stride = 2
    spatial_stride = 32
    min_frames = 2
    native_input = (16, 224)  # (frames, px): the "8x2" models of the paper at 224 px

    def __init__(self, depths: tuple[int, int, int, int], alpha: int = 2, beta: int = 4, tam: bool = True) -> None:
        super().__init__()
        if len(depths) != 4:
            raise BadValue(f"expected 4 stages, got depths={depths!r}")
        little = STEM // alpha
        self.conv1 = nn.Conv2d(3, STEM, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU(inplace=True)
        self.b_conv0 = nn.Conv2d(STEM, STEM, 3, stride=2, padding=1, bias=False)
        self.bn_b0 = nn.BatchNorm2d(STEM)
        self.l_conv0 = nn.Conv2d(STEM, little, 3, stride=1, padding=1, bias=False)
        self.bn_l0 = nn.BatchNorm2d(little)
        self.l_conv1 = nn.Conv2d(little, little, 3, stride=2, padding=1, bias=False)
        self.bn_l1 = nn.BatchNorm2d(little)
        self.l_conv2 = nn.Conv2d(little, STEM, 1, bias=False)
        self.bn_l2 = nn.BatchNorm2d(STEM)
        self.bl_init = nn.Conv2d(STEM, STEM, 1, bias=False)
        self.bn_bl_init = nn.BatchNorm2d(STEM)
        self.tam = TAM(STEM) if tam else None
        ins = (STEM,) + WIDTHS[:2]
        for i, (in_ch, out_ch, depth, stride) in enumerate(zip(ins, WIDTHS[:3], depths[:3], (2, 2, 1))):
            self.add_module(f"layer{i + 1}", BigLittle(in_ch, out_ch, depth, stride, alpha, beta, tam=tam))
        self.layer4 = Stage(WIDTHS[2], WIDTHS[3], depths[3], stride=2, tam=tam)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the public code: He init of the convolutions (fan-out; the TAMs' too), BN to identity,
        then every bottleneck's last BN to zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)

    def to(self, *args, **kwargs):
        """As any module; a channels_last_3d request (what extraction asks of every backbone) lays this
        network's 2D convolutions out channels_last, which a channels_last_3d clip reshapes into for free."""
        if kwargs.get("memory_format") is torch.channels_last_3d:
            kwargs["memory_format"] = torch.channels_last
        return super().to(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3 or L < self.min_frames or L % 2:
            raise BadValue(f"{getattr(self, 'name', type(self).__name__)} expects (B, 3, L, H, W) with L even "
                           f"(pairs of frames), got {tuple(x.shape)}")
        x = x.transpose(1, 2).reshape(B * L, C, H, W)  # clip by clip, frame by frame
        x = self.relu(self.bn1(self.conv1(x)))  # (B * L, 64, H/2, W/2)
        if self.tam is not None:
            x = self.tam(x, L)
        x = x.unflatten(0, (B, L))
        big = self.bn_b0(self.b_conv0(x[:, 1::2].flatten(0, 1)))  # frames 1, 3, ...
        little = self.relu(self.bn_l0(self.l_conv0(x[:, 0::2].flatten(0, 1))))  # frames 0, 2, ...
        little = self.relu(self.bn_l1(self.l_conv1(little)))
        little = self.bn_l2(self.l_conv2(little))
        x = self.relu(big + little)
        x = self.relu(self.bn_bl_init(self.bl_init(x)))  # (B * L/2, 64, H/4, W/4): one map per pair
        K = L // 2
        x = self.layer1(x, K)  # (B * L/2, 256, H/8, W/8)
        x = self.layer2(x, K)  # (B * L/2, 512, H/16, W/16)
        x = self.layer3(x, K)  # (B * L/2, 1024, H/16, W/16)
        x = self.layer4(x, K)  # (B * L/2, 2048, H/32, W/32)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        y = x.unflatten(0, (B, K)).transpose(1, 2)  # (B, 2048, L/2, H/32, W/32)
        return y.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


def blvnet_tam50() -> BLVNetTAM:
    """bLVNet-TAM-50 (bLResNet-50, alpha 2, beta 4, TAM of 3 frames) up to layer4: 2048 channels, L/2 maps."""
    return BLVNetTAM(DEPTHS[50])


def blvnet_tam101() -> BLVNetTAM:
    """bLVNet-TAM-101 (bLResNet-101, alpha 2, beta 4, TAM of 3 frames) up to layer4: 2048 channels, L/2 maps."""
    return BLVNetTAM(DEPTHS[101])
