"""torchvision's video models as backbones: its video ResNets (Tran et al. 2018) returning layer4;
S3D, MViT and Video Swin (Swin3D) returning their last map before the head (below).

The adapter keeps torchvision's ``stem`` and ``layer1``..``layer4`` under their own names, so a
torchvision state dict as users download it (e.g. ``r2plus1d_18-91a641e6.pth``) loads key for key;
its classifier (``fc.*``) is dropped (:mod:`faster.extract.models.weights`). With the same weights
the output equals torchvision's ``layer4`` output exactly.

Online users may pass a weight enum string instead of a file, e.g.
``build("r2plus1d_18", weights="R2Plus1D_18_Weights.KINETICS400_V1")``: torchvision downloads it
once into the torch.hub cache, and the provenance is that file's sha256 (``torchvision:<enum>``
if the file is not where torch.hub keeps it).

Strides: r2plus1d_18 and r3d_18 halve time and space at layer2-4 (T' = L/8, H' = H/16: 7x7 at the
112 px these models were trained at); mc3_18 never strides time (T' = L, H' = H/16).

torchvision's other video classifiers, up to their last map (the same state dict keys as
torchvision's, so its published files, e.g. ``s3d-d76dad2f.pth``, and its weight enums load; the
head, ``classifier.*`` / ``head.*``, is dropped: ``.head_prefixes``):

    s3d        ``features``' map before the average pool: 1024 x L/8 x H/32 x W/32; any clip of at
               least 5 frames and 17 x 17 px (Kinetics statistics, as torchvision's transforms)
    swin3d_t/s/b  the tokens after the final ``norm`` as (C, T', H', W'): 768 (t, s) or 1024 (b) x
               ceil(L/2) x H/32 x W/32; any clip size (windows are padded and shrunk to the input);
               ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
    mvit_v1_b, mvit_v2_s  the patch tokens after the final ``norm``, the class token left out,
               reshaped to their grid: 768 x 8 x 7 x 7; 16 x 224 x 224 clips only (the positional
               embedding and the pooled token grid are fixed by torchvision's model to 8 x 56 x 56
               patches), anything else is a clear error; statistics 0.45 / 0.225

``native_input`` is (16, 224) for these six: the clip torchvision counts their GFLOPs at
(``.meta["_ops"]`` of the weight enums, which ``clip_gflops(name, 16, 224)`` reproduces).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from faster.errors import BadValue
from faster.extract.models.resnet import IMAGENET_MEAN, IMAGENET_STD, KINETICS_MEAN, KINETICS_STD

# torchvision builder -> (weight enum class name, temporal stride of layer4 w.r.t. the input)
_MODELS = {
    "r2plus1d_18": ("R2Plus1D_18_Weights", 8),
    "r3d_18": ("R3D_18_Weights", 8),
    "mc3_18": ("MC3_18_Weights", 1),
}

# the normalisations torchvision publishes with these models' weights (their enums' transforms)
MVIT_MEAN = (0.45, 0.45, 0.45)
MVIT_STD = (0.225, 0.225, 0.225)

# torchvision builder -> (weight enum class name, temporal stride, (mean, std))
_VIDEO_MODELS = {
    "s3d": ("S3D_Weights", 8, (KINETICS_MEAN, KINETICS_STD)),
    "mvit_v1_b": ("MViT_V1_B_Weights", 2, (MVIT_MEAN, MVIT_STD)),
    "mvit_v2_s": ("MViT_V2_S_Weights", 2, (MVIT_MEAN, MVIT_STD)),
    "swin3d_t": ("Swin3D_T_Weights", 2, (IMAGENET_MEAN, IMAGENET_STD)),
    "swin3d_s": ("Swin3D_S_Weights", 2, (IMAGENET_MEAN, IMAGENET_STD)),
    "swin3d_b": ("Swin3D_B_Weights", 2, (IMAGENET_MEAN, IMAGENET_STD)),
}
S3D_MIN_INPUT = (5, 17)  # (frames, px): fewer and a pooling of features has no output left


def _enum_state_dict(arch: str, weight_enum: str, spec: str) -> tuple[dict[str, torch.Tensor], str]:
    """State dict and file sha256 of a torchvision weight enum ``"<Enum>.<MEMBER>"`` (downloads once)."""
    from torchvision.models import video

    enum_name, _, member = spec.partition(".")
    if enum_name != weight_enum:
        raise BadValue(f"weights file {spec!r} does not exist (for {arch} you may also name "
                       f"torchvision's {weight_enum}.<NAME>)")
    members = getattr(video, enum_name).__members__
    if member not in members:
        raise BadValue(f"unknown torchvision weights {spec!r}; expected "
                       + " or ".join(f"{enum_name}.{m}" for m in members))
    weights = members[member]
    state = weights.get_state_dict(progress=True, check_hash=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    from faster.store.files import sha256_file

    return state, sha256_file(cached) if cached.is_file() else f"torchvision:{spec}"


class TorchvisionBackbone(nn.Module):
    """stem, layer1..layer4 of a torchvision ``VideoResNet``; ``forward`` returns layer4's map."""

    layer = "layer4"
    mean = KINETICS_MEAN  # torchvision's Kinetics-400 video transforms use the same statistics
    std = KINETICS_STD
    spatial_stride = 16

    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in _MODELS:
            raise BadValue(f"unknown torchvision video model {arch!r}; expected one of {', '.join(_MODELS)}")
        from torchvision.models import video

        net = getattr(video, arch)(weights=None)
        self.arch = arch
        self.stem = net.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        self.weight_enum, self.temporal_stride = _MODELS[arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3:
            raise BadValue(f"{self.arch} expects (B, 3, L, H, W), got {tuple(x.shape)}")
        x = self.stem(x)  # (B, 64, L, H/2, W/2)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (B, 512, T', H/16, W/16)

    def enum_state_dict(self, spec: str) -> tuple[dict[str, torch.Tensor], str]:
        """State dict and file sha256 of a torchvision weight enum ``"<Enum>.<MEMBER>"`` (downloads once)."""
        return _enum_state_dict(self.arch, self.weight_enum, spec)


def r2plus1d_18() -> TorchvisionBackbone:
    """torchvision R(2+1)D-18 (Tran et al. 2018) up to layer4: 512 channels."""
    return TorchvisionBackbone("r2plus1d_18")


def r3d_18() -> TorchvisionBackbone:
    """torchvision R3D-18 (Tran et al. 2018) up to layer4: 512 channels."""
    return TorchvisionBackbone("r3d_18")


def mc3_18() -> TorchvisionBackbone:
    """torchvision MC3-18 (Tran et al. 2018) up to layer4: 512 channels, no temporal stride."""
    return TorchvisionBackbone("mc3_18")


class TorchvisionVideoNet(nn.Module):
    """torchvision's s3d, MViT or Swin3D without its head; ``forward`` returns the last map (B, C, T', H', W').

    The modules keep torchvision's names (``features``; ``conv_proj``, ``pos_encoding``, ``blocks``,
    ``norm``; ``patch_embed``, ``features``, ``norm``), so torchvision's state dicts load key for
    key once the head's keys (``head_prefixes``) are dropped.
    """

    spatial_stride = 32
    native_input = (16, 224)  # (frames, px) torchvision's published GFLOPs are counted at

    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in _VIDEO_MODELS:
            raise BadValue(f"unknown torchvision video model {arch!r}; expected one of {', '.join(_VIDEO_MODELS)}")
        from torchvision.models import video

        net = getattr(video, arch)(weights=None)
        self.arch = arch
        self.weight_enum, self.temporal_stride, (self.mean, self.std) = _VIDEO_MODELS[arch]
        self.family = arch.split("_")[0]  # s3d, mvit or swin3d
        if self.family == "s3d":
            self.layer, self.head_prefixes = "features", ("classifier.",)
            self.features = net.features
            self.out_channels = net.classifier[-1].in_channels
        elif self.family == "mvit":
            self.layer, self.head_prefixes = "norm", ("head.",)
            self.conv_proj, self.pos_encoding, self.blocks, self.norm = (net.conv_proj, net.pos_encoding, net.blocks,
                                                                         net.norm)
            self.out_channels = net.norm.normalized_shape[0]
            grid = (net.pos_encoding.temporal_size, *net.pos_encoding.spatial_size)  # (8, 56, 56) at 16 x 224
            self.fixed_input = tuple(g * s for g, s in zip(grid, net.conv_proj.stride))  # (16, 224, 224)
        else:
            self.layer, self.head_prefixes = "norm", ("head.",)
            self.patch_embed, self.pos_drop, self.features, self.norm = (net.patch_embed, net.pos_drop, net.features,
                                                                         net.norm)
            self.out_channels = net.num_features

    def _check(self, x: torch.Tensor) -> None:
        name = getattr(self, "name", self.arch)
        if x.dim() != 5 or x.shape[1] != 3:
            raise BadValue(f"{name} expects (B, 3, L, H, W), got {tuple(x.shape)}")
        L, H, W = x.shape[2:]
        if self.family == "mvit" and (L, H, W) != self.fixed_input:
            (L0, H0, W0), grid = self.fixed_input, (self.pos_encoding.temporal_size, *self.pos_encoding.spatial_size)
            raise BadValue(f"{name} takes {L0}-frame {H0} x {W0} clips only (torchvision's MViT fixes its positional "
                           f"embedding and token grid to {' x '.join(map(str, grid))} patches), got {L} x {H} x {W}: "
                           f"use --clip-len {L0} --size {H0}")
        if self.family == "s3d" and (L < S3D_MIN_INPUT[0] or min(H, W) < S3D_MIN_INPUT[1]):
            raise BadValue(f"{name} needs clips of at least {S3D_MIN_INPUT[0]} frames and {S3D_MIN_INPUT[1]} x "
                           f"{S3D_MIN_INPUT[1]} px (its poolings leave nothing of a smaller one), got {L} x {H} x {W}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.family == "s3d":
            return self.features(x)  # (B, 1024, T', H/32, W/32): what torchvision's avgpool reads
        if self.family == "swin3d":
            x = self.patch_embed(x)  # (B, L/2, H/4, W/4, C), padded up to whole patches
            x = self.pos_drop(x)
            x = self.features(x)
            x = self.norm(x)  # (B, T', H', W', C)
            return x.permute(0, 4, 1, 2, 3)  # (B, C, T', H', W'), channels-last in memory, as torchvision does
        x = self.conv_proj(x)  # (B, C0, 8, 56, 56)
        x = x.flatten(2).transpose(1, 2)  # (B, 8 * 56 * 56, C0), tokens in (t, h, w) order
        x = self.pos_encoding(x)  # the class token prepended
        thw = (self.pos_encoding.temporal_size,) + self.pos_encoding.spatial_size
        for block in self.blocks:
            x, thw = block(x, thw)
        x = self.norm(x)  # (B, 1 + T' H' W', C)
        B, _, C = x.shape
        return x[:, 1:].reshape(B, *thw, C).permute(0, 4, 1, 2, 3)  # (B, C, T', H', W') without the class token

    def enum_state_dict(self, spec: str) -> tuple[dict[str, torch.Tensor], str]:
        """State dict (with torchvision's head, dropped on loading) and file sha256 of a weight enum."""
        return _enum_state_dict(self.arch, self.weight_enum, spec)


def s3d() -> TorchvisionVideoNet:
    """torchvision S3D (Xie et al. 2018) before its average pool: 1024 channels, T' = L/8, H' = H/32."""
    return TorchvisionVideoNet("s3d")


def mvit_v1_b() -> TorchvisionVideoNet:
    """torchvision MViT-B 16x4 (Fan et al. 2021), patch tokens after the last norm: 768 x 8 x 7 x 7, 16 x 224 only."""
    return TorchvisionVideoNet("mvit_v1_b")


def mvit_v2_s() -> TorchvisionVideoNet:
    """torchvision MViTv2-S (Li et al. 2022), patch tokens after the last norm: 768 x 8 x 7 x 7, 16 x 224 only."""
    return TorchvisionVideoNet("mvit_v2_s")


def swin3d_t() -> TorchvisionVideoNet:
    """torchvision Video Swin-T (Liu et al. 2022) after its last norm: 768 channels, T' = L/2, H' = H/32."""
    return TorchvisionVideoNet("swin3d_t")


def swin3d_s() -> TorchvisionVideoNet:
    """torchvision Video Swin-S after its last norm: 768 channels, T' = L/2, H' = H/32."""
    return TorchvisionVideoNet("swin3d_s")


def swin3d_b() -> TorchvisionVideoNet:
    """torchvision Video Swin-B after its last norm: 1024 channels, T' = L/2, H' = H/32."""
    return TorchvisionVideoNet("swin3d_b")
