"""Hugging Face video transformers as clip backbones: ``hf:PATH`` names a local ``save_pretrained``
directory (optional extra ``hf``: ``pip install -e ".[hf]"``; transformers is imported only when such
a backbone is built, never by ``faster --help`` or ``faster.extract.models``; nothing is downloaded).

Supported ``model_type`` values (config.json): ``videomae``, ``timesformer`` and ``vivit``. The
directory's config.json gives the architecture, built as transformers' bare encoder
(``VideoMAEModel``, ``TimesformerModel``, ``VivitModel`` without pooler; a checkpoint saved from a
``...ForVideoClassification`` or ``VideoMAEForPreTraining`` loads too, its head and decoder keys
dropped). ``forward`` maps (B, 3, L, H, W), normalised with ``.mean``/``.std``, to the last hidden
state's patch tokens as a map (B, hidden_size, T', H', W') (``.layer`` = "last_hidden_state"):

- VideoMAE: tokens (t, h, w), tubelets of ``tubelet_size`` frames: T' = L / tubelet_size;
- TimeSformer: the CLS token dropped, tokens (h, w, t), one per frame and patch: T' = L
  (``space_only`` attention: one CLS per frame, each dropped);
- ViViT: the CLS token dropped, tokens (t, h, w), tubelets ``tubelet_size`` = (t, h, w): T' = L / t.

H' = H / patch (16 px by default). Each of these configs fixes the input (position embeddings of
``num_frames`` x ``image_size``): any other clip length or crop is one error naming the input the
model takes (extract with ``--clip-len num_frames --size image_size``).

Weights: without ``weights=``, the directory's ``model.safetensors`` (else ``pytorch_model.bin``),
read by transformers' own loader (its key renames for older checkpoints included) with
safetensors, or ``torch.load(weights_only=True)`` for a ``.bin``; never remote code. ``weights=``
may also name another directory, a ``.safetensors`` / ``.bin`` file, or our own checkpoint
(:func:`faster.extract.models.save_weights`, e.g. a `faster train-clip` model.pt). A missing or
mis-shaped tensor is an error; the head's keys are dropped (logged). The provenance is the file's
sha256. A directory with a config.json but no weights file builds a random init (seed ``S``).

Normalisation: the directory's preprocessor (``preprocessor_config.json``, else
``video_preprocessor_config.json``) as the processor applies it to pixels p in [0, 255]:
(p * rescale_factor - offset - image_mean) / image_std, ``offset`` 1 for ViViT's processor (its
[-1, 1] rescale), 0 otherwise, written as our (p / 255 - mean) / std. Without one, the family's
published defaults: VideoMAE ImageNet (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) (what the
VideoMAE checkpoints ship and were trained with); TimeSformer 0.45 / 0.225 (the TimeSformer
authors' Kinetics statistics); ViViT transformers' ``VivitImageProcessor`` defaults (rescale
1/127.5 with offset, then mean 0.5, std 0.5: mean 0.75, std 0.25 on [0, 1]). A processor's
``num_frames`` must agree with config.json's.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from faster.errors import BadFile, BadValue
from faster.extract.models.resnet import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

PREFIX = "hf:"
INSTALL = 'pip install -e ".[hf]"'
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first present is the directory's weights
SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


@dataclass(frozen=True)
class Family:
    """How one transformers model type becomes a backbone."""

    model: str  # transformers class of the bare encoder
    config: str  # its config class
    cls_token: bool  # last_hidden_state starts with a CLS token (dropped)
    token_order: str  # "thw" or "hwt": the order of the patch tokens in last_hidden_state
    processor: dict  # the preprocessor's defaults (image_mean, image_std, rescale_factor, offset)
    init_kwargs: dict = field(default_factory=dict)


FAMILIES = {
    "videomae": Family("VideoMAEModel", "VideoMAEConfig", cls_token=False, token_order="thw",
                       processor={"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
                                  "rescale_factor": 1 / 255, "offset": False}),
    "timesformer": Family("TimesformerModel", "TimesformerConfig", cls_token=True, token_order="hwt",
                          processor={"image_mean": (0.45,) * 3, "image_std": (0.225,) * 3,
                                     "rescale_factor": 1 / 255, "offset": False}),
    "vivit": Family("VivitModel", "VivitConfig", cls_token=True, token_order="thw",
                    processor={"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, "rescale_factor": 1 / 127.5,
                               "offset": True},
                    init_kwargs={"add_pooling_layer": False}),
}


def _transformers(what: str):
    try:
        import transformers
    except ImportError as err:
        raise BadValue(f"backbone {what!r} needs transformers ({type(err).__name__}: {err}); install the "
                       f"optional extra: {INSTALL}") from None
    return transformers


def _directory(path: str | Path) -> Path:
    """``path`` as a save_pretrained directory (it has a config.json), or a one-line error."""
    directory = Path(path).expanduser()
    if not str(path):
        raise BadValue(f"{PREFIX}PATH needs a path: {PREFIX}/path/to/a/save_pretrained/directory")
    if not directory.is_dir():
        raise BadFile(f"{PREFIX}{path}: {str(directory)!r} is not a directory (expected one written by a "
                      "transformers model's save_pretrained)")
    if not (directory / "config.json").is_file():
        raise BadFile(f"{PREFIX}{path}: no config.json in {str(directory)!r} (expected a directory written by a "
                      "transformers model's save_pretrained)")
    return directory


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadFile(f"{what}: {str(path)!r} is not readable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise BadFile(f"{what}: {str(path)!r} holds no JSON object")
    return obj


def family_of(path: str | Path) -> tuple[str, Family]:
    """(model_type, Family) of the directory ``path`` (its config.json's model_type)."""
    directory = _directory(path)
    model_type = _read_json(directory / "config.json", f"{PREFIX}{path}").get("model_type")
    if model_type not in FAMILIES:
        raise BadValue(f"{PREFIX}{path}: model_type {model_type!r} is not supported; expected one of "
                       f"{', '.join(FAMILIES)}")
    return model_type, FAMILIES[model_type]


def weights_file(path: str | Path, weights: str | Path | None = None, *, required: bool = False) -> Path | None:
    """The weights file ``hf:path`` reads: ``weights`` when it is a file (or a path that does not exist:
    the loader says so), else the weights file of the directory ``weights`` (default: ``path``).
    None for a directory without one (a random init), unless ``required``."""
    if weights is not None and not Path(weights).is_dir():
        return Path(weights)
    directory = Path(path if weights is None else weights).expanduser()
    required = required or weights is not None
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    sharded = [name for name in SHARDED if (directory / name).is_file()]
    if sharded:
        raise BadFile(f"{str(directory)!r} holds a sharded checkpoint ({sharded[0]}), which is not supported (its "
                      "provenance would be several files): save it as one file, "
                      "save_pretrained(dir, max_shard_size=\"100GB\")")
    if required:
        raise BadFile(f"no weights file in {str(directory)!r} (expected {' or '.join(WEIGHT_FILES)})")
    return None


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise BadFile(f"{what}: expected one size or (height, width), got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _three(value, what: str) -> tuple[float, float, float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(values) != 3:
        raise BadFile(f"{what}: expected 3 values (RGB), got {value!r}")
    return tuple(float(v) for v in values)


def normalisation(path: str | Path, family: Family, num_frames: int) -> tuple[tuple, tuple, str]:
    """(mean, std, source) in our convention, (p / 255 - mean) / std, of the directory's preprocessor
    (or the family's defaults, source "defaults"), checking its ``num_frames`` against the config's."""
    directory = Path(path)
    found = next((directory / name for name in PROCESSOR_FILES if (directory / name).is_file()), None)
    proc = dict(family.processor)
    source = "defaults"
    if found is not None:
        given = _read_json(found, f"{PREFIX}{path}")
        proc.update({k: given[k] for k in ("image_mean", "image_std", "rescale_factor", "offset", "do_rescale",
                                           "do_normalize") if given.get(k) is not None})
        source = found.name
        if given.get("num_frames") not in (None, num_frames):
            raise BadFile(f"{PREFIX}{path}: {found.name} samples num_frames={given['num_frames']}, but config.json's "
                          f"model takes num_frames={num_frames}")
    scale = float(proc["rescale_factor"]) if proc.get("do_rescale", True) else 1.0
    offset = 1.0 if proc.get("offset") and proc.get("do_rescale", True) else 0.0
    if proc.get("do_normalize", True):
        m, s = _three(proc["image_mean"], f"{source} image_mean"), _three(proc["image_std"], f"{source} image_std")
    else:
        m, s = (0.0,) * 3, (1.0,) * 3
    if scale <= 0 or min(s) <= 0:
        raise BadFile(f"{PREFIX}{path}: {source} has a non-positive rescale_factor or image_std")
    # p * scale - offset - m = 255 * scale * (u - (m + offset) / (255 * scale)), u = p / 255
    unit = 255.0 * scale
    mean = tuple(round((v + offset) / unit, 12) for v in m)
    std = tuple(round(v / unit, 12) for v in s)
    return mean, std, source


class HFVideoBackbone(nn.Module):
    """A transformers video encoder from a save_pretrained directory; ``forward`` returns its last
    hidden state's patch tokens as (B, hidden_size, T', H', W')."""

    layer = "last_hidden_state"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self.model_type, family = family_of(path)
        self.family = family
        transformers = _transformers(f"{PREFIX}{path}")
        config = getattr(transformers, family.config).from_pretrained(str(_directory(path)), local_files_only=True)
        self.config = config
        self.num_frames = int(config.num_frames)
        self.image_size = _pair(config.image_size, f"{PREFIX}{path} image_size")
        if self.model_type == "vivit":
            tubelet = [int(v) for v in config.tubelet_size]
            self.temporal_stride, self.patch = tubelet[0], (tubelet[1], tubelet[2])
        else:
            self.temporal_stride = int(config.tubelet_size) if self.model_type == "videomae" else 1
            self.patch = _pair(config.patch_size, f"{PREFIX}{path} patch_size")
        self.spatial_stride = self.patch[0]
        self.out_channels = int(config.hidden_size)
        self.native_input = (self.num_frames, self.image_size[0])  # (frames, px)
        self.mean, self.std, self.normalisation = normalisation(path, family, self.num_frames)
        cls = getattr(transformers, family.model)
        try:
            self.net = cls(config, **family.init_kwargs)
        except RuntimeError as err:  # transformers 4's TimeSformer reads its drop-path rates with .item():
            if "meta" not in str(err):  # not on the meta device (cost.build_on_meta): built on the CPU, moved
                raise
            with torch.device("cpu"), torch.random.fork_rng(devices=[]):
                self.net = cls(config, **family.init_kwargs).to("meta")

    def _describe_input(self) -> str:
        h, w = self.image_size
        return f"{self.num_frames} frames at {h} x {w} px" if h != w else f"{self.num_frames} frames at {h} px"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = getattr(self, "name", PREFIX + self.path)
        if x.dim() != 5 or x.shape[1] != 3:
            raise BadValue(f"{name} expects (B, 3, L, H, W), got {tuple(x.shape)}")
        B, _, L, H, W = x.shape
        if (L, H, W) != (self.num_frames, *self.image_size):
            hint = (f"--clip-len {self.num_frames} --size {self.image_size[0]}" if self.image_size[0] == self.image_size[1]
                    else f"--clip-len {self.num_frames}")
            raise BadValue(f"{name} ({self.model_type}) takes clips of {self._describe_input()} (its config.json's "
                           f"num_frames and image_size fix the position embeddings), got {L} frames at {H} x {W} px: "
                           f"use {hint}")
        out = self.net(pixel_values=x.transpose(1, 2)).last_hidden_state  # pixel_values (B, L, 3, H, W)
        h, w = H // self.patch[0], W // self.patch[1]
        D = out.shape[-1]
        if self.model_type == "timesformer" and out.shape[0] == B * L:  # space_only: (B*L, 1 + h*w, D)
            y = out[:, 1:].reshape(B, L, h, w, D)
        else:
            tokens = out[:, 1:] if self.family.cls_token else out  # (B, T'*h*w, D)
            if self.family.token_order == "hwt":
                y = tokens.reshape(B, h, w, -1, D).permute(0, 3, 1, 2, 4)
            else:
                y = tokens.reshape(B, -1, h, w, D)
        return y.permute(0, 4, 1, 2, 3)  # (B, D, T', h, w): a view, channels-last in memory

    def to(self, *args, **kwargs):
        """``Module.to``, where a ``memory_format`` applies to the weights of its rank only
        (BackboneRunner lays models out channels_last_3d; TimeSformer's patch projection is a 2D
        convolution, whose 4D weight channels_last_3d refuses)."""
        memory_format = kwargs.pop("memory_format", None)
        module = super().to(*args, **kwargs) if args or kwargs else self
        if memory_format is not None:
            rank = {torch.channels_last_3d: 5, torch.channels_last: 4}.get(memory_format)
            for p in module.parameters():
                if rank is None or p.dim() == rank:
                    p.data = p.data.contiguous(memory_format=memory_format)
        return module

    def load_file(self, weights: str | Path) -> str:
        """Load ``weights`` (a save_pretrained directory, a .safetensors or .bin file, or our own checkpoint);
        return its provenance, the file's sha256."""
        from faster.store.files import cached_sha256

        path = weights_file(self.path, weights, required=True)
        if not path.is_file():
            raise BadFile(f"weights {str(weights)!r} for {PREFIX}{self.path}: "
                          + ("not a file" if path.exists() else "no such file"))
        if path.suffix not in (".safetensors", ".bin"):  # our format (save_weights, train-clip): our keys
            from faster.extract.models.weights import load_weights

            return load_weights(self, path)
        transformers = _transformers(f"{PREFIX}{self.path}")
        cls = getattr(transformers, self.family.model)
        hf_logging = transformers.utils.logging
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # its key report and progress bar: ours below, one line
        hf_logging.disable_progress_bar()
        try:
            net, info = cls.from_pretrained(str(path), config=self.config, local_files_only=True,
                                            use_safetensors=path.suffix == ".safetensors", output_loading_info=True,
                                            **self.family.init_kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, AttributeError) as err:  # a foreign or damaged file
            raise BadFile(f"weights {str(path)!r} do not load into {PREFIX}{self.path} ({self.family.model}): "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        missing = sorted(info.get("missing_keys") or [])
        mismatched = [str(k) for k in info.get("mismatched_keys") or []]
        if missing or mismatched or info.get("error_msgs"):
            parts = [f"{len(keys)} {kind} [{', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}]"
                     for kind, keys in (("missing keys", missing), ("shape mismatches", mismatched),
                                        ("errors", [str(e) for e in info.get("error_msgs") or []])) if keys]
            raise BadFile(f"weights {str(path)!r} do not fit {PREFIX}{self.path} ({self.family.model}): "
                          + "; ".join(parts))
        dropped = sorted(info.get("unexpected_keys") or [])
        if dropped:
            log.info("%s: %d keys of %s are not the encoder's (a head or decoder), dropped: %s", PREFIX + self.path,
                     len(dropped), path.name, ", ".join(dropped[:6]) + (", ..." if len(dropped) > 6 else ""))
        self.net = net.float().eval()
        digest = cached_sha256(path)
        self.weights_layout = "transformers"
        log.info("%s: loaded %s (sha256 %s)", PREFIX + self.path, path, digest[:12])
        return digest


def builder(path: str):
    """The registry's builder of ``hf:path``: the architecture, random init, no weights (checked at once)."""
    family_of(path)  # a missing directory or an unsupported model type: an error now, not at the first build

    def build() -> HFVideoBackbone:
        return HFVideoBackbone(path)

    build.sources = [str(Path(path) / "config.json")] + [str(Path(path) / n) for n in PROCESSOR_FILES]
    return build
