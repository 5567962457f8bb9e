"""Shard schema, format_version 1 (docs/format.md "Shard schema"): names and constants. The on-disk axis
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
  attrs on /features/<model> gflops_per_clip, layer, weights, mean, std, compute_dtype
"""
from __future__ import annotations

import re

FORMAT = "faster-features"
FORMAT_VERSION = 1
FEATURE_AXES = ("video", "clip", "t", "h", "w", "c")  # /features/<model>: (V, N, T', H', W', C)
FEATURE_DTYPE = "float16"

ROOT_ATTRS = ("format", "format_version", "clip_len", "num_clips", "frame_stride", "size", "classes",
              "software_version", "torch_version")
# Attributes that define an extraction configuration: a directory never mixes two.
CONFIG_ATTRS = ("clip_len", "num_clips", "frame_stride", "size", "classes")
MODEL_ATTRS = ("gflops_per_clip", "layer", "weights", "mean", "std", "compute_dtype")
VIDEO_FIELDS = ("id", "label", "num_frames", "fps", "clip_start")  # + optional "split"
COMPRESSIONS = ("none", "lzf", "gzip")

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


def features_key(model: str) -> str:
    return f"features/{model}"
