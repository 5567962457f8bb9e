"""Writing feature sets (docs/format.md): ``FeatureSetWriter`` for a whole directory, ``ShardWriter`` for one shard.

``FeatureSetWriter`` is the public writer. Extraction, the synthetic feature sets of the tests and
benchmarks, and any packer of other tools' features use it::

    header = Header(clip_len=8, num_clips=4, frame_stride=1, size=112, classes=["a", "b"],
                    models={"r2d26": ModelHeader(gflops_per_clip=1.6, layer="res5", weights="...",
                                                 mean=[.45] * 3, std=[.225] * 3, compute_dtype="float32")})
    with FeatureSetWriter("feats/", header) as w:
        for video in videos:
            if video.id in w.done:          # resume: already in a complete shard
                continue
            w.add(id=video.id, label=video.label, num_frames=..., fps=..., clip_start=[...],
                  features={"r2d26": maps})   # (N, T', H', W', C) per model
                  # gflops={"vared_r2plus1d50": costs}: (N,) per clip, for a clip-dependent backbone
        w.fail("broken.mp4", "open", "moov atom not found")

It owns the directory's state for one *part* (one writing process): shards written under a
temporary name and renamed when complete, rolled over every ``shard_size`` videos, sequence
numbers never reused (not even a killed writer's temporary one), the part manifest with each shard's
sha256 (rewritten atomically after every shard), the failures log, and, for a single-part directory,
the merged manifest. A directory holding shards of another configuration is refused before
anything is written. If an exception escapes the ``with`` block the open shard is deleted; the
complete ones and the manifest that lists them stay. A shard that fills up is made durable
(fsync), renamed and hashed on a background thread while the next one is written, and listed when
that is done (at the next shard's close, or the block's end); a shard is listed only once its
final name and digest exist, so a kill at any moment leaves a consistent directory.

``ShardWriter`` writes one shard in blocks: each video's maps are copied (cast to float16) into a
block buffer of up to ``BLOCK_BYTES`` (at least one video), and a full block goes to the open HDF5
file with one resize and one write per dataset, instead of a resize and a write per dataset and
video (issue [22]: `faster pack` at 0.22x a raw np.load loop, most of it in the per-video appends).
The file's layout is unchanged (one video per chunk), so readers see the same shards; memory stays
at one block whatever the shard size. Nothing reaches the final name before the shard is complete.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue, Incompatible
from faster.store import manifest, schema
from faster.store.files import read_json, sha256_file
from faster.store.header import Header, config_diff, read_header
from faster.store.lock import PartLock

log = logging.getLogger(__name__)


def next_seq(out_dir: str | Path, part: int) -> int:
    """First sequence number this part has never used (complete or temporary): names are never reused."""
    used = [-1]
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return 0
    for p in out_dir.iterdir():
        name = p.name[1:-4] if p.name.startswith(".") and p.name.endswith(".tmp") else p.name
        parsed = schema.parse_shard_name(name)
        if parsed and parsed[0] == part:
            used.append(parsed[1])
    return max(used) + 1


def check_compression(compression: str) -> str | None:
    """The h5py filter name of a --compression value (None for "none"); BadValue naming an unknown one."""
    if compression not in schema.COMPRESSIONS:
        raise BadValue(f"unknown compression {compression!r}; expected one of {', '.join(schema.COMPRESSIONS)}")
    return None if compression == "none" else compression


BLOCK_BYTES = 32 * 2**20  # the features a ShardWriter buffers before it writes them (at least one video)
ZSTD_LEVEL = 1  # zstd's fastest standard level: ~the ratio of level 3 on these maps at a multiple of its speed


def filter_options(compression: str) -> dict[str, Any]:
    """``create_dataset`` keywords of a --compression value. zstd and lz4 come from hdf5plugin (imported
    here, only when asked for). zstd gets HDF5's byte shuffle first (the two bytes of each float16
    apart: the few exponents compress); lz4 does better without it, on the runs of zero bytes
    that the ReLU zeros leave (measured: docs/storage.md)."""
    name = check_compression(compression)
    if name is None:
        return {}
    if name not in schema.PLUGIN_COMPRESSIONS:
        return {"compression": name}
    try:
        import hdf5plugin
    except ImportError:
        raise BadValue(f"--compression {name} needs hdf5plugin: pip install hdf5plugin") from None
    plugin = hdf5plugin.Zstd(clevel=ZSTD_LEVEL) if name == "zstd" else hdf5plugin.LZ4()
    return {**dict(plugin), "shuffle": name == "zstd"}


class ShardWriter:
    """Write one shard of at most ``capacity`` videos.

    Args:
        out_dir: the feature-set directory.
        part: the writing process's part number (its shards, manifest and failures carry it).
        seq: this shard's sequence number within the part (``next_seq``).
        header: the feature set's header (root attributes and per-model provenance).
        capacity: the most videos this shard will hold.
        compression: "none", "lzf", "gzip", "zstd" or "lz4" (the last two need hdf5plugin).
    """

    def __init__(self, out_dir: str | Path, *, part: int, seq: int, header: Header, capacity: int,
                 compression: str = "none"):
        self.compression = check_compression(compression)
        self._filters = filter_options(compression)
        if capacity < 1:
            raise BadValue(f"capacity must be >= 1, got {capacity}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / schema.shard_name(part, seq)
        self.tmp_path = self.out_dir / schema.tmp_shard_name(part, seq)
        self.header = header
        self.capacity = capacity
        self.ids: list[str] = []
        self._gflops_models: set[str] = set()  # the models with per-clip GFLOPs (fixed by the first video)
        self.sha256: str | None = None
        self._file = None
        # the block not yet written: per-video metadata, and per model a (block, N, T', H', W', C) float16
        # buffer (allocated at the first video, which fixes the shapes) holding ``len(self._meta)`` videos
        self._meta: list[dict[str, Any]] = []
        self._maps: dict[str, np.ndarray] = {}
        self._block = 1
        self._written = 0  # videos already in the file

    def __enter__(self) -> ShardWriter:
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
        self.header.write(f)
        num_clips = int(self.header.num_clips)
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
            split: str | None = None, gflops: dict[str, np.ndarray] | None = None) -> None:
        """Append one video. ``features[model]`` is (N, T', H', W', C), cast to float16 here;
        ``gflops[model]`` (N,) each clip's GFLOPs, for the models whose cost depends on the clip
        (the same models for every video of a shard), cast to float32."""
        assert self._file is not None, "ShardWriter.add outside its with-block"
        if self.full:
            raise RuntimeError(f"shard {self.path.name} is full ({self.capacity} videos)")
        if set(features) != set(self.header.models):
            raise BadValue(f"features for {sorted(features)}, expected {sorted(self.header.models)}")
        gflops = dict(gflops or {})
        if self.ids and set(gflops) != self._gflops_models:
            raise BadValue(f"per-clip GFLOPs for {sorted(gflops)}, the shard holds them for {sorted(self._gflops_models)}")
        if set(gflops) - set(self.header.models):
            raise BadValue(f"per-clip GFLOPs for {sorted(set(gflops) - set(self.header.models))}, not a model of the "
                           f"header ({sorted(self.header.models)})")
        num_clips = int(self.header.num_clips)
        for model, values in gflops.items():
            if np.shape(values) != (num_clips,):
                raise BadValue(f"{model}: per-clip GFLOPs of shape {np.shape(values)}, expected ({num_clips},)")
        arrays = {model: np.asarray(array) for model, array in features.items()}  # (N, T', H', W', C) each
        if not self._maps:  # the first video fixes the block: BLOCK_BYTES of float16 maps, >= 1 video
            per_video = sum(2 * a.size for a in arrays.values())
            self._block = max(1, min(self.capacity, BLOCK_BYTES // max(per_video, 1)))
            self._maps = {model: np.empty((self._block, *a.shape), dtype=np.float16) for model, a in arrays.items()}
        for model, array in arrays.items():
            held = self._maps[model].shape[1:]
            if array.shape != held:
                raise BadValue(f"{model}: features of shape {array.shape}, the shard holds {held}")
        k = len(self._meta)
        for model, array in arrays.items():
            self._maps[model][k] = array  # the float16 cast, and a copy: the caller may reuse its array
        self._meta.append({"id": id, "label": label, "num_frames": num_frames, "fps": fps, "split": split,
                           "clip_start": np.asarray(clip_start, dtype=np.int64),
                           "gflops": {m: np.asarray(v, dtype=np.float32) for m, v in gflops.items()}})
        self._gflops_models = set(gflops)
        self.ids.append(id)
        if len(self._meta) == self._block:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered block: one resize and one write per dataset."""
        n = len(self._meta)
        if not n:
            return
        f, i, j = self._file, self._written, self._written + n
        v = f["videos"]
        meta = self._meta
        for name in ("id", "label", "num_frames", "fps"):
            v[name].resize((j,))
            v[name][i:j] = [m[name] for m in meta]
        v["clip_start"].resize((j, v["clip_start"].shape[1]))
        v["clip_start"][i:j] = np.stack([m["clip_start"] for m in meta])
        if "split" in v or any(m["split"] is not None for m in meta):
            if "split" not in v:  # earlier videos without a split: ""
                import h5py

                v.create_dataset("split", (i,), maxshape=(self.capacity,), dtype=h5py.string_dtype("utf-8"),
                                 chunks=(self.capacity,))
            v["split"].resize((j,))
            v["split"][i:j] = [m["split"] or "" for m in meta]
        for model, block in self._maps.items():
            key = schema.features_key(model)
            if key not in f:
                ds = f.create_dataset(key, (0, *block.shape[1:]), maxshape=(self.capacity, *block.shape[1:]),
                                      dtype="float16", chunks=(1, *block.shape[1:]), **self._filters)
                self.header.models[model].write(ds)
            ds = f[key]
            ds.resize((j, *block.shape[1:]))
            ds[i:j] = block[:n]
        num_clips = int(self.header.num_clips)
        for model in self._gflops_models:
            key = schema.gflops_key(model)
            if key not in f:
                f.create_dataset(key, (0, num_clips), maxshape=(self.capacity, num_clips), dtype=schema.GFLOPS_DTYPE,
                                 chunks=(self.capacity, num_clips))
            f[key].resize((j, num_clips))
            f[key][i:j] = np.stack([m["gflops"][model] for m in meta])
        self._written = j
        self._meta = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.close(exc_type is None):
            self.commit()

    def close(self, keep: bool = True) -> bool:
        """Write the last block and close the temporary file; False (and the file deleted) when there
        is nothing to keep: ``keep`` False (an error in the with-block), no video, or a failed write."""
        complete = False
        try:
            if keep and self.ids:
                self._flush()  # the last block
                complete = True
        finally:
            f, self._file = self._file, None
            self._meta, self._maps = [], {}
            if not complete:  # an error (in the with-block or in this last write), or no video: nothing kept
                self._discard(f)
        if not complete:
            return False
        try:
            f.flush()
            f.close()
        except BaseException:  # e.g. the disk filled up: the shard is not kept, the shards before it are
            self._discard(f)
            raise
        return True

    def commit(self) -> None:
        """Make the closed shard durable (fsync), give it its final name and its sha256. Touches no HDF5
        object, so it may run on another thread while the next shard is written."""
        try:
            with open(self.tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        except BaseException:  # e.g. the disk filled up: the shard is not kept, the shards before it are
            self.tmp_path.unlink(missing_ok=True)
            raise
        os.replace(self.tmp_path, self.path)
        self.sha256 = sha256_file(self.path)

    def _discard(self, f: Any) -> None:
        """Close ``f`` however it can be closed (after a failed write h5py may refuse) and delete the
        temporary file: an interrupted shard leaves nothing behind."""
        try:
            f.close()
        except Exception:  # h5py after a failed flush (a full disk): the file is unusable anyway
            log.debug("closing %s after a failed write", self.tmp_path, exc_info=True)
        self.tmp_path.unlink(missing_ok=True)


class FeatureSetWriter:
    """Write one part of a feature-set directory (see the module docstring).

    Args:
        out: the feature-set directory (created on entering the ``with`` block).
        header: the configuration and per-model provenance every shard carries.
        part, num_parts: this process's part of a distributed job (faster.runtime.placement).
        shard_size: videos per shard.
        compression: "none", "lzf", "gzip", "zstd" or "lz4" (the last two need hdf5plugin).
        wait: when another live process holds this part's lock (store.lock), wait for it instead of
            refusing at once.

    Constructing it only reads: the ids already held by complete shards (``done``) and the refusal
    of a directory written with another configuration (Incompatible), so a caller can plan (and
    check the disk) before anything is written.
    """

    def __init__(self, out: str | Path, header: Header, *, part: int = 0, num_parts: int = 1, shard_size: int = 64,
                 compression: str = "none", wait: bool = False):
        if shard_size < 1:
            raise BadValue(f"shard_size must be >= 1, got {shard_size}")
        filter_options(compression)  # an unknown one, or zstd/lz4 without hdf5plugin, is refused now
        self.out, self.header = Path(out), header
        self.part, self.num_parts = part, num_parts
        self.shard_size, self.compression = shard_size, compression
        self.config = header.config()
        self.lock = PartLock(self.out, part, wait=wait)
        self.shard_videos: dict[str, list[str]] = {}  # every complete shard of the directory -> its ids
        self.my_shards: dict[str, dict[str, Any]] = {}  # this part's shards -> manifest entries
        self.short: set[str] = set()  # ids whose video was shorter than one clip (recorded in the manifest)
        self.history: list[dict[str, Any]] = []  # the summaries of earlier writes of this part (manifest "runs")
        self.failures = manifest.FailureLog(self.out, part)
        self.shards_written = self.added = self.failed = 0
        self.merged: dict[str, Any] | None = None
        self._summary: dict[str, Any] | None = None
        self._shard: ShardWriter | None = None
        self._committing: tuple[ShardWriter, Future] | None = None  # a closed shard being synced on _commits
        self._commits: ThreadPoolExecutor | None = None
        self._seq = 0
        if self.out.is_dir():
            self._scan()

    def _reset(self) -> None:
        self.shard_videos, self.my_shards, self.short, self.history = {}, {}, set(), []

    @property
    def done(self) -> set[str]:
        """Ids held by the complete shards of the directory (any part)."""
        return {i for ids in self.shard_videos.values() for i in ids}

    def _scan(self) -> None:
        for path in sorted(self.out.glob(schema.SHARD_GLOB)):
            if schema.parse_shard_name(path.name) is None:
                continue
            sh = read_header(path)
            diff = config_diff(sh.config, self.config, path.name, "this command")
            if diff:
                raise Incompatible(f"{self.out} holds features of another configuration ({'; '.join(diff[:4])}); "
                                   f"use a new output directory, or the options that made it")
            self.shard_videos[path.name] = sh.ids
        for p, m in manifest.part_manifests(self.out).items():
            if m and m.get("config"):
                diff = config_diff(m["config"], self.config, schema.manifest_name(p), "this command")
                if diff:
                    raise Incompatible(f"{self.out} was started with another configuration ({'; '.join(diff[:4])}); "
                                       f"use a new output directory, or the options that made it")
        old = read_json(self.out / schema.manifest_name(self.part)) or {}
        checksums = {s["name"]: s["sha256"] for s in old.get("shards", []) if s["name"] in self.shard_videos}
        self.short = set(old.get("short", []))
        self.history = list(old.get("runs", []))
        for name in sorted(self.shard_videos):
            parsed = schema.parse_shard_name(name)
            if parsed and parsed[0] == self.part:
                self.my_shards[name] = manifest.shard_entry(self.out / name, len(self.shard_videos[name]),
                                                            checksums.get(name))

    # -- the with-block --

    def __enter__(self) -> FeatureSetWriter:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only filesystem, a parent without write permission
            raise BadFile(f"{self.out}: cannot create the output directory ({err.strerror})") from None
        self.lock.acquire()
        try:
            self._reset()
            self._scan()  # again, under the lock: what another process of this part wrote meanwhile counts
        except BaseException:
            self.lock.release()
            raise
        self._seq = next_seq(self.out, self.part)  # before cleaning: a killed writer's temporary name is not reused
        for p in self.out.glob(".shard-*.h5.tmp"):  # this part's, left by a killed writer: incomplete by construction
            parsed = schema.parse_shard_name(p.name[1:-4])
            if parsed and parsed[0] == self.part:
                log.info("removing %s, left by an interrupted write", p.name)
                p.unlink(missing_ok=True)
        self.failures.compact(self.done)
        self._write_manifest()
        return self

    def add(self, *, id: str, label: int, num_frames: int, fps: float, clip_start, features: dict[str, np.ndarray],
            split: str | None = None, short: bool = False, gflops: dict[str, np.ndarray] | None = None) -> None:
        """Append one video (``features[model]``: (N, T', H', W', C); ``gflops[model]``: (N,) per-clip
        GFLOPs of a clip-dependent backbone); closes the shard when it is full."""
        if self._shard is None:
            self._seq = max(self._seq, next_seq(self.out, self.part))
            self._shard = ShardWriter(self.out, part=self.part, seq=self._seq, header=self.header,
                                      capacity=self.shard_size, compression=self.compression).__enter__()
        self._shard.add(id=id, label=label, num_frames=num_frames, fps=fps, clip_start=clip_start,
                        features=features, split=split, gflops=gflops)
        self.added += 1
        if short:
            self.short.add(id)
        if self._shard.full:
            self.close_shard(background=True)

    def fail(self, video_id: str, stage: str, error: str, **extra: Any) -> None:
        """Record a video that could not be written (failures-<part>.jsonl; the latest record per id wins)."""
        self.failures.append(manifest.failure_record(video_id, stage, error, **extra))
        self.failed += 1

    def close_shard(self, background: bool = False) -> None:
        """Complete the open shard (close, fsync, rename, sha256) and list it in the part manifest.
        ``background``: the fsync, rename and sha256 run on a thread while the caller goes on writing
        the next shard (a full shard's, from ``add``: its sync no longer stalls reading and writing);
        the shard is listed once they are done, at the next shard's close or at the end of the
        with-block, and an error of theirs (a full disk) is raised there."""
        w, self._shard = self._shard, None
        if w is None:
            self._settle()
            return
        kept = w.close()
        self._seq += 1
        try:
            self._settle()  # the shard before: listed in order, its error raised before this one is committed
        except BaseException:
            w.tmp_path.unlink(missing_ok=True)  # closed, never committed: nothing left behind
            raise
        if not kept:
            return
        if background:
            if self._commits is None:
                self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
            self._committing = (w, self._commits.submit(w.commit))
            return
        w.commit()
        self._list(w)

    def _settle(self) -> None:
        """Wait for the shard committing in the background and list it (its error is raised)."""
        pending, self._committing = self._committing, None
        if pending is not None:
            w, future = pending
            future.result()
            self._list(w)

    def _list(self, w: ShardWriter) -> None:
        self.shard_videos[w.path.name] = list(w.ids)
        self.my_shards[w.path.name] = manifest.shard_entry(w.path, len(w.ids), w.sha256)
        self.shards_written += 1
        self._write_manifest()

    def finish(self, **summary: Any) -> None:
        """Record this write's summary (times, counts, device, ...) in the part manifest's ``runs``
        (the on-disk name, docs/format.md), written when the ``with`` block closes."""
        self._summary = summary

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                w, self._shard = self._shard, None
                if w is not None:
                    w.__exit__(exc_type, exc, tb)  # deletes the temporary file
                return
            self.close_shard()
            self.failures.compact(self.done)
            self._write_manifest(self._summary)
            if self.num_parts == 1:
                self.merged = manifest.merge(self.out, self.shard_videos, config=self.config)
        finally:
            if self._committing is not None:  # an error above: a complete shard still committing is kept and listed
                try:
                    self._settle()
                except Exception as err:  # its temporary file is gone: resuming writes its videos again
                    log.warning("a complete shard was not kept: %s", err)
            if self._commits is not None:
                self._commits.shutdown(wait=True)
                self._commits = None
            self.lock.release()

    def _write_manifest(self, finished: dict[str, Any] | None = None) -> None:
        h = self.header
        m = {"format": schema.FORMAT, "format_version": schema.FORMAT_VERSION, "part": self.part,
             "num_parts": self.num_parts, "config": self.config, "software_version": h.software_version,
             "torch_version": h.torch_version, "compression": self.compression,
             "shards": [self.my_shards[k] for k in sorted(self.my_shards)],
             "videos": sum(s["videos"] for s in self.my_shards.values()), "short": sorted(self.short),
             "runs": self.history + ([finished] if finished else []),  # the on-disk name (docs/format.md)
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest.write_part_manifest(self.out, self.part, m)
