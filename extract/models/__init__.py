"""Clip backbones by name (``names()`` lists them; `faster flops --list` with their costs), one module
per family: the paper's models, e.g. R(2+1)D-50 and R2D-26 (Table 1), R3D-50 (Table 6), and their tiny
test variants (:mod:`.resnet`); torchvision's video ResNets, S3D, MViT and
Swin3D (:mod:`.tv`); VMZ's published models
(:mod:`.vmz`); pytorchvideo's zoo models (``pv_*``, :mod:`.pv`, optional extra ``zoo``); bLVNet-TAM
(``blvnet_tam50``, ``blvnet_tam101``, :mod:`.blvnet`). Each loads
its publisher's weights files as they are (:mod:`.layouts`); what a backbone costs per clip is
:mod:`.cost`.

``build(name, weights=None, seed=0)`` returns a module in eval mode mapping float (B, 3, L, H, W),
normalised with its ``.mean``/``.std``, to the last stage's map (B, C, T', H', W'), e.g.
(B, 2048, L/8, 7, 7) at 224 px for the paper's models. The module carries ``.name``, ``.mean``,
``.std``, ``.layer`` ("res5" or "layer4"), ``.weights`` (sha256 of the weights file, or
``random-init:seed=S``), ``.out_channels``, ``.temporal_stride`` (L / T') and ``.spatial_stride``;
built from a file it also has ``.weights_layout``, the layout the file was read in.

Importing this package does not import torch: builders are registered as "module:function"
strings and resolved on first use, so ``names()`` is cheap (the CLI's --help stays light).

``hf:PATH`` (not listed by ``names()``) names a Hugging Face video transformer saved with
``save_pretrained`` in the local directory PATH (VideoMAE, TimeSformer, ViViT; :mod:`.hf`, optional
extra ``hf``, transformers imported only then): built from its config.json, its weights the
directory's model.safetensors unless ``weights=`` says otherwise.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from faster.errors import BadValue
from faster.extract.models.cost import clip_gflops, feature_shape
from faster.extract.models.weights import save_weights

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build", "clip_gflops", "describe", "feature_shape", "get", "names", "register", "save_weights"]

Builder = Callable[[], "nn.Module"]
HF_PREFIX = "hf:"
_REGISTRY: dict[str, Builder | str] = {}


def register(name: str, builder: Builder | str) -> None:
    """Register ``builder`` (a callable returning the architecture, or a lazy "module:function")."""
    if not name or not isinstance(name, str):
        raise BadValue(f"backbone name must be a non-empty string, got {name!r}")
    if name.startswith(HF_PREFIX):
        raise BadValue(f"backbone names starting with {HF_PREFIX!r} are Hugging Face directories, got {name!r}")
    if name in _REGISTRY:
        raise BadValue(f"backbone {name!r} is already registered")
    _REGISTRY[name] = builder


def names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Builder:
    """The builder of ``name`` (architecture with default init, no weights, no provenance)."""
    if isinstance(name, str) and name.startswith(HF_PREFIX):  # a save_pretrained directory (hf.py)
        from faster.extract.models import hf

        return hf.builder(name[len(HF_PREFIX):])
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise BadValue(f"unknown backbone {name!r}; expected one of {', '.join(names())}") from None
    if isinstance(builder, str):
        module, _, attr = builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = builder
    return builder


def build(name: str, weights: str | None = None, seed: int = 0) -> nn.Module:
    """The backbone ``name`` in eval mode, with ``weights`` or a random init deterministic in ``seed``.

    ``weights``: a file (our :func:`save_weights` checkpoint, or a published file as downloaded:
    torchvision's ``r2plus1d_18-91a641e6.pth``, VMZ's / ig65m-pytorch's ``.pth``, a pytorchvideo
    zoo ``.pyth``, an ImageNet ResNet-50 for ``r2d26``), or for the torchvision models a weight enum
    string like ``"R2Plus1D_18_Weights.KINETICS400_V1"`` (downloads once through torch.hub).
    For ``hf:PATH``: the directory's own weights file by default (:func:`.hf.weights_file`).
    The global RNG is left untouched.
    """
    import torch

    from faster.extract.models.weights import load_weights

    builder = get(name)
    weights = default_weights(name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    model.name = name
    if weights is None:
        model.weights = f"random-init:seed={seed}"
    else:  # a backbone that reads its own formats (hf.py: safetensors through transformers) has load_file
        model.weights = model.load_file(weights) if hasattr(model, "load_file") else load_weights(model, weights)
    return model.eval()


def default_weights(name: str, weights: str | None) -> str | None:
    """``weights``, or for ``hf:PATH`` the weights file it stands for (the directory's own by default)."""
    if not name.startswith(HF_PREFIX):
        return weights
    from faster.extract.models import hf

    path = hf.weights_file(name[len(HF_PREFIX):], weights)
    return None if path is None else str(path)


def describe(name: str, weights: str | None = None, seed: int = 0) -> dict:
    """What :func:`build` would record of ``name`` (layer, weights provenance, mean, std) without
    reading the weights or building the network: it is built on the meta device with its init
    skipped, and a weights file is identified by its sha256 from the per-user cache (hashed once).
    A torchvision weight enum is built for real (its provenance comes from torch.hub's copy)."""
    from pathlib import Path

    from faster.extract.models.cost import build_on_meta
    from faster.store.files import cached_sha256

    weights = default_weights(name, weights)
    if weights is not None and not Path(weights).is_file():  # an enum, or a missing file: build tells which
        model = build(name, weights=weights, seed=seed)
    else:
        model = build_on_meta(get(name))
        model.weights = f"random-init:seed={seed}" if weights is None else cached_sha256(weights)
    return {"layer": str(model.layer), "weights": str(model.weights), "mean": [float(v) for v in model.mean],
            "std": [float(v) for v in model.std]}


for _name in ("r2plus1d50", "r2d26", "r3d50", "r2plus1d50_tiny", "r2d26_tiny", "r3d50_tiny"):
    register(_name, f"faster.extract.models.resnet:{_name}")
for _name in ("r2plus1d_18", "r3d_18", "mc3_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b"):
    register(_name, f"faster.extract.models.tv:{_name}")
for _name in ("r2plus1d_34", "r2plus1d_152", "ir_csn_152", "ip_csn_152"):
    register(_name, f"faster.extract.models.vmz:{_name}")
for _name in ("pv_r2plus1d_r50", "pv_slow_r50", "pv_x3d_xs", "pv_x3d_s", "pv_x3d_m", "pv_csn_r101"):
    register(_name, f"faster.extract.models.pv:{_name}")
for _name in ("blvnet_tam50", "blvnet_tam101"):
    register(_name, f"faster.extract.models.blvnet:{_name}")
for _name in ("vared_r2plus1d50", "vared_r2plus1d50_tiny"):
    register(_name, f"faster.extract.models.vared:{_name}")
del _name
