"""torchvision's video ResNets (Tran et al. 2018, as in torchvision.models.video) returning layer4.

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
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from faster.errors import BadValue
from faster.extract.models.resnet import KINETICS_MEAN, KINETICS_STD

# torchvision builder -> (weight enum class name, temporal stride of layer4 w.r.t. the input)
_MODELS = {
    "r2plus1d_18": ("R2Plus1D_18_Weights", 8),
    "r3d_18": ("R3D_18_Weights", 8),
    "mc3_18": ("MC3_18_Weights", 1),
}


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
        from torchvision.models import video

        enum_name, _, member = spec.partition(".")
        if enum_name != self.weight_enum:
            raise BadValue(f"weights file {spec!r} does not exist (for {self.arch} you may also name "
                             f"torchvision's {self.weight_enum}.<NAME>)")
        members = getattr(video, enum_name).__members__
        if member not in members:
            raise BadValue(f"unknown torchvision weights {spec!r}; expected "
                             + " or ".join(f"{enum_name}.{m}" for m in members))
        weights = members[member]
        state = weights.get_state_dict(progress=True, check_hash=True)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        from faster.store.files import sha256_file

        return state, sha256_file(cached) if cached.is_file() else f"torchvision:{spec}"


def r2plus1d_18() -> TorchvisionBackbone:
    """torchvision R(2+1)D-18 (Tran et al. 2018) up to layer4: 512 channels."""
    return TorchvisionBackbone("r2plus1d_18")


def r3d_18() -> TorchvisionBackbone:
    """torchvision R3D-18 (Tran et al. 2018) up to layer4: 512 channels."""
    return TorchvisionBackbone("r3d_18")


def mc3_18() -> TorchvisionBackbone:
    """torchvision MC3-18 (Tran et al. 2018) up to layer4: 512 channels, no temporal stride."""
    return TorchvisionBackbone("mc3_18")
