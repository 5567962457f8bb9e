"""`faster pack`: store clip features that another tool computed as a feature set (docs/pack.md).

Many collections already have clip features: video_features writes one ``<stem>_<feature>.npy``
per video holding (clips, C), mmaction2 and VMZ dump per-video arrays, Ego4D ships one tensor per
video. Packing them into the store's shards (docs/format.md) lets `fit`, `evaluate` and `ablate`
use them at once. Everything goes through the store's public ``FeatureSetWriter``, so a packed set
has the same files, resume and failure list as an extraction.

* One ``*.npy`` under SRC is one video; its id is its path relative to SRC without ``.npy`` and
  without ``strip_suffix``. Labels come from the class folders or an annotation CSV, found by
  extraction's discovery (faster.extract.video.discover, given the files instead of a scan).
* (N, C) arrays are stored as (N, 1, 1, 1, C), (N, T', H', W', C) maps as they are, and
  (N, C, T', H', W') ones with ``channels_first``; float16 as always. The first good file fixes N
  and the per-clip shape (on resume, the shards already written do).
* What is not known is recorded as -1: clip starts, num_frames, fps, and the header's frame_stride
  and size (docs/format.md "Packed feature sets"); the provenance is ``packed:<SRC>``.
* A file that cannot be used (not a .npy array, unreadable, wrong rank or dtype, NaN/inf, values
  beyond float16, another N or shape, a link leaving SRC) is recorded with failure stage ``pack``
  and its reason, and skipped. Files are read with ``allow_pickle=False``: nothing they hold runs.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faster.errors import BadFile, BadValue
from faster.progress import Progress

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

PACKED_PREFIX = "packed:"  # ModelHeader.weights of packed features: "packed:<absolute SRC>"
PACKED_LAYER = "packed"  # ModelHeader.layer: the tool's layer is not known
UNKNOWN = -1  # clip starts, num_frames, fps, frame_stride and size that a packed set does not know
STAGE = "pack"  # the failure stage of a file that could not be packed
NPY_MAGIC = b"\x93NUMPY"
FLOAT16_MAX = 65504.0
READ_AHEAD_BYTES = 64 * 2**20  # float16 values read ahead of the video being written (at least 4 files): enough to
# keep reading while a shard is flushed, hashed and synced (a few files' worth of read-ahead idles meanwhile)
READ_THREADS = 2  # reading threads: the disk's queue holds two reads, and the float16 casts run beside the writes
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class PackConfig:
    """One packing run. The same configuration again resumes: only what is missing is packed."""

    src: str  # directory of .npy files, one per video; ids are paths relative to it
    out: str  # the feature-set directory
    model: str  # name the features are stored under (/features/<model>): what fit's --expensive/--cheap name
    clip_len: int  # L, frames per clip of the tool that computed the features (recorded, not used)
    gflops_per_clip: float | None = None  # that tool's backbone cost per clip; None: 0, with a warning
    strip_suffix: str = ""  # removed from the end of each name (before .npy): "_i3d"; other files are ignored
    annotations: str | None = None  # CSV with a path (= id) and a label column, or Kinetics' columns
    classes_file: str | None = None  # one class per line: fixes the class indices
    shard_size: int = 64  # videos per shard
    channels_first: bool = False  # 5-d arrays are (N, C, T', H', W') instead of (N, T', H', W', C)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if not _MODEL_NAME.match(self.model or ""):
            raise BadValue(f"model name {self.model!r}: expected letters, digits and _.+- (it names an HDF5 dataset)")
        if int(self.clip_len) < 1:
            raise BadValue(f"clip_len must be >= 1, got {self.clip_len}")
        if int(self.shard_size) < 1:
            raise BadValue(f"shard_size must be >= 1, got {self.shard_size}")
        g = self.gflops_per_clip
        if g is not None and not (math.isfinite(g) and g >= 0):
            raise BadValue(f"gflops_per_clip must be a finite number >= 0, got {g}")
        if "/" in self.strip_suffix or "\\" in self.strip_suffix:
            raise BadValue(f"strip_suffix {self.strip_suffix!r} contains a path separator; "
                           "it is the end of a file name")
        if self.strip_suffix.endswith(".npy"):
            raise BadValue(f"strip_suffix {self.strip_suffix!r}: give the text before .npy, e.g. "
                           f"{self.strip_suffix[:-4]!r}")


# ----------------------------------------------------------------------------------------------
# finding and reading the files


@dataclass
class Found:
    """The .npy files under SRC: id -> resolved file, files refused (id -> reason), files ignored."""

    files: dict[str, Path]
    refused: dict[str, str]
    ignored: int  # .npy files without the strip suffix
    notes: list[str]


def find_files(src: str | Path, strip_suffix: str = "") -> Found:
    """Every ``*.npy`` under ``src`` by id (hidden entries skipped; each real folder and file once,
    faster.extract.video.walk). Links are followed only while they resolve inside ``src``: a file
    that leaves it is refused, a folder that leaves it skipped. A name that is not valid UTF-8 and a
    file that is not a regular file are refused, with their reason."""
    from faster.extract.video import walk

    root = Path(src).resolve()
    tree = walk(root, lambda name: name.endswith(".npy"), inside=True, label="SRC")
    files: dict[str, Path] = {}
    refused: dict[str, str] = {}
    notes = list(tree.notes)
    ignored = 0

    def video_id(rel: str) -> str | None:
        """The id of the file at ``rel``; None when it lacks the suffix (ignored)."""
        vid = rel[: -len(".npy")] if rel.endswith(".npy") else rel
        if strip_suffix:
            if not vid.endswith(strip_suffix):
                return None
            vid = vid[: -len(strip_suffix)]
        return vid

    for rel, why in tree.refused.items():
        vid = video_id(rel)
        if vid is None:
            ignored += 1
        else:
            refused[vid or rel] = why
    for rel, path in tree.files.items():
        vid = video_id(rel)
        if vid is None:
            ignored += 1
        elif not vid or vid.endswith("/"):
            refused[rel] = f"{rel}: nothing is left of the name without {strip_suffix!r}"
        else:
            files[vid] = path  # under SRC as found (its target was checked by walk)
    if ignored:
        notes.append(f"{ignored} .npy files do not end with {strip_suffix!r} and are ignored")
    return Found(files, refused, ignored, notes)


@dataclass
class _Npy:
    """A checked .npy header: the stored shape, order and dtype, where the data starts, and the shape
    as packed ((N, T', H', W', C))."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int
    packed: tuple[int, ...]


def _read_header(fh: Any, channels_first: bool) -> _Npy:
    """The header of the open .npy file ``fh``, checked before any data is read (a file claiming a huge
    shape costs nothing): the NUMPY magic, a 1.0/2.0 header parsed without unpickling anything
    (``allow_pickle=False``'s guarantee), real numbers, enough bytes, rank 2 or 5, not empty."""
    import numpy as np

    magic = fh.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise BadFile("not a .npy array (no NUMPY magic at its start)")
    fh.seek(0)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
        else:  # 3.0: only for structured dtypes with non-latin-1 field names, refused anyway
            raise ValueError(f"format version {version[0]}.{version[1]}")
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        offset = fh.tell()
        count = math.prod(shape)
        size = os.fstat(fh.fileno()).st_size
        if size < offset + count * dtype.itemsize:
            raise ValueError(f"the file holds {size - offset} bytes of data, its header says {count * dtype.itemsize}")
    except Exception as err:  # numpy raises ValueError, OSError, EOFError, SyntaxError...: all mean "cannot be read"
        raise BadFile(f"not a readable .npy array ({type(err).__name__}: {err})") from None
    if dtype.kind not in "iuf":
        raise BadFile(f"dtype {dtype}; expected real numbers (float or int)")
    if len(shape) == 2:
        packed = (shape[0], 1, 1, 1, shape[1])  # (N, C) -> (N, 1, 1, 1, C)
    elif len(shape) == 5:
        packed = (shape[0], *shape[2:], shape[1]) if channels_first else tuple(shape)  # (N, T', H', W', C)
    else:
        layout = "(N, C, T', H', W')" if channels_first else "(N, T', H', W', C)"
        raise BadFile(f"shape {tuple(shape)} has rank {len(shape)}; expected (N, C) or {layout}")
    if 0 in packed:
        raise BadFile(f"shape {tuple(packed)} is empty")
    return _Npy(tuple(shape), bool(fortran_order), dtype, offset, packed)


def _as_packed(x: np.ndarray, channels_first: bool) -> np.ndarray:
    """A stored array as (N, T', H', W', C): a view, no copy."""
    if x.ndim == 2:
        return x.reshape(x.shape[0], 1, 1, 1, x.shape[1])  # (N, C) -> (N, 1, 1, 1, C)
    if channels_first:
        return x.transpose(0, 2, 3, 4, 1)  # (N, C, T', H', W') -> (N, T', H', W', C)
    return x


def _open(path: Path) -> Any:
    try:
        return open(path, "rb")
    except OSError as err:
        raise BadFile(f"unreadable: {err.strerror or err}") from None


def _check_values(a: np.ndarray) -> None:
    """BadFile for NaN/inf or values beyond float16, from the array's extremes (two vectorised passes;
    float16 rounding is monotonic, so the extremes overflow exactly when any value does)."""
    import numpy as np

    lo, hi = a.min(), a.max()  # NaN propagates
    if a.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadFile(f"{int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} inf values")
    with np.errstate(over="ignore"):
        if not (np.isfinite(np.float16(lo)) and np.isfinite(np.float16(hi))):
            raise BadFile(f"values up to {float(np.abs(a).max()):.6g} overflow float16 (largest {FLOAT16_MAX:g})")


def read_file(path: str | Path, channels_first: bool = False,
              expect: tuple[int, tuple[int, ...], str] | None = None) -> np.ndarray:
    """One file's checked values, (N, T', H', W', C) in the file's dtype, BadFile with the reason when
    it cannot be packed: the header checked (``_read_header``), then one read call into one array (no
    memory map), then NaN/inf and float16 range checked. ``expect``: (N, per-clip shape, where they
    come from), checked before any data is read."""
    import numpy as np

    path = Path(path)
    with _open(path) as fh:
        h = _read_header(fh, channels_first)
        if expect is not None:
            _check_shape(h.packed, *expect)
        a = np.empty(h.shape, dtype=h.dtype, order="F" if h.fortran_order else "C")
        try:
            got = fh.readinto(memoryview(a.reshape(-1, order="A")).cast("B"))
        except (OSError, ValueError) as err:
            raise BadFile(f"unreadable data ({type(err).__name__}: {err})") from None
        if got != a.nbytes:
            raise BadFile(f"unreadable data: {got} of {a.nbytes} bytes")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    a = _as_packed(a, channels_first)
    _check_values(a)
    return a


def _check_shape(packed: tuple[int, ...], num_clips: int, shape: tuple[int, ...], fixed_by: str) -> None:
    if packed[0] != num_clips:
        raise BadFile(f"{packed[0]} clips; the others have {num_clips} (fixed by {fixed_by})")
    if tuple(packed[1:]) != tuple(shape):
        raise BadFile(f"clips of shape {tuple(packed[1:])} (T', H', W', C); the others have {tuple(shape)} "
                      f"(fixed by {fixed_by})")


def _read_ahead(fetch: Any, items: list[Any], ahead: int) -> Iterator[tuple[Any, Any]]:
    """(item, future of ``fetch(item)``) in order, with up to ``ahead`` items read by READ_THREADS
    background threads beyond the one being written: reading a file, numpy's checks and the float16
    cast (all without the GIL) overlap the shard writes, hashes and syncs of the ones before, where a
    plain loop waits for each in turn. Memory: ``ahead`` files."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="pack-read") as pool:
        queue: deque = deque()
        rest = iter(items)
        try:
            for it in rest:
                queue.append((it, pool.submit(fetch, it)))
                if len(queue) > ahead:
                    yield queue.popleft()
            while queue:
                yield queue.popleft()
        finally:
            for _, future in queue:  # an error while writing: read nothing more
                future.cancel()


def _existing(out: Path, model: str) -> tuple[int, tuple[int, ...], str] | None:
    """(N, per-clip shape, where they come from) of the shards already in ``out`` (a resume); None: no shards."""
    from faster.store import schema
    from faster.store.header import read_header

    if not out.is_dir():
        return None
    for path in sorted(out.glob(schema.SHARD_GLOB)):
        if schema.parse_shard_name(path.name):
            sh = read_header(path)
            if model in sh.models:
                return sh.header.num_clips, sh.models[model].shape, f"the shards already in {out}"
            return None  # another model: the writer refuses the directory, naming the difference
    return None


# ----------------------------------------------------------------------------------------------
# the run


def run_pack(cfg: PackConfig) -> dict[str, Any]:
    """Pack ``cfg.src`` into ``cfg.out``; return the run's summary (packed, skipped, failed, seconds, ...).

    Raises BadFile when SRC is not a directory or holds no usable file, Incompatible (from the
    writer) when ``out`` holds a feature set of another configuration.
    """
    import numpy as np

    import faster
    from faster.extract.video import discover
    from faster.store.header import Header, ModelHeader
    from faster.store.writer import FeatureSetWriter

    t0 = time.monotonic()
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise BadFile(f"SRC {str(src)!r} is not a directory")
    found = find_files(src, cfg.strip_suffix)
    for note in found.notes:
        log.warning("%s", note)
    if not found.files:
        raise BadFile(f"no .npy files in {str(src)!r}" + (f" ending with {cfg.strip_suffix!r}" if cfg.strip_suffix
                                                            else "") + (f" ({len(found.refused)} refused)"
                                                                        if found.refused else ""))
    disc = discover(src, cfg.annotations, cfg.classes_file, files=found.files)
    for note in disc.notes:
        log.warning("%s", note)
    items = [it for it in disc.items if it.path is not None]
    missing = [it for it in disc.items if it.path is None]

    # N and the per-clip shape: from the shards already written, else from the first good file.
    probed: dict[str, np.ndarray | str] = {}
    ref = _existing(out, cfg.model)
    if ref is None:
        for it in items:
            try:
                x = read_file(it.path, cfg.channels_first)
            except BadFile as err:
                probed[it.id] = str(err)
                continue
            probed[it.id] = x
            ref = (x.shape[0], tuple(x.shape[1:]), it.path.relative_to(src.resolve()).as_posix())
            break
        else:
            shown = "; ".join(f"{k}: {v}" for k, v in list(probed.items())[:3])
            raise BadFile(f"none of the {len(items)} .npy files in {str(src)!r} can be packed ({shown})")
    num_clips, shape, fixed_by = ref

    if cfg.gflops_per_clip is None:
        log.warning("no --gflops-per-clip given: recorded as 0, so the GFLOPs that fit, evaluate and ablate "
                    "report leave the backbone out")
    model = ModelHeader(gflops_per_clip=float(cfg.gflops_per_clip or 0.0), layer=PACKED_LAYER,
                        weights=f"{PACKED_PREFIX}{src.resolve()}", mean=[0.0] * 3, std=[1.0] * 3,
                        compute_dtype="unknown")
    header = Header(clip_len=int(cfg.clip_len), num_clips=int(num_clips), frame_stride=UNKNOWN, size=UNKNOWN,
                    classes=disc.classes, models={cfg.model: model}, software_version=faster.__version__,
                    torch_version="unknown")
    writer = FeatureSetWriter(out, header, shard_size=cfg.shard_size)
    packed_bytes = 0
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with writer:
        done = writer.done
        todo = [it for it in items if it.id not in done]
        skipped = len(items) - len(todo)
        for video_id, why in found.refused.items():
            writer.fail(video_id, STAGE, why)
        for it in missing:
            writer.fail(it.id, "missing", it.error or "not found")
        t1 = time.monotonic()
        bar = Progress(len(todo), "pack", unit="video", enabled=cfg.progress)

        def fetch(it: Any) -> np.ndarray:
            """One video's checked values as float16 (BadFile otherwise): the probe's, or read now."""
            x = probed.pop(it.id, None)
            if isinstance(x, str):
                raise BadFile(x)
            if x is None:
                x = read_file(it.path, cfg.channels_first, (num_clips, shape, fixed_by))
            else:
                _check_shape(x.shape, num_clips, shape, fixed_by)
            return x.astype(np.float16)  # here, on the reading threads (numpy casts without the GIL)

        try:
            ahead = max(4, READ_AHEAD_BYTES // max(1, 2 * num_clips * math.prod(shape)))
            for it, future in _read_ahead(fetch, todo, ahead):
                try:
                    x = future.result()
                except BadFile as err:
                    rel = it.path.relative_to(src.resolve()).as_posix()
                    log.warning("%s: not packed: %s", rel, err)
                    writer.fail(it.id, STAGE, str(err), file=rel)
                else:
                    writer.add(id=it.id, label=it.label, num_frames=UNKNOWN, fps=float(UNKNOWN),
                               clip_start=[UNKNOWN] * num_clips, features={cfg.model: x}, split=it.split)
                    packed_bytes += it.path.stat().st_size
                bar.update(1)
        finally:
            bar.close()
        seconds = time.monotonic() - t1
        writer.finish(started=started, seconds=round(seconds, 3), packed=writer.added, failed=writer.failed,
                      skipped=skipped, src=str(src.resolve()), tool="faster pack")
    mib = packed_bytes / 2**20
    return {"packed": writer.added, "skipped": skipped, "failed": writer.failed, "missing": len(missing),
            "refused": len(found.refused), "ignored": found.ignored, "videos": len(disc.items),
            "num_clips": int(num_clips), "feature_shape": [int(s) for s in shape], "classes": len(disc.classes),
            "layout": disc.layout, "mib": round(mib, 3), "run_seconds": round(seconds, 3),
            "mib_per_s": round(mib / seconds, 3) if seconds > 0 else 0.0,
            "seconds": round(time.monotonic() - t0, 3), "shards_written": writer.shards_written,
            "out": str(out), "failures_file": str(writer.failures.path), "merged": writer.merged is not None,
            "config": asdict(cfg)}
