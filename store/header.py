"""The typed header of a feature set (docs/format.md "Shard schema"): one place that writes it to a
shard's HDF5 attributes, reads it back, and compares two of them.

A ``Header`` is what an extraction configuration fixes: clip_len, num_clips, frame_stride, size,
the class list, and per model its provenance, cost, crop and sampling (``ModelHeader``: the
attributes of ``schema.MODEL_ATTRS``; a model without its own ``clip_len`` / ``frame_stride``, as
in formats 1 and 2, samples the root's). Every shard of a directory carries the same header; resume, verify, the
reader and ablate all read it through :func:`read_header`. Two comparisons live here:
:func:`config_diff` (the whole configuration, provenance included: the resume refusal and verify's
consistency check) and :func:`check_compatible` (whether features can be used together: classes,
extraction and map shapes; the reader's join, a validation set against a training set, a run's
features).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile, Incompatible
from faster.store import schema


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute as plain Python: bytes -> str, arrays -> lists, numpy scalars -> Python scalars."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [plain_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _h5_value(value: Any) -> Any:
    return str(value) if isinstance(value, str) else value  # str subclasses (torch.__version__) have no HDF5 type


@dataclass
class ModelHeader:
    """One model's provenance and cost, the attributes of ``/features/<model>`` (its fields are
    ``schema.MODEL_ATTRS``, in that order)."""

    gflops_per_clip: float | None = None  # multiply-adds per clip / 1e9 (the paper's convention)
    layer: str | None = None  # the stage whose map is stored: "res5", "layer4", ...
    weights: str | None = None  # sha256 of the weights file, or random-init:seed=S
    mean: list[float] | None = None  # the normalisation the backbone's input had
    std: list[float] | None = None
    compute_dtype: str | None = None  # "float32" or "bfloat16": what the backbone ran in
    spatial_pool: int | None = None  # 1: each map averaged over H' x W' (stored 1 x 1, --spatial-pool); unset: full maps
    size: int | None = None  # this model's crop in pixels (format 2); unset (format 1): the root's size
    clip_len: int | None = None  # frames of this model's clip (format 3); older formats: the root's
    frame_stride: int | None = None  # their stride (format 3), a multiple of the root's; older: the root's

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ModelHeader:
        """From HDF5 attributes or a dict; unknown keys are ignored, absent ones stay None."""
        return cls(**{f.name: plain_attr(attrs[f.name]) for f in fields(cls) if f.name in attrs})

    def attrs(self) -> dict[str, Any]:
        """The attributes that are set (plain Python values)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self, ds: Any) -> None:
        for key, value in self.attrs().items():
            ds.attrs[key] = _h5_value(value)


