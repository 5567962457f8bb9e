"""Backbone weights: our checkpoint format, published files as they are, and torchvision's weight enums.

Our format is ``{"format": "faster-backbone", "name": <registry name>, "state_dict": {...}}``.
Published files load as downloaded: a plain state dict (torchvision's ``r2plus1d_18-91a641e6.pth``,
VMZ's and ig65m-pytorch's ``.pth``, an ImageNet ResNet-50), or a pytorchvideo zoo ``.pyth``
(``{"model_state": ...}``). A ``module.`` prefix (DataParallel / DDP) is stripped and classifier
keys (``fc.*``, and those under a backbone's own ``.head_prefixes``: ``classifier.*`` of
torchvision's s3d, ``head.*`` of its MViT and Swin3D) are dropped, since a backbone here ends at
its last stage. The file's key layout is detected and converted by
:mod:`faster.extract.models.layouts` (a 2D ResNet-50 is inflated into R2D-26, VMZ's
torchvision-layout R(2+1)D-50 mapped into ours); the backbone keeps it as ``.weights_layout`` and
the load is logged. Everything loads with ``torch.load(weights_only=True)``.

The provenance recorded with extracted features (``.weights``) is the weights file's sha256, also
for a converted or inflated file: predict hashes the file it is given and compares.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faster.errors import BadFile, BadValue

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FORMAT = "faster-backbone"
_STRIP_PREFIXES = ("module.",)
_HEAD_PREFIXES = ("fc.",)
_SHOW = 6  # keys listed per kind in a mismatch error


def save_weights(model: nn.Module, path: str | Path) -> str:
    """Save ``model`` (built by :func:`faster.extract.models.build`) in our format; return the file's sha256."""
    import torch

    from faster.store.files import sha256_file

    name = getattr(model, "name", None)
    if not name:
        raise BadValue("save_weights needs a model made by faster.extract.models.build (it has no .name)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "name": name, "state_dict": state}, path)
    return sha256_file(path)


def load_weights(model: nn.Module, weights: str | Path) -> str:
    """Load ``weights`` (a file, or a torchvision enum string for torchvision models) into ``model``.

    Returns the provenance string: the sha256 of the weights file.
    """
    path = Path(weights)
    if not path.is_file():
        if path.exists():
            raise BadFile(f"weights {str(weights)!r} is not a file")
        if hasattr(model, "enum_state_dict"):  # torchvision models: "R2Plus1D_18_Weights.KINETICS400_V1"
            state, provenance = model.enum_state_dict(str(weights))
            _load_state(model, _clean(state), str(weights))
            return provenance
        raise BadFile(f"weights file {str(weights)!r} does not exist")
    from faster.extract.models import layouts
    from faster.store.files import cached_sha256

    complete = getattr(model, "complete_state", None)  # a network that also loads another's files (VA-RED²:
    # R(2+1)D-50's, whatever the name they were saved under: the keys decide, in _load_state)
    state, layout = read_state_dict(path, None if complete else getattr(model, "name", None), with_layout=True)
    state = layouts.convert(state, layout, model, str(path))
    _load_state(model, complete(state) if complete else state, str(path), layout)
    digest = cached_sha256(path)
    model.weights_layout = layout
    log.info("%s: loaded %s (%s layout, sha256 %s)", getattr(model, "name", type(model).__name__), path,
             layout, digest[:12])
    return digest


def read_state_dict(path: str | Path, name: str | None = None, *, with_layout: bool = False):
    """The state dict held by ``path``, cleaned of prefixes and heads (and, ``with_layout``, its layout).

    ``path``: our format, a plain state dict, or a pytorchvideo ``{"model_state": ...}`` checkpoint.
    ``name``: when given and the file is in our format, it must hold that backbone.
    """
    import torch

    from faster.extract.models import layouts

    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a corrupt or foreign file
        raise BadFile(f"weights file {str(path)!r} is not a readable PyTorch checkpoint "
                      f"(torch.load with weights_only=True failed: {type(err).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if name is not None and obj.get("name") != name:
            raise BadFile(f"weights file {str(path)!r} holds {obj.get('name')!r} weights, not {name!r}")
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and layouts.unwrap_pytorchvideo(obj) is not None:
        obj = layouts.unwrap_pytorchvideo(obj)
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BadFile(f"weights file {str(path)!r} holds no state dict (expected a {FORMAT!r} checkpoint "
                         "or a dict of tensors)")
    state = _clean(obj)
    return (state, layouts.layout_of(state)) if with_layout else state


def _clean(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_HEAD_PREFIXES):
            log.debug("dropping classifier key %s", key)
            continue
        out[key] = value
    return out


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")
    return f"{len(keys)} {kind} [{shown}]"


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, layout: str | None = None) -> None:
    expected = model.state_dict()
    # BatchNorm's batch counter carries no weights and converted files (ig65m-pytorch's) lack it
    state = dict(state)
    head = tuple(getattr(model, "head_prefixes", ()))  # the classifier of a published file (tv.py's s3d, ...)
    if head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    for k in expected:
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = expected[k]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [_listing(kind, keys) for kind, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        read_as = f" (read as a {layout} state dict)" if layout else ""
        raise BadFile(f"weights {source!r}{read_as} do not fit backbone "
                         f"{getattr(model, 'name', type(model).__name__)!r}: "
                         + "; ".join(parts))
    model.load_state_dict(state, strict=True)
