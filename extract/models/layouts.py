"""Key layouts of published backbone weights, detected from their keys, and one converter per layout.

A weights file is read as it was published; its layout is recognised from its keys alone (there
is no option to pass), and the backbone's own layout from the backbone's keys the same way:

    faster                   our keys (``conv1.0.weight``, ``res2.0.conv1.weight``, ...), our
                             ``save_weights`` checkpoints or a plain state dict of them
    torchvision-videoresnet  torchvision's ``VideoResNet`` (``stem.0.weight``,
                             ``layer1.0.conv1.0.weight``, ...): torchvision's own files, VMZ's and
                             ig65m-pytorch's ``.pth`` files
    pytorchvideo             pytorchvideo's ``blocks.N...`` (zoo ``.pyth`` files hold them under
                             ``"model_state"``)
    resnet2d                 a 2D ResNet (``conv1.weight`` of 4 dimensions, ``layer1.0.conv1.weight``,
                             ...): torchvision's or timm's ImageNet ResNet-50
    blvnet-tam               IBM/bLVNet-TAM's ``bLVNet_TAM`` (``baseline_model.*``, ``new_fc.*``):
                             its released ``*-bLVNet-TAM-*-a2-b4-f*x2.pth.tar``
    blvnet-tam-backbone      its backbone's own keys (``b_conv0.weight``, ``layer1.tam.prev.weight``,
                             ...): the ``blvnet_tam*`` backbones and our checkpoints of them
    blresnet                 the same without TAMs: IBM/BigLittleNet's ImageNet bLResNet files

A file in the backbone's own layout loads key for key (:func:`same_layout`); the other pairs
that make sense have one named converter each (:data:`CONVERTERS`); any other pair is one clear
error. The result still goes through the strict key and shape check of
:mod:`faster.extract.models.weights`: a conversion never hides a partial load.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from faster.errors import BadFile

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FASTER = "faster"
VIDEORESNET = "torchvision-videoresnet"
PYTORCHVIDEO = "pytorchvideo"
RESNET2D = "resnet2d"
BLVNET = "blvnet-tam"
BLVNET_BACKBONE = "blvnet-tam-backbone"
BLRESNET = "blresnet"

VMZ_BN_EPS = 1e-3  # VMZ (and ig65m-pytorch) set every BatchNorm's eps to Caffe2's 1e-3

State = dict[str, "torch.Tensor"]
Converter = Callable[[State, "nn.Module"], State]


def layout_of(state: State) -> str:
    """The layout of a state dict (or of a backbone's ``state_dict()``), from its keys."""
    keys = set(state)
    if any(k.startswith("baseline_model.") for k in keys):
        return BLVNET
    if "b_conv0.weight" in keys:  # bLNet's big-branch stem
        return BLVNET_BACKBONE if "tam.curr.weight" in keys else BLRESNET
    if any(k.startswith("blocks.") for k in keys):
        return PYTORCHVIDEO
    if "stem.0.weight" in keys:
        return VIDEORESNET
    w = state.get("conv1.weight")
    if w is not None and getattr(w, "ndim", 0) == 4 and any(k.startswith("layer1.") for k in keys):
        return RESNET2D
    return FASTER


def unwrap_pytorchvideo(obj: dict) -> State | None:
    """The state dict of a pytorchvideo zoo checkpoint (``{"model_state": ..., ...}``), or of a training
    checkpoint ``{"state_dict": ..., "epoch": ...}`` as bLVNet-TAM's and BigLittleNet's scripts save
    it (ImageNet bLResNet files); else None. (weights.read_state_dict calls this for every dict
    that is not our own checkpoint.)"""
    for key in ("model_state", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict):
            return inner
    return None


# --- converters: (file layout, backbone layout) -> function ------------------------------------

def same_layout(state: State, model: nn.Module) -> State:
    """The file is in the backbone's own layout: key for key (torchvision / VMZ files into VMZ models, ...)."""
    return state


def pytorchvideo_trunk(state: State, model: nn.Module) -> State:
    """pytorchvideo keys for a backbone holding ``blocks[:-1]``: drop the head block's keys (its classifier)."""
    n = len(model.blocks)
    out, dropped = {}, 0
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".", 2)[1]) >= n:
            dropped += 1
            continue
        out[key] = value
    log.debug("pytorchvideo: dropped %d keys of the head (blocks.%d and later)", dropped, n)
    return out


def videoresnet_to_faster(state: State, model: nn.Module) -> State:
    """torchvision ``VideoResNet`` keys, as VMZ's code saves a bottleneck network, to our bottleneck ResNet.

    ``stem.i`` -> ``conv1.i``; ``layerK.j`` -> ``res{K+1}.j`` with ``conv1.0`` -> ``conv1``,
    ``conv1.1`` -> ``bn1``, ``conv2.0.i`` -> ``conv2.i`` (the (2+1)D pair; a single 3D conv
    ``conv2.0`` stays), ``conv2.1`` -> ``bn2``, ``conv3.0`` -> ``conv3``, ``conv3.1`` -> ``bn3``,
    ``downsample`` -> ``shortcut``. Both put the stride in the same places (1x3x3 and 3x1x1 of the
    first block, its projection). VMZ's BatchNorms use eps 1e-3, so the backbone's are set to it.
    """
    from torch import nn

    block_map = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv2.1.": "bn2.", "conv3.0.": "conv3.",
                 "conv3.1.": "bn3.", "downsample.": "shortcut."}
    out = {}
    for key, value in state.items():
        new = key
        if key.startswith("stem."):
            new = "conv1." + key[len("stem."):]
        elif key.startswith("layer") and key[5:6].isdigit():
            stage, block, rest = key.split(".", 2)
            for old, repl in block_map.items():
                if rest.startswith(old):
                    rest = repl + rest[len(old):]
                    break
            else:
                if rest.startswith("conv2.0."):
                    tail = rest[len("conv2.0."):]
                    rest = "conv2." + (tail if tail[:1].isdigit() else "0." + tail)
            new = f"res{int(stage[5:]) + 1}.{block}.{rest}"
        out[new] = value
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = VMZ_BN_EPS
    return out


