"""The shard writer: one shard per context, written under a temporary name and renamed when complete.

Features are written through to the open HDF5 file video by video (one video per chunk), so memory
stays at one video whatever the shard size. If an exception escapes the ``with`` block, the
temporary file is deleted: a crash never leaves a half shard that looks whole.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from faster.store import schema


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def next_seq(out_dir: str | Path, part: int) -> int:
    """First sequence number this part has never used (complete or temporary): names are never reused."""
    used = [-1]
    for p in Path(out_dir).iterdir():
        name = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
        parsed = schema.parse_shard_name(name)
        if parsed and parsed[0] == part:
            used.append(parsed[1])
    return max(used) + 1


class ShardWriter:
    """Write one shard of at most ``capacity`` videos.

    Args:
        out_dir: the feature-set directory.
        part: the writing process's part number (its shards, manifest and failures carry it).
        seq: this shard's sequence number within the part (``next_seq``).
        attrs: the root attributes of schema.ROOT_ATTRS except ``format``/``format_version``.
        model_attrs: per model, the attributes of schema.MODEL_ATTRS.
        capacity: the most videos this shard will hold.
        compression: "none", "lzf" or "gzip".
    """

    def __init__(self, out_dir: str | Path, *, part: int, seq: int, attrs: dict[str, Any],
                 model_attrs: dict[str, dict[str, Any]], capacity: int, compression: str = "none"):
        if compression not in schema.COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {schema.COMPRESSIONS}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / schema.shard_name(part, seq)
        self.tmp_path = self.out_dir / schema.tmp_shard_name(part, seq)
        self.attrs = dict(attrs)
        self.model_attrs = {m: dict(a) for m, a in model_attrs.items()}
        self.capacity = capacity
        self.compression = None if compression == "none" else compression
        self.ids: list[str] = []
        self._file = None

    def __enter__(self) -> "ShardWriter":
        import h5py

        self._file = h5py.File(self.tmp_path, "w")
        try:
            self._init_file(h5py)
        except BaseException:
            self._file.close()
            self._file = None
            self.tmp_path.unlink(missing_ok=True)
            raise
        return self

    def _init_file(self, h5py) -> None:
        f = self._file
        f.attrs["format"] = schema.FORMAT
        f.attrs["format_version"] = schema.FORMAT_VERSION
        for key, value in self.attrs.items():
            if key == "classes":
                value = json.dumps(list(value))
            elif isinstance(value, str):
                value = str(value)  # str subclasses (torch.__version__) have no HDF5 type
            f.attrs[key] = value
        num_clips = int(self.attrs["num_clips"])
        str_dtype = h5py.string_dtype("utf-8")
        v = f.create_group("videos")
        cap = self.capacity
        v.create_dataset("id", (0,), maxshape=(cap,), dtype=str_dtype, chunks=(cap,))
        v.create_dataset("label", (0,), maxshape=(cap,), dtype="int64", chunks=(cap,))
        v.create_dataset("num_frames", (0,), maxshape=(cap,), dtype="int64", chunks=(cap,))
        v.create_dataset("fps", (0,), maxshape=(cap,), dtype="float32", chunks=(cap,))
        v.create_dataset("clip_start", (0, num_clips), maxshape=(cap, num_clips), dtype="int64",
                         chunks=(cap, num_clips))
        f.create_group("features")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.capacity

    def add(self, *, id: str, label: int, num_frames: int, fps: float, clip_start, features: dict[str, np.ndarray],
            split: str | None = None) -> None:
        """Append one video. ``features[model]`` is (N, T', H', W', C), cast to float16 here."""
        assert self._file is not None, "ShardWriter.add outside its with-block"
        if self.full:
            raise RuntimeError(f"shard {self.path.name} is full ({self.capacity} videos)")
        if set(features) != set(self.model_attrs):
            raise ValueError(f"features for {sorted(features)}, expected {sorted(self.model_attrs)}")
        f, i = self._file, len(self.ids)
        v = f["videos"]
        for name, value in (("id", id), ("label", label), ("num_frames", num_frames), ("fps", fps)):
            v[name].resize((i + 1,))
            v[name][i] = value
        v["clip_start"].resize((i + 1, v["clip_start"].shape[1]))
        v["clip_start"][i] = np.asarray(clip_start, dtype=np.int64)
        if split is not None or "split" in v:
            if "split" not in v:
                import h5py

                v.create_dataset("split", (i,), maxshape=(self.capacity,), dtype=h5py.string_dtype("utf-8"),
                                 chunks=(self.capacity,))
            v["split"].resize((i + 1,))
            v["split"][i] = split or ""
        for model, array in features.items():
            array = np.asarray(array, dtype=np.float16)  # (N, T', H', W', C)
            key = schema.features_key(model)
            if key not in f:
                ds = f.create_dataset(key, (0, *array.shape), maxshape=(self.capacity, *array.shape),
                                      dtype="float16", chunks=(1, *array.shape), compression=self.compression)
                for a, val in self.model_attrs[model].items():
                    ds.attrs[a] = str(val) if isinstance(val, str) else val
            ds = f[key]
            if ds.shape[1:] != array.shape:
                raise ValueError(f"{model}: features of shape {array.shape}, the shard holds {ds.shape[1:]}")
            ds.resize((i + 1, *array.shape))
            ds[i] = array
        self.ids.append(id)

    def __exit__(self, exc_type, exc, tb) -> None:
        f, self._file = self._file, None
        if exc_type is not None or not self.ids:
            f.close()
            self.tmp_path.unlink(missing_ok=True)
            return
        f.flush()
        f.close()
        with open(self.tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp_path, self.path)
        self.sha256 = sha256_file(self.path)
