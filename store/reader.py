"""Reading feature sets (docs/format.md "Shard schema"): index the shards, join directories, stream clips.

A feature set is one or more directories of ``shard-*.h5`` files (the shards are the truth; manifests
are not needed). Shards holding the same models are parts of one extraction and simply pooled,
whatever directory or process wrote them; groups holding different models (an expensive extraction
beside a cheap one) are joined by video id, and the join reports how many videos matched. Every
shard must carry format "faster-features", format_version 1 or 2, and the same clip_len, num_clips,
frame_stride, size and classes (``header.check_compatible``); joined videos must have the same clip
starts. Any violation is a ValueError naming the file.

``FeatureSet.dataset(sources)`` is a torch Dataset that reads, for each source ("expensive",
"cheap"), only that source's model at that source's clip positions: an expensive position never
reads cheap features. HDF5 files are opened lazily in each process (DataLoader worker) and kept in
a small LRU; reads are per index (h5py list indexing is very slow) straight into a preallocated
array; ids, labels and row pointers live in numpy arrays (no per-worker copies by refcounting).
Memory is bounded by the batch, never by the set's size. Nothing here knows models or training.

``FeatureSet.clip_gflops(model)`` reads the per-clip GFLOPs of a backbone whose cost depends on the
clip ((V, N), the shards' ``gflops/<model>``), None for every other backbone (whose cost per clip is
the header's ``gflops_per_clip``).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue, Incompatible
from faster.store import schema
from faster.store.header import ModelInfo, ShardHeader, check_compatible, read_header
from faster.store.integrity import finite, nonfinite_message

__all__ = ["FeatureDataset", "FeatureSet", "ModelInfo", "ThreadedLoader", "list_shards", "read_header"]

log = logging.getLogger(__name__)

MAX_OPEN_FILES = 32  # per process


def list_shards(directory: str | Path) -> list[Path]:
    """The complete shards of one directory, in (part, seq) order."""
    d = Path(directory)
    if not d.is_dir():
        raise BadFile(f"{d}: not a directory")
    shards = [p for p in d.glob(schema.SHARD_GLOB) if schema.parse_shard_name(p.name)]
    return sorted(shards, key=lambda p: schema.parse_shard_name(p.name))


class _Group:
    """Shards that hold the same models: parts of one extraction, pooled."""

    def __init__(self, first: ShardHeader):
        self.models = tuple(sorted(first.models))
        self.first = first  # the reference every other shard of the group is checked against
        self.paths: list[str] = []
        self.index: dict[str, int] = {}  # id -> position in the lists below
        self.shard: list[int] = []
        self.row: list[int] = []
        self.labels: list[int] = []
        self.clip_start: list[np.ndarray] = []
        self.duplicates = 0

    def add(self, sh: ShardHeader) -> None:
        k = len(self.paths)
        self.paths.append(str(sh.path))
        for r, vid in enumerate(sh.ids):
            if vid in self.index:
                self.duplicates += 1  # a re-run's copy: the first complete shard wins
                continue
            self.index[vid] = len(self.shard)
            self.shard.append(k)
            self.row.append(r)
            self.labels.append(int(sh.labels[r]))
            self.clip_start.append(sh.clip_start[r])


class FeatureSet:
    """One or more feature-set directories, indexed and joined by video id.

    Attributes: ``ids`` (V,) str and ``labels`` (V,) int64 numpy arrays in a stable order (the first
    group's shard order), ``classes``, ``config`` (clip_len, num_clips, frame_stride, size),
    ``models`` (name -> ModelInfo), ``join`` (how many videos each group had and how many matched).
    """

    def __init__(self, dirs: Sequence[str | Path], *, skip_shards: Iterable[str | Path] = (),
                 skip_videos: Iterable[str] = ()):
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        if not dirs:
            raise BadValue("no feature-set directory given")
        self.dirs = [str(d) for d in dirs]
        self._skip_videos = set(skip_videos)
        groups: dict[tuple[str, ...], _Group] = {}
        first: ShardHeader | None = None
        for d in dirs:
            skip = {str(Path(p)) for p in skip_shards}
            shards = [p for p in list_shards(d) if str(p) not in skip]
            if not shards:
                raise BadFile(f"{d}: no complete shards ({schema.SHARD_GLOB})")
            for path in shards:
                sh = read_header(path)
                key = tuple(sorted(sh.models))
                group = groups.get(key)
                # the first shard of a group is checked against the set's first shard, every other
                # shard against its group's first (which has the same models): so all shards agree
                ref = group.first if group else (first or sh)
                check_compatible(sh, classes=ref.classes, config=ref.header.extraction,
                                 shapes={m: ref.model(m).shape for m in key} if group else {},
                                 weights={m: ref.model(m).attrs.get("weights") for m in key} if group else {},
                                 what=str(path), reference=str(ref.path))
                first = first or sh
                if group is None:
                    group = groups[key] = _Group(sh)
                group.add(sh)
        assert first is not None, "at least one shard was read"
        self.config = first.header.extraction
        self.classes: list[str] = list(first.classes)
        seen: dict[str, tuple[str, ...]] = {}
        for key in groups:
            for m in key:
                if m in seen:
                    raise Incompatible(f"model {m!r} appears in shards holding {list(seen[m])} and in shards "
                                     f"holding {list(key)}; give one extraction of each model")
                seen[m] = key
        self._groups = list(groups.values())
        for g in self._groups:
            if g.duplicates:
                log.warning("%d duplicate video ids among the shards of %s: the first copy is used",
                            g.duplicates, ", ".join(g.models))
        self._join()

    def _join(self) -> None:
        first, rest = self._groups[0], self._groups[1:]
        ids = [v for v in first.index if all(v in g.index for g in rest) and v not in self._skip_videos]
        self.join = {"groups": {"+".join(g.models): len(g.index) for g in self._groups}, "matched": len(ids)}
        if rest:
            msg = (f"joined {len(self._groups)} feature sets by video id: {len(ids)} matched "
                   f"({', '.join(f'{k}: {v}' for k, v in self.join['groups'].items())})")
            (log.warning if any(len(g.index) != len(ids) for g in self._groups) else log.info)(msg)
        if not ids:
            raise Incompatible(f"no video is present in every feature set of {self.dirs}")
        self.ids = np.array(ids, dtype=str)
        idx0 = np.fromiter((first.index[v] for v in ids), dtype=np.int64, count=len(ids))
        self.labels = np.asarray(first.labels, dtype=np.int64)[idx0]
        self._ptr: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # model -> (paths, shard, row)
        self._clip_gflops: dict[str, np.ndarray | None] = {}  # model -> clip_gflops(model), once read
        self.models: dict[str, ModelInfo] = {}
        for g in self._groups:
            idx = idx0 if g is first else np.fromiter((g.index[v] for v in ids), dtype=np.int64, count=len(ids))
            if g is not first:
                labels = np.asarray(g.labels, dtype=np.int64)[idx]
                bad = np.flatnonzero(labels != self.labels)
                if bad.size:
                    raise Incompatible(f"video {ids[bad[0]]!r}: label {labels[bad[0]]} in {g.paths[g.shard[idx[bad[0]]]]}, "
                                     f"{self.labels[bad[0]]} in {first.paths[first.shard[idx0[bad[0]]]]}")
                for j, (a, b) in enumerate(zip(idx0, idx)):
                    if not np.array_equal(first.clip_start[a], g.clip_start[b]):
                        raise Incompatible(f"video {ids[j]!r}: clip starts {first.clip_start[a].tolist()} in "
                                         f"{first.paths[first.shard[a]]} differ from {g.clip_start[b].tolist()} in "
                                         f"{g.paths[g.shard[b]]}")
            ptr = (np.array(g.paths, dtype=str), np.asarray(g.shard, dtype=np.int32)[idx],
                   np.asarray(g.row, dtype=np.int32)[idx])
            for m in g.models:
                self._ptr[m] = ptr
                self.models[m] = g.first.model(m)
        for g in self._groups:  # the per-id tables are only needed for the join
            g.index, g.clip_start = {}, []

    def __len__(self) -> int:
        return len(self.ids)

    def model(self, name: str) -> ModelInfo:
        try:
            return self.models[name]
        except KeyError:
            raise BadValue(f"model {name!r} is not in {self.dirs}; it holds {sorted(self.models)}") from None

    def clip_gflops(self, model: str) -> np.ndarray | None:
        """Each clip's GFLOPs through ``model``, (V, N) float32 in ``ids`` order, for a backbone whose
        cost depends on the clip (VA-RED²: the shards hold ``gflops/<model>``); None when no shard
        of the model holds them (every fixed-cost backbone, older shards: use the header's
        ``models[model].attrs["gflops_per_clip"]``, the same for every clip). A video whose shard
        lacks them reads NaN. Read from the shards on the first call, then kept."""
        import h5py

        self.model(model)  # BadValue naming an unknown model
        if model in self._clip_gflops:
            return self._clip_gflops[model]
        paths, shard, row = self._ptr[model]
        out = np.full((len(self), int(self.config["num_clips"])), np.nan, dtype=np.float32)
        found = False
        for k in np.unique(shard).tolist():
            try:
                with h5py.File(paths[k], "r") as f:
                    ds = f.get(schema.gflops_key(model))
                    if ds is None:
                        continue
                    sel = shard == k
                    out[sel] = np.asarray(ds[()], dtype=np.float32)[row[sel]]
                    found = True
            except OSError as err:
                raise BadFile(f"{paths[k]}: cannot read {schema.gflops_key(model)} ({err})") from None
        self._clip_gflops[model] = out if found else None
        return self._clip_gflops[model]

    def dataset(self, sources: dict[str, tuple[str, Sequence[int]]], indices: np.ndarray | None = None,
                max_open_files: int = MAX_OPEN_FILES) -> FeatureDataset:
        """A Dataset over ``indices`` (default all) yielding, per source, ``model``'s clips at ``positions``."""
        return FeatureDataset(self, sources, indices, max_open_files)


class FeatureDataset:
    """torch Dataset: item i -> {source: float16 tensor (n_source, T', H', W', C), "label", "index"}.

    ``sources``: source name -> (model, clip positions). Only those models and positions are read.
    The positions are either one ascending sequence for every item, or an (items, n) array with one
    ascending row per item of ``indices`` (per-video draws: ``--train-clips jitter``).
    ``index`` is the video's row in the FeatureSet (``fs.ids[index]``).
    """

    def __init__(self, fs: FeatureSet, sources: dict[str, tuple[str, Sequence[int]]],
                 indices: np.ndarray | None = None, max_open_files: int = MAX_OPEN_FILES):
        N = fs.config["num_clips"]
        self.indices = np.arange(len(fs), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(fs)):
            raise BadValue(f"indices out of range for {len(fs)} videos")
        self.labels = fs.labels[self.indices]
        self.ids = fs.ids[self.indices]
        self.sources: list[tuple[str, str, np.ndarray, tuple[int, ...]]] = []
        self._ptr = {}
        for src, (model, positions) in sources.items():
            info = fs.model(model)
            pos = np.asarray(positions if isinstance(positions, np.ndarray) else list(positions), dtype=np.int64)
            if pos.ndim == 2 and (len(pos) != len(self.indices) or (np.diff(pos, axis=1) <= 0).any()):
                raise BadValue(f"{src}: per-video clip positions must be one ascending row per video "
                               f"({len(self.indices)}), got shape {pos.shape}")
            if pos.ndim not in (1, 2):
                raise BadValue(f"{src}: clip positions must be a sequence or one row per video, got shape {pos.shape}")
            if pos.size and (pos.min() < 0 or pos.max() >= N):
                bad = pos.tolist() if pos.ndim == 1 else sorted(set(pos[(pos < 0) | (pos >= N)].tolist()))
                raise BadValue(f"{src}: clip positions {bad} outside the {N} extracted clips")
            if pos.size:
                self.sources.append((src, model, pos, info.shape))
                paths, shard, row = fs._ptr[model]
                self._ptr[model] = (paths, shard[self.indices], row[self.indices])
        # A compressed chunk (one video of one model) is decompressed whole: cache it so the other
        # positions of that video hit the cache. Uncompressed chunks larger than the cache are read
        # straight from the file, exactly the bytes of the requested positions.
        chunk = max((int(np.prod(shape)) * N * 2 for _, m, _, shape in self.sources if fs.models[m].compression),
                    default=0)
        self._rdcc = chunk + (1 << 20) if chunk else None
        # per source: read the span of its positions in one call when HDF5 reads whole chunks anyway
        # (compressed, or small enough for the default 1 MiB chunk cache)
        self._span = [bool(fs.models[m].compression) or int(np.prod(shape)) * N * 2 <= (1 << 20)
                      for _, m, _, shape in self.sources]
        self.max_open_files = min(max_open_files, 8) if chunk else max_open_files
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = OrderedDict(), None  # never ship open HDF5 handles to a worker
        return state

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()

    def _dataset(self, path: str, model: str) -> Any:
        """The open h5py Dataset of ``model`` in shard ``path`` (files opened lazily, per process, LRU)."""
        import h5py

        if self._pid != os.getpid():  # first use in this process (e.g. a forked DataLoader worker)
            self._files, self._pid = OrderedDict(), os.getpid()
        entry = self._files.get(path)
        if entry is None:
            try:
                f = h5py.File(path, "r", **({"rdcc_nbytes": self._rdcc} if self._rdcc else {}))
            except OSError as err:
                raise BadFile(f"{path}: cannot open shard ({err})") from None
            entry = self._files[path] = (f, {})
            if len(self._files) > self.max_open_files:
                self._files.popitem(last=False)[1][0].close()
        else:
            self._files.move_to_end(path)
        f, datasets = entry
        ds = datasets.get(model)
        if ds is None:  # looking a dataset up by name costs more than a small read: keep it
            ds = f[schema.features_key(model)]
            schema.require_filters(ds, f"{path}: features/{model}")  # zstd/lz4: import hdf5plugin here
            datasets[model] = ds
        return ds

    def read(self, i: int, src_index: int) -> np.ndarray:
        """Source ``src_index``'s clips of item i: (n, T', H', W', C) float16."""
        _, _, pos, shape = self.sources[src_index]
        out = np.empty((pos.shape[-1], *shape), dtype=np.float16)
        self.read_into(out, i, src_index)
        return out

    def read_into(self, out: np.ndarray, i: int, src_index: int) -> None:
        """Read source ``src_index``'s clips of item i into ``out`` (n, T', H', W', C) float16, C-contiguous."""
        src, model, pos, shape = self.sources[src_index]
        paths, shard, row = self._ptr[model]
        path, r = paths[shard[i]], int(row[i])
        if pos.ndim == 2:  # this video's own draw
            pos = pos[i]
        try:
            ds = self._dataset(path, model)
            p0, p1 = int(pos[0]), int(pos[-1]) + 1
            if p1 - p0 == len(pos):
                ds.read_direct(out, np.s_[r, p0:p1])  # contiguous positions: one read, no copy
            elif self._span[src_index]:
                out[...] = ds[r, p0:p1][pos - p0]  # the chunk is read whole anyway: one call, then select
            else:
                for k, p in enumerate(pos.tolist()):  # exactly the bytes of these positions
                    ds.read_direct(out, np.s_[r, p], np.s_[k])
        except (OSError, KeyError) as err:
            raise BadFile(f"{path}: cannot read features/{model} of row {r} ({err})") from None
        if not finite(out):
            raise BadFile(f"{nonfinite_message(path, str(self.ids[i]), model)}; `faster verify` lists what is "
                          f"damaged, --skip-bad leaves such videos out")

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item: dict[str, Any] = {src: torch.from_numpy(self.read(i, k)) for k, (src, *_) in enumerate(self.sources)}
        item["label"] = torch.tensor(int(self.labels[i]))
        item["index"] = torch.tensor(int(self.indices[i]))
        return item


class ThreadedLoader:
    """Batches of a FeatureDataset read by one background thread into a ring of reused buffers.

    The in-process alternative to DataLoader worker processes (``workers=0`` in fit): no process
    start-up, no copy into shared memory and no page faults on fresh buffers, which on a small CPU
    cost more than the read itself (BENCHMARKS.md "Fit"). HDF5 reads are serialised by h5py anyway,
    so one reader thread is as fast as several; it overlaps with the consumer's torch compute.

    Each batch is {source: float16 (b, n, T', H', W', C), "label": (b,), "index": (b,)}, views into
    a ring buffer: valid until the next batch is requested (copy or move them to the device first).
    The buffers hold min(batch_size, videos) videos: an absurd batch size costs no memory.
    ``pin``: page-locked buffers for fast host-to-GPU copies; the ring waits for the current CUDA
    stream before reusing one.
    """

    def __init__(self, ds: FeatureDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 prefetch: int = 2, pin: bool = False):
        if batch_size < 1 or prefetch < 1:
            raise BadValue(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
        self.ds, self.batch_size, self.shuffle, self.prefetch, self.pin = ds, batch_size, shuffle, prefetch, pin
        self._rng = np.random.default_rng(seed)
        self._buffers: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch_size)

    def _ring(self) -> list[dict[str, Any]]:
        import torch

        if self._buffers is None:
            B = max(1, min(self.batch_size, len(self.ds)))  # a batch never holds more than the set's videos
            self._buffers = [{src: torch.empty((B, pos.shape[-1], *shape), dtype=torch.float16, pin_memory=self.pin)
                              for src, _, pos, shape in self.ds.sources} | {
                              "label": torch.empty(B, dtype=torch.int64), "index": torch.empty(B, dtype=torch.int64)}
                             for _ in range(self.prefetch + 1)]
        return self._buffers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import queue
        import threading

        import torch

        order = self._rng.permutation(len(self.ds)) if self.shuffle else np.arange(len(self.ds))
        ring = self._ring()
        free: queue.Queue = queue.Queue()
        for slot in range(len(ring)):
            free.put(slot)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def reader() -> None:
            try:
                for start in range(0, len(order), self.batch_size):
                    slot = free.get()
                    if stop.is_set():
                        return
                    idx = order[start:start + self.batch_size]
                    buf = ring[slot]
                    for b, i in enumerate(idx.tolist()):
                        for k, (src, *_) in enumerate(self.ds.sources):
                            self.ds.read_into(buf[src][b].numpy(), i, k)
                    buf["label"][:len(idx)] = torch.from_numpy(self.ds.labels[idx])
                    buf["index"][:len(idx)] = torch.from_numpy(self.ds.indices[idx])
                    ready.put((slot, len(idx)))
            except BaseException as err:  # hand the error to the consumer
                ready.put(err)
            ready.put(None)

        thread = threading.Thread(target=reader, name="faster-feature-reader", daemon=True)
        thread.start()
        previous = None
        try:
            while (got := ready.get()) is not None:
                if isinstance(got, BaseException):
                    raise got
                if previous is not None:
                    self._release(free, previous)
                slot, n = got
                previous = slot
                yield {key: t[:n] for key, t in ring[slot].items()}
        finally:
            stop.set()
            if previous is not None:
                self._release(free, previous)
            for _ in range(len(ring)):
                free.put(0)  # unblock a reader waiting for a slot
            thread.join()

    def _release(self, free: Any, slot: int) -> None:
        if self.pin:
            import torch

            torch.cuda.current_stream().synchronize()  # pending host-to-device copies from this slot
        free.put(slot)