def inflate_resnet2d(state: State, model: nn.Module) -> State:
    """A 2D ResNet-50 (torchvision / timm keys) inflated into R2D-26 (the paper's cheap backbone).

    conv1's 7x7 kernel is repeated over the T frames of the backbone's Tx7x7 conv1 and divided by
    T, so that a clip of T identical frames gives the 2D conv1 exactly; the other 2D kernels get a
    temporal axis of 1; BatchNorm is kept as is. Each stage keeps the 2D network's first blocks
    (two for R2D-26); the rest are dropped, logged. On a static clip the map then equals that
    of the 2D network truncated the same way, on the frame.
    """
    stem_t = model.conv1[0].kernel_size[0]
    depths = [len(getattr(model, f"res{i + 2}")) for i in range(4)]
    out, dropped = {}, 0
    for key, value in state.items():
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[0][5:].isdigit():
            stage = int(parts[0][5:])
            if int(parts[1]) >= depths[stage - 1]:
                dropped += 1
                continue
            rest = ".".join(parts[2:]).replace("downsample.", "shortcut.")
            if rest.startswith("conv2."):
                rest = "conv2.0." + rest[len("conv2."):]
            new = f"res{stage + 1}.{parts[1]}.{rest}"
        elif parts[0] == "conv1":
            new = "conv1.0." + ".".join(parts[1:])
        elif parts[0] == "bn1":
            new = "conv1.1." + ".".join(parts[1:])
        else:
            new = key  # unknown keys stay, so that the strict check names them
        if value.ndim == 4:  # (out, in, kh, kw) -> (out, in, t, kh, kw)
            if new.startswith("conv1.0."):
                value = value.unsqueeze(2).repeat(1, 1, stem_t, 1, 1) / stem_t
            else:
                value = value.unsqueeze(2)
        out[new] = value
    log.info("inflated a 2D ResNet into %s: conv1 spread over %d frames, %d keys of blocks beyond %s dropped",
             getattr(model, "name", type(model).__name__), stem_t, dropped, depths)
    return out


def blvnet_to_backbone(state: State, model: nn.Module) -> State:
    """``bLVNet_TAM`` keys to its backbone's: ``baseline_model.`` stripped, the classifier
    (``new_fc.*``, or ``baseline_model.fc.*`` of a model trained without dropout) dropped."""
    prefix = "baseline_model."
    out, dropped = {}, 0
    for key, value in state.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        if key.startswith(("new_fc.", "fc.")):
            dropped += 1
            continue
        out[key] = value  # unknown keys stay, so that the strict check names them
    log.debug("blvnet-tam: stripped %r, dropped %d classifier keys", prefix, dropped)
    return out


def blresnet_identity_tam(state: State, model: nn.Module) -> State:
    """An ImageNet bLResNet (bLVNet-TAM without its TAMs) into bLVNet-TAM: every key as it is, each
    TAM the file lacks set to the identity (``curr`` 1, ``prev`` = ``next`` 0), so that the network
    is bLResNet on each pair of frames and the load depends on the file alone. (The public code
    meant to leave the TAMs at their random init, loading with strict=False.)"""
    import torch

    out, added = dict(state), 0
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key not in out and len(parts) >= 3 and parts[-3] == "tam" and parts[-2] in ("prev", "curr", "next"):
            out[key] = torch.full(value.shape, 1.0 if parts[-2] == "curr" else 0.0, dtype=value.dtype)
            added += 1
    log.info("bLResNet into %s: %d TAM weights set to the identity", getattr(model, "name", type(model).__name__),
             added)
    return out


CONVERTERS: dict[tuple[str, str], Converter] = {
    (FASTER, FASTER): same_layout,
    (VIDEORESNET, VIDEORESNET): same_layout,
    (PYTORCHVIDEO, PYTORCHVIDEO): pytorchvideo_trunk,
    (VIDEORESNET, FASTER): videoresnet_to_faster,
    (RESNET2D, FASTER): inflate_resnet2d,
    (BLVNET_BACKBONE, BLVNET_BACKBONE): same_layout,
    (BLVNET, BLVNET_BACKBONE): blvnet_to_backbone,
    (BLRESNET, BLVNET_BACKBONE): blresnet_identity_tam,
}


def convert(state: State, layout: str, model: nn.Module, source: str) -> State:
    """``state`` (in ``layout``) in the keys of ``model``; a layout the backbone cannot take is a ValueError."""
    target = layout_of(model.state_dict())
    fn = CONVERTERS.get((layout, target))
    if fn is None:
        takes = _accepted(target)
        raise BadFile(f"weights {source!r} are a {layout} state dict, which backbone "
                         f"{getattr(model, 'name', type(model).__name__)!r} ({target} layout) cannot load; "
                         f"it takes {' or '.join(takes)} files")
    return fn(state, model)


def _accepted(target: str) -> Iterable[str]:
    return [src for src, dst in CONVERTERS if dst == target]
