"""A clip backbone with its classification head, and the weights file `faster train-clip` writes.

The head is the paper's (and PySlowFast's / VMZ's) clip classifier: global average pooling of the
res5 map over time and space, dropout, one linear layer. The file is the backbone format of
:mod:`faster.extract.models.weights` (``{"format": "faster-backbone", "name", "state_dict"}``),
so `faster extract --weights NAME=RUN/model.pt` and `faster predict` read it as it is, with three
more keys beside the backbone's state dict: ``head`` (the linear layer's ``weight`` and ``bias``:
the clip model's own scores, for the paper's "Avg. pool" baseline), ``classes`` and
``provenance`` (video set, epochs, validation video@1, ...). Loaded with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from faster.errors import BadFile


class ClipClassifier(nn.Module):
    """``backbone`` (a registered model: (B, 3, L, H, W) -> res5 map (B, C, T', H', W')), then
    global average pooling, dropout and a linear layer to ``num_classes`` logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(int(backbone.out_channels), num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # PySlowFast's head init
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Any) -> Any:
        return self.fc(self.dropout(self.backbone(x).mean(dim=(2, 3, 4))))


def build_classifier(name: str, num_classes: int, *, init: str | None = None, dropout: float = 0.5,
                     seed: int = 0) -> ClipClassifier:
    """The backbone ``name`` (weights from ``init``: any file the backbone loader reads, else a
    random init deterministic in ``seed``) with a fresh head for ``num_classes`` classes."""
    import torch

    from faster.extract import models

    backbone = models.build(name, weights=init, seed=seed)
    if init is None:
        zero_init_final_bn(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return ClipClassifier(backbone, num_classes, dropout)


def clip_cost(model: nn.Module) -> tuple[Any, float] | None:
    """(GFLOPs per clip of the last forward, (B,) tensor; GFLOPs per clip at full computation) of a
    backbone whose cost depends on the clip (one with ``last_cost`` and ``full_cost``: VA-RED²,
    :mod:`faster.extract.models.vared`), else None. ``model``: the backbone, a
    :class:`ClipClassifier`, or either wrapped by DDP. In training mode the tensor is the expected
    cost under the backbone's gates, differentiable: train-clip's FLOPs penalty reads it."""
    model = getattr(model, "module", model)  # DDP
    backbone = getattr(model, "backbone", model)
    cost, full = getattr(backbone, "last_cost", None), getattr(backbone, "full_cost", None)
    return None if cost is None or not full else (cost, float(full))


def zero_init_final_bn(backbone: nn.Module) -> int:
    """Zero the scale of each residual branch's last batch norm (``bn3`` of our bottlenecks), so
    that every block starts as the identity: PySlowFast's ZERO_INIT_FINAL_BN (Goyal et al. 2017),
    on in its Kinetics recipes; it keeps training stable with small per-process batches. Returns
    the number of norms zeroed (a backbone built otherwise keeps its init)."""
    count = 0
    for m in backbone.modules():
        bn = getattr(m, "bn3", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.weight is not None:
            nn.init.zeros_(bn.weight)
            count += 1
    return count


def save_model(model: ClipClassifier, path: str | Path, classes: list[str], provenance: dict[str, Any]) -> str:
    """Write ``model`` as a backbone weights file with its head, atomically; return the file's sha256."""
    import torch

    from faster.extract.models.weights import FORMAT
    from faster.store.files import replace_atomically, sha256_file

    backbone = model.backbone
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    head = {k: v.detach().cpu() for k, v in model.fc.state_dict().items()}
    obj = {"format": FORMAT, "name": backbone.name, "state_dict": state, "head": head, "classes": list(classes),
           "provenance": provenance}
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))
    return sha256_file(path)


def read_head(path: str | Path) -> dict[str, Any]:
    """The head, classes and provenance a train-clip weights file holds (BadFile when it holds none)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BadFile(f"{path}: not a readable PyTorch checkpoint (torch.load with weights_only=True failed: "
                      f"{type(err).__name__})") from None
    if not isinstance(obj, dict) or "head" not in obj:
        raise BadFile(f"{path}: holds no classification head (not written by faster train-clip)")
    return {"name": obj.get("name"), "head": obj["head"], "classes": obj.get("classes", []),
            "provenance": obj.get("provenance", {})}


def load_classifier(path: str | Path, dropout: float = 0.0) -> ClipClassifier:
    """The backbone and head a train-clip weights file holds, in eval mode."""
    from faster.extract import models

    info = read_head(path)
    backbone = models.build(info["name"], weights=str(path))
    model = ClipClassifier(backbone, len(info["classes"]) or int(info["head"]["weight"].shape[0]), dropout)
    model.fc.load_state_dict(info["head"])
    return model.eval()