@dataclass
class Header:
    """A feature set's extraction configuration and its models' provenance (the root attributes)."""

    clip_len: int  # L, frames per clip
    num_clips: int  # N, clips per video
    frame_stride: int  # frame step inside a clip
    size: int  # crop size in pixels
    classes: list[str]  # class names; labels index them
    models: dict[str, ModelHeader] = field(default_factory=dict)
    software_version: str = ""  # faster's version that wrote the shard
    torch_version: str = ""

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        self.models = {m: h if isinstance(h, ModelHeader) else ModelHeader.from_attrs(h) for m, h in self.models.items()}
        for h in self.models.values():  # a model without its own sampling (formats 1 and 2) samples the root's
            h.clip_len = int(self.clip_len) if h.clip_len is None else int(h.clip_len)
            h.frame_stride = int(self.frame_stride) if h.frame_stride is None else int(h.frame_stride)

    @property
    def extraction(self) -> dict[str, int]:
        """clip_len, num_clips, frame_stride and size: what a run records of the features it read."""
        return {k: int(getattr(self, k)) for k in schema.EXTRACTION_ATTRS}

    def config(self) -> dict[str, Any]:
        """What a feature-set directory must never mix, as plain JSON (kept in the part manifests)."""
        return {**self.extraction, "classes": list(self.classes),
                "models": {m: {k: h.attrs().get(k) for k in schema.MODEL_CONFIG} for m, h in self.models.items()}}

    def root_attrs(self) -> dict[str, Any]:
        return {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, **self.extraction,
                "classes": json.dumps(list(self.classes)), "software_version": str(self.software_version),
                "torch_version": str(self.torch_version)}

    def write(self, f: Any) -> None:
        """The root attributes of an open HDF5 file (the models' go on their datasets: ModelHeader.write)."""
        for key, value in self.root_attrs().items():
            f.attrs[key] = _h5_value(value)

    @classmethod
    def read(cls, f: Any, where: str | Path) -> Header:
        """The header of an open shard; BadFile naming ``where`` when the format or an attribute is wrong."""
        a = f.attrs
        fmt = plain_attr(a.get("format"))
        if fmt != schema.FORMAT:
            raise BadFile(f"{where}: format {fmt!r}, expected {schema.FORMAT!r}")
        version = plain_attr(a.get("format_version"))
        if version not in schema.READABLE_VERSIONS:
            raise BadFile(f"{where}: format_version {version!r}; this reader knows "
                          f"{', '.join(map(str, schema.READABLE_VERSIONS))}")
        missing = [k for k in schema.CONFIG_ATTRS if k not in a]
        if missing:
            raise BadFile(f"{where}: missing root attributes {missing}")
        try:
            classes = json.loads(plain_attr(a["classes"]))
            if not isinstance(classes, list):
                raise TypeError
        except (TypeError, ValueError):
            raise BadFile(f"{where}: attribute classes is not a JSON list") from None
        models = {name: ModelHeader.from_attrs(ds.attrs) for name, ds in schema.feature_datasets(f)}
        root = {k: int(plain_attr(a[k])) for k in schema.EXTRACTION_ATTRS}
        return cls(**root, classes=classes, models=models,
                   software_version=str(plain_attr(a.get("software_version", ""))),
                   torch_version=str(plain_attr(a.get("torch_version", ""))))


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str = "there", b_name: str = "here") -> list[str]:
    """Human-readable differences between two ``Header.config()`` dicts (empty when they agree):
    "<key> <a's value> in <a_name>, <b's value> in <b_name>"."""
    def say(what: str, x: Any, y: Any) -> str:
        return f"{what} {x} in {a_name}, {y} in {b_name}"

    diffs = [say(k, a.get(k), b.get(k)) for k in schema.EXTRACTION_ATTRS if a.get(k) != b.get(k)]
    ca, cb = list(a.get("classes") or []), list(b.get("classes") or [])
    if ca != cb:
        diffs.append(f"classes differ ({len(ca)} in {a_name}, {len(cb)} in {b_name})")
    ma, mb = a.get("models") or {}, b.get("models") or {}
    if set(ma) != set(mb):
        diffs.append(say("models", sorted(ma), sorted(mb)))
    for m in sorted(set(ma) & set(mb)):
        for k in schema.MODEL_CONFIG:
            x, y = ma[m].get(k), mb[m].get(k)
            if k in schema.MODEL_ROOT_DEFAULTS:  # older formats recorded one for every model: the root's
                x, y = x if x is not None else a.get(k), y if y is not None else b.get(k)
            if k in ("mean", "std"):
                same = x is not None and y is not None and np.allclose(np.asarray(x, float), np.asarray(y, float))
            else:
                same = x == y
            if not same:
                diffs.append(say(f"{m} {k}", x, y))
    return diffs


@dataclass(frozen=True)
class ModelInfo:
    """One model's features in a shard or a feature set."""

    name: str
    shape: tuple[int, int, int, int]  # per clip: (T', H', W', C), channels last as stored
    attrs: dict[str, Any] = field(default_factory=dict)  # ModelHeader.attrs(): provenance and cost
    compression: str | None = None
    clip_gflops: bool = False  # the shard holds /gflops/<name>: each clip's GFLOPs (a clip-dependent backbone)

    @property
    def channels_first(self) -> list[int]:
        """[C, T', H', W']: the shape an aggregator's source is built with."""
        t, h, w, c = self.shape
        return [c, t, h, w]


@dataclass
class ShardHeader:
    """What a shard holds, without its features: header, video table, feature shapes."""

    path: Path
    header: Header
    ids: list[str]
    labels: np.ndarray  # (V,) int64
    clip_start: np.ndarray  # (V, N) int64
    models: dict[str, ModelInfo]

    @property
    def config(self) -> dict[str, Any]:
        return self.header.config()

    @property
    def classes(self) -> list[str]:
        return self.header.classes

    def model(self, name: str) -> ModelInfo:
        try:
            return self.models[name]
        except KeyError:
            raise BadFile(f"{self.path}: no features/{name}") from None


