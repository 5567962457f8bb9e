"""Shard schema, format_version 3 (docs/format.md "Shard schema"): names and constants. The on-disk axis
order is stated here once; the typed header that reads and writes the attributes is store/header.py.

A feature set is a directory of ``shard-<part>-<seq>.h5`` files. Each shard holds V videos:

  attrs on /                 format, format_version, clip_len, num_clips, frame_stride, size,
                             classes (JSON list), software_version, torch_version
  /videos/id                 (V,) UTF-8 str      path relative to the input root: the join key
  /videos/label              (V,) int64          class index, -1 when unlabelled
  /videos/split              (V,) UTF-8 str      optional: the annotation's split column
  /videos/num_frames         (V,) int64
  /videos/fps                (V,) float32
  /videos/clip_start         (V, N) int64        first frame of every clip
  /features/<model>          (V, N, T', H', W', C) float16, channels last, one video per chunk
  attrs on /features/<model> MODEL_ATTRS: gflops_per_clip, layer, weights, mean, std, compute_dtype,
                             size (format 2: this model's crop), clip_len and frame_stride (format 3:
                             this model's sampling of the root's clip grid), spatial_pool=1 (H' = W' = 1
                             holds each map's spatial mean; absent for full maps)
                             <model> is the model's name escaped by ``model_key`` (no "/" in it)
  /gflops/<model>            (V, N) float32, optional: each clip's GFLOPs, for a backbone whose cost
                             depends on the clip (VA-RED²); absent otherwise, and in older shards

Compression is per dataset (HDF5 filters): none, lzf, gzip (built into h5py), zstd, lz4 (the
hdf5plugin filters, registered by ``import hdf5plugin`` in the reading process: ``require_filters``).
"""
from __future__ import annotations

import re

FORMAT = "faster-features"
# 2: per-model crop size (attribute size on /features/<model>); 3: per-model clip_len and frame_stride
# (attributes on /features/<model>; the root's are the clip grid they are taken from). 1 and 2 still read:
# their models take the root's size (1) and the root's clip_len and frame_stride (1, 2).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FEATURE_AXES = ("video", "clip", "t", "h", "w", "c")  # /features/<model>: (V, N, T', H', W', C)
FEATURE_DTYPE = "float16"
GFLOPS_DTYPE = "float32"  # /gflops/<model>: (V, N)

ROOT_ATTRS = ("format", "format_version", "clip_len", "num_clips", "frame_stride", "size", "classes",
              "software_version", "torch_version")
# How the clips were sampled and cropped: what a run records of the features it read.
EXTRACTION_ATTRS = ("clip_len", "num_clips", "frame_stride", "size")
# Root attributes that define an extraction configuration: a directory never mixes two.
CONFIG_ATTRS = (*EXTRACTION_ATTRS, "classes")
# The attributes of /features/<model>, the one list (store.header.ModelHeader has these fields):
MODEL_ATTRS = ("gflops_per_clip", "layer", "weights", "mean", "std", "compute_dtype", "spatial_pool", "size",
               "clip_len", "frame_stride")
# ... of which these may be absent: spatial_pool is set only on pooled maps, size only since format 2,
# clip_len and frame_stride only since format 3 (absent: the root's)
MODEL_OPTIONAL = ("spatial_pool", "size", "clip_len", "frame_stride")
# ... and these fall back to the root attribute of the same name when absent (older formats)
MODEL_ROOT_DEFAULTS = ("size", "clip_len", "frame_stride")
# ... and this one is a cost, not part of what the features are
MODEL_COST = ("gflops_per_clip",)
MODEL_REQUIRED = tuple(a for a in MODEL_ATTRS if a not in MODEL_OPTIONAL)  # every shard has them (verify)
MODEL_CONFIG = tuple(a for a in MODEL_ATTRS if a not in MODEL_COST)  # per model, part of the configuration
VIDEO_FIELDS = ("id", "label", "num_frames", "fps", "clip_start")  # + optional "split"
COMPRESSIONS = ("none", "lzf", "gzip", "zstd", "lz4")
# HDF5 filter ids of the compressors (registered ids; the last two come from hdf5plugin).
FILTER_IDS = {"gzip": 1, "lzf": 32000, "zstd": 32015, "lz4": 32004}
PLUGIN_COMPRESSIONS = ("zstd", "lz4")
_FILTER_NAMES = {v: k for k, v in FILTER_IDS.items()}
_SHUFFLE, _FLETCHER32, _SCALEOFFSET, _NBIT = 2, 3, 6, 5  # HDF5's own filters, always available