def check_compatible(fs: Any, *, classes: Sequence[str], config: Mapping[str, Any],
                     shapes: Mapping[str, Sequence[int]], what: str, reference: str,
                     weights: Mapping[str, Any] | None = None) -> None:
    """Incompatible unless features ``fs`` can be used together with ``reference``'s: the same class
    list, the same extraction ``config`` (the keys it gives, e.g. ``schema.EXTRACTION_ATTRS``), per
    model in ``shapes`` the same clip shape (T', H', W', C) and, per model in ``weights``, the same
    weights provenance (the ``weights`` attribute: a file's sha256 or "random-init:seed=S"; features
    of other weights are other features even at the same shape; unknown on either side: not
    compared). The one home of this check.

    ``fs``: a ``FeatureSet``, or one shard's ``ShardHeader``: anything with ``classes``, ``config``
    (a mapping holding those keys) and ``model(name).shape``. The error is one line, starting with
    ``what`` (what ``fs`` is, e.g. "validation set ['val']") and naming ``reference`` (e.g. "the
    training set", "the run", a shard's path):

      "<what>: class list differs from the one in <reference> (<n> vs <m> classes)"
      "<what>: class list differs from the one in <reference> (position <i>: <a> vs <b>)"
      "<what>: extraction <key> <value>[, ...] differs from <key> <value>[, ...] in <reference>"
      "<what>: <model> clips are <shape>, not <shape> as in <reference>"
      "<what>: <model> features were extracted with weights <a>, not <b> as in <reference>"
    """
    mine, theirs = list(fs.classes), list(classes)
    if mine != theirs:
        if len(mine) != len(theirs):
            detail = f"{len(mine)} vs {len(theirs)} classes"
        else:
            i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
            detail = f"position {i}: {mine[i]!r} vs {theirs[i]!r}"
        raise Incompatible(f"{what}: class list differs from the one in {reference} ({detail})")
    found = fs.config
    keys = [k for k in config if found.get(k) != config[k]]
    if keys:
        raise Incompatible(f"{what}: extraction {', '.join(f'{k} {found.get(k)}' for k in keys)} differs from "
                           f"{', '.join(f'{k} {config[k]}' for k in keys)} in {reference}")
    for model, shape in shapes.items():
        have, want = tuple(int(s) for s in fs.model(model).shape), tuple(int(s) for s in shape)
        if have != want:
            raise Incompatible(f"{what}: {model} clips are {have}, not {want} as in {reference}")
    for model, want_weights in (weights or {}).items():
        have_weights = fs.model(model).attrs.get("weights")
        if have_weights and want_weights and str(have_weights) != str(want_weights):
            raise Incompatible(f"{what}: {model} features were extracted with weights {have_weights}, not "
                               f"{want_weights} as in {reference}")


def read_header(path: str | Path) -> ShardHeader:
    """A shard's header, video table and feature shapes (no features); BadFile naming the file."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise BadFile(f"{path}: not a readable HDF5 shard: cannot be opened ({err})") from None
    with f:
        header = Header.read(f, path)
        for name in schema.VIDEO_FIELDS:
            if f"videos/{name}" not in f:
                raise BadFile(f"{path}: missing dataset videos/{name}")
        try:
            ids = [str(s) for s in f["videos/id"].asstr()[()]]
            labels = np.asarray(f["videos/label"][()], dtype=np.int64)
            clip_start = np.asarray(f["videos/clip_start"][()], dtype=np.int64)
        except (OSError, KeyError, TypeError) as err:
            raise BadFile(f"{path}: cannot read the video table ({err})") from None
        V, N = len(ids), header.num_clips
        if labels.shape != (V,) or clip_start.shape != (V, N):
            raise BadFile(f"{path}: videos/label {labels.shape} or videos/clip_start {clip_start.shape} "
                          f"do not match {V} videos x {N} clips")
        datasets = schema.feature_datasets(f)
        if not datasets:
            raise BadFile(f"{path}: no features")
        models = {}
        for name, ds in datasets:
            if ds.ndim != len(schema.FEATURE_AXES) or ds.shape[0] != V or ds.shape[1] != N:
                raise BadFile(f"{path}: features/{name} has shape {ds.shape}, expected ({V}, {N}, T', H', W', C)")
            if ds.dtype != np.dtype(schema.FEATURE_DTYPE):
                raise BadFile(f"{path}: features/{name} is {ds.dtype}, expected {schema.FEATURE_DTYPE}")
            compression = schema.dataset_compression(ds)
            if compression in schema.PLUGIN_COMPRESSIONS:  # register hdf5plugin's filters for what reads next
                schema.require_filters(ds, f"{path}: features/{name}", strict=False)
            per_clip = f.get(schema.gflops_key(name))
            if per_clip is not None and (per_clip.shape != (V, N) or per_clip.dtype.kind != "f"):
                raise BadFile(f"{path}: {schema.gflops_key(name)} has shape {per_clip.shape} ({per_clip.dtype}), "
                              f"expected ({V}, {N}) {schema.GFLOPS_DTYPE}")
            models[name] = ModelInfo(name, tuple(int(s) for s in ds.shape[2:]), header.models[name].attrs(),
                                     compression, per_clip is not None)
    return ShardHeader(path, header, ids, labels, clip_start, models)