SHARD_GLOB = "shard-*.h5"
_SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)\.h5$")


def part_name(part: int) -> str:
    return f"{part:05d}"


def shard_name(part: int, seq: int) -> str:
    return f"shard-{part_name(part)}-{seq:06d}.h5"


def tmp_shard_name(part: int, seq: int) -> str:
    """A shard being written: never matches SHARD_GLOB, so readers cannot mistake it for a whole one."""
    return f".{shard_name(part, seq)}.tmp"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(part, seq) of a complete shard's file name, None for anything else."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def manifest_name(part: int) -> str:
    return f"manifest-{part_name(part)}.json"


def failures_name(part: int) -> str:
    return f"failures-{part_name(part)}.jsonl"


def model_key(model: str) -> str:
    """``model``'s name as one HDF5 link name: "%" -> "%25", then "/" -> "%2F" (percent-encoding of
    those two characters only, RFC 3986 Sec. 2.1), so ``hf:/models/videomae`` is one dataset, not
    nested groups. Every registered name has neither character and is its own key. ``model_name``
    reverses it."""
    return model.replace("%", "%25").replace("/", "%2F")


def model_name(key: str) -> str:
    """The model name of an HDF5 link name written by ``model_key``."""
    return key.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


def features_key(model: str) -> str:
    """The path of ``model``'s /features dataset (its name escaped by ``model_key``)."""
    return f"features/{model_key(model)}"


def gflops_key(model: str) -> str:
    """The (V, N) per-clip GFLOPs of ``model`` (only for a backbone whose cost depends on the clip)."""
    return f"gflops/{model_key(model)}"


def feature_datasets(f) -> list[tuple[str, object]]:
    """(model name, dataset) of every /features dataset of an open shard, names unescaped
    (``model_name``); empty when the shard has no /features group. The one reader of f["features"]."""
    if "features" not in f:
        return []
    return [(model_name(key), ds) for key, ds in f["features"].items()]


def dataset_filters(ds) -> list[int]:
    """The HDF5 filter ids of an h5py Dataset's pipeline (readable without the filters being available)."""
    plist = ds.id.get_create_plist()
    return [int(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]


def dataset_compression(ds) -> str | None:
    """The compression name of a dataset ("lzf", "zstd", ...; None for none), or "filter-<id>" for another filter."""
    for fid in dataset_filters(ds):
        if fid in _FILTER_NAMES:
            return _FILTER_NAMES[fid]
        if fid not in (_SHUFFLE, _FLETCHER32, _SCALEOFFSET, _NBIT):
            return f"filter-{fid}"
    return None


def require_filters(ds, where: str, strict: bool = True) -> bool:
    """Make the filters of ``ds`` readable: ``import hdf5plugin`` (once, process-wide) when one is not
    registered yet. Returns whether they all are; with ``strict``, BadFile naming ``where`` and the
    fix when one cannot be."""
    import h5py

    missing = [f for f in dataset_filters(ds) if not h5py.h5z.filter_avail(f)]
    if not missing:
        return True
    names = ", ".join(_FILTER_NAMES.get(f, f"filter {f}") for f in missing)
    try:
        import hdf5plugin  # noqa: F401  (registers zstd, lz4, blosc, ... with HDF5)
    except ImportError:
        if not strict:
            return False
        from faster.errors import BadFile

        raise BadFile(f"{where}: compressed with {names}, which needs hdf5plugin in the reading process: "
                      f"pip install hdf5plugin (docs/storage.md)") from None
    still = [f for f in missing if not h5py.h5z.filter_avail(f)]
    if still and strict:
        from faster.errors import BadFile

        raise BadFile(f"{where}: HDF5 filter {', '.join(str(f) for f in still)} is not available, even with "
                      f"hdf5plugin {hdf5plugin.version}")
    return not still
