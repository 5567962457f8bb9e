"""`faster extract`: decode each video once, run every backbone over its clips, write HDF5 shards.

The paper's first stage (Sec. "Experimental Setups"): N clips of L frames uniformly covering each
video (N x L = 256 by default), each passed through the clip-level backbones whose res5 maps the
aggregators of the second stage consume (Eq. 1-6). Here the maps are computed once and cached
(docs/format.md) so any expensive:cheap pattern can be composed later.

One process of an extraction (README "faster extract"):

  decoders.DecodePool --uint8 frames--> extraction loop --> runner.BackboneRunner --> store FeatureSetWriter
  worker processes, killed on timeout   batches clips         normalise, bf16, fp16,     shards, manifest
                                        across videos         (N, T', H', W', C)

This module holds the extraction loop: the configuration (and its one faster.sampling.Sampling,
handed to the decoders), the work list (which videos this part still has to extract, whether the
disk has room), batching clips across videos so every model sees every clip of one decode, and
the clean stop on SIGINT/SIGTERM (the open shard is completed, the rest is left to a resume).
The maps go from the runner to the writer channels-last, as stored. Placement, devices and
--dtype come from faster.runtime; everything about the feature set's files (resume,
configuration refusal, shard rollover, manifests, failures) from the store's FeatureSetWriter.
"""
from __future__ import annotations

import logging
import queue
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue
from faster.extract import video
from faster.extract.decoders import Decoded, DecodePool, Failed, InlineDecoder
from faster.runtime import check_dtype, warn_once
from faster.sampling import Sampling, clip_grid, grid_frames
from faster.store import schema

log = logging.getLogger(__name__)

FRAMES_PER_VIDEO = 256  # the paper's N x L
BF16_TOLERANCE = 0.05  # relative L2 error of bf16 res5 maps against fp32 above which an extraction refuses bf16
# Stored bytes / float16 bytes of res5 maps per --compression, for the disk estimate: what
# benchmarks/storage.py measured on random-init R2D-26 maps (37% zeros; docs/storage.md), rounded
# up: trained maps have more zeros and compress better, so the estimate errs on the safe side.
COMPRESSED_FRACTION = {"none": 1.0, "lzf": 0.9, "gzip": 0.7, "zstd": 0.65, "lz4": 0.92}

@dataclass
class ExtractConfig:
    """One extraction. Fields that define the features (clip_len, num_clips, size, frame_stride,
    models and their weights) must match those of the shards already in ``out``.

    ``sampling`` (made once, when constructed): the clips every video is decoded to, at
    ``decode_size``; the decoders take it as it is. Models at their own clip length and stride
    (``clip_lens``, ``frame_strides``) share one decode: ``sampling`` is then the grid every model's
    frames are taken from (faster.sampling.clip_grid; ``frames(name)`` says which), and each model's
    clip covers the same span from the same start."""

    video_root: str  # directory of videos; ids are paths relative to it
    out: str  # the feature-set directory
    models: tuple[str, ...]  # backbone names (faster.extract.models.names())
    weights: dict[str, str] = field(default_factory=dict)  # model name -> weights file; random init without
    clip_len: int = 8  # L, frames per clip
    clip_lens: dict[str, int] = field(default_factory=dict)  # model name -> its own L (--clip-len NAME=L); else clip_len
    num_clips: int | None = None  # N, clips per video; None -> 256 // clip_len
    size: int = 224  # crop size in pixels (short side resized to size * 8/7 first)
    sizes: dict[str, int] = field(default_factory=dict)  # model name -> its own crop (bLVNet's big-little); else size
    frame_stride: int = 1  # frame step inside a clip
    frame_strides: dict[str, int] = field(default_factory=dict)  # model name -> its own stride; else frame_stride
    batch_size: int = 8  # clips per forward pass (halved on CUDA out-of-memory)
    workers: int = 2  # decoding processes; 0 decodes in the main process (no timeout)
    device: str = "auto"  # auto, cpu, cuda or cuda:N (auto: cuda:LOCAL_RANK when CUDA is available)
    annotations: str | None = None  # CSV: path,label or Kinetics' label,youtube_id,time_start,time_end,split
    classes_file: str | None = None  # one class per line: fixes the class indices
    unlabelled: bool = False  # ignore folder names: every label -1
    shard_size: int = 64  # videos per shard
    num_shards: int = 1  # Slurm array size
    shard_index: int = 0  # Slurm array index
    compression: str = "none"  # none, lzf, gzip, zstd or lz4 (zstd and lz4 through hdf5plugin; docs/storage.md)
    spatial_pool: bool = False  # store each map averaged over H' x W' as (N, T', 1, 1, C): pooled aggregators only
    decoder: str = "auto"  # auto (video.auto_order), decord or pyav
    timeout: float = 300.0  # seconds a video may take to decode before its worker is killed
    seed: int = 0  # seed of random initialisation of backbones without weights
    progress: bool = True  # tqdm progress bar
    recycle_every: int = 200  # videos per decode worker before it is replaced (decord leaks a little)
    wait: bool = False  # another process writes this part (store.lock): wait for it instead of refusing
    allow_empty: bool = False  # no video found is not an error (an empty feature set is written)
    dtype: str = "auto"  # auto (bf16 where the device has native bf16, or the directory's recorded dtype), fp32, bf16

    def model_size(self, name: str) -> int:
        """The crop ``name`` sees: its --size NAME=PX, else --size."""
        return int(self.sizes.get(name, self.size))

    def model_clip_len(self, name: str) -> int:
        """The frames of ``name``'s clip: its --clip-len NAME=L, else --clip-len."""
        return int(self.clip_lens.get(name, self.clip_len))

    def model_frame_stride(self, name: str) -> int:
        """The stride of ``name``'s clip: its --frame-stride NAME=S, else --frame-stride."""
        return int(self.frame_strides.get(name, self.frame_stride))

    def frames(self, name: str) -> tuple[int, ...]:
        """The frames of each decoded clip (``sampling``, the grid) that ``name`` takes."""
        return grid_frames(self.model_clip_len(name), self.model_frame_stride(name), self.sampling.frame_stride)

    @property
    def decode_size(self) -> int:
        """The crop the videos are decoded at: the largest model's; smaller ones are resized from it
        on the device (extract.runner), so one decode feeds every model."""
        return max(self.model_size(m) for m in self.models)

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise BadValue("no --model given")
        dup = sorted({m for m in self.models if self.models.count(m) > 1})
        if dup:
            raise BadValue(f"--model {dup[0]!r} given twice")
        unknown = sorted(set(self.weights) - set(self.models))
        if unknown:
            raise BadValue(f"--weights for {unknown[0]!r}, which is not a --model ({', '.join(self.models)})")
        for option, values in (("--clip-len", self.clip_lens), ("--frame-stride", self.frame_strides)):
            for name, value in values.items():
                if name not in self.models:
                    raise BadValue(f"{option} {name}={value}: {name!r} is not a --model ({', '.join(self.models)})")
        self.clip_lens = {str(k): int(v) for k, v in self.clip_lens.items()}
        self.frame_strides = {str(k): int(v) for k, v in self.frame_strides.items()}
        if self.clip_lens or self.frame_strides:  # models at their own sampling: one span, one decoding grid
            grid_len, grid_stride = clip_grid({m: (self.model_clip_len(m), self.model_frame_stride(m))
                                               for m in self.models})
        else:
            grid_len, grid_stride = self.clip_len, self.frame_stride
        if self.num_clips is None:
            self.num_clips = max(1, FRAMES_PER_VIDEO // max(1, grid_len))  # a bad clip_len: Sampling says so
        for name in ("size", "batch_size", "shard_size", "num_shards"):  # clip_len, num_clips, ...: Sampling
            if int(getattr(self, name)) < 1:
                raise BadValue(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise BadValue(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.shard_index < self.num_shards:
            raise BadValue(f"shard_index {self.shard_index} is not in [0, num_shards={self.num_shards})")
        if self.compression not in schema.COMPRESSIONS:
            raise BadValue(f"unknown compression {self.compression!r}; expected one of {schema.COMPRESSIONS}")
        self.sizes = {str(k): int(v) for k, v in self.sizes.items()}
        for name, px in self.sizes.items():
            if name not in self.models:
                raise BadValue(f"--size {name}={px}: {name!r} is not a --model ({', '.join(self.models)})")
            if px < 8:
                raise BadValue(f"--size {name}={px}: must be >= 8 pixels")
        check_dtype(self.dtype)
        video.check_decoder(self.decoder)
        if not self.timeout > 0:
            raise BadValue(f"timeout must be > 0 seconds, got {self.timeout}")
        self.sampling = Sampling(clip_len=grid_len, num_clips=self.num_clips, frame_stride=grid_stride,
                                 size=self.decode_size)



# ----------------------------------------------------------------------------------------------
# Models

class ClipModels:
    """The extraction's backbones. Constructing describes them without reading weights or building a network
    (their provenance for the header and the resume check: an extraction with nothing left to do
    never builds one); ``load()`` builds them for real, checks they are what was described, counts
    their cost, and, when they run in bf16, checks bf16 against fp32 on a clip of the extraction's shape."""

    def __init__(self, cfg: ExtractConfig, device: Any, compute_dtype: str):
        import torch

        from faster.extract import models as registry
        from faster.store.header import ModelHeader

        self.cfg, self.device = cfg, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.spatial_pool = bool(cfg.spatial_pool)
        self.compute_dtype = compute_dtype
        self.runner = None
        self.last_gflops: dict[str, Any] = {}  # per clip-dependent model, the last call's (b,) GFLOPs per clip
        self.headers = {}
        for name in cfg.models:
            d = registry.describe(name, weights=cfg.weights.get(name), seed=cfg.seed)
            self.headers[name] = ModelHeader(layer=d["layer"], weights=d["weights"], mean=d["mean"], std=d["std"],
                                             compute_dtype=compute_dtype, size=cfg.model_size(name),
                                             spatial_pool=1 if self.spatial_pool else None,
                                             clip_len=cfg.model_clip_len(name),
                                             frame_stride=cfg.model_frame_stride(name))

    @property
    def shapes(self) -> dict[str, tuple[int, int, int, int]]:
        """Per model, one clip's stored map (T', H', W', C) (counted once on meta tensors, then cached)."""
        from faster.extract import models as registry

        out = {}
        for name in self.cfg.models:
            C, T, H, W = registry.feature_shape(name, self.cfg.model_clip_len(name), self.cfg.model_size(name))
            out[name] = (T, 1, 1, C) if self.spatial_pool else (T, H, W, C)  # per clip, channels last
        return out

    def load(self) -> None:
        import torch

        from faster.extract import models as registry
        from faster.extract.runner import BackboneRunner

        if self.runner is not None:
            return
        cfg, built = self.cfg, {}
        for name in cfg.models:
            model = registry.build(name, weights=cfg.weights.get(name), seed=cfg.seed)
            described = self.headers[name]
            if str(model.weights) != described.weights:
                raise BadFile(f"{name}: the weights changed while starting ({described.weights} -> {model.weights})")
            built[name] = model
            described.gflops_per_clip = float(registry.clip_gflops(name, cfg.model_clip_len(name), cfg.model_size(name)))
        grid = cfg.sampling.clip_len
        self.runner = BackboneRunner(built, self.device, batch_size=cfg.batch_size, clip_len=grid,
                                     amp=self.compute_dtype == "bfloat16", sizes={m: cfg.model_size(m) for m in built},
                                     pooled=set(built) if self.spatial_pool else set(),
                                     frames={m: cfg.frames(m) for m in built})
        if self.runner.amp:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                clip = torch.randint(0, 256, (1, grid, cfg.decode_size, cfg.decode_size, 3),
                                     dtype=torch.uint8)
            for name, err in self.runner.check_bf16(clip).items():
                if err > BF16_TOLERANCE:
                    raise BadValue(f"{name} in bf16 differs from fp32 by {100 * err:.1f}% on a {cfg.model_clip_len(name)}-frame "
                                   f"clip at {cfg.model_size(name)} px (torch {torch.__version__}, cuDNN "
                                   f"{torch.backends.cudnn.version()}): some versions compute bf16 conv3d wrongly; "
                                   f"run with --dtype fp32")
                log.info("%s: bf16 vs fp32 relative error %.2f%%", name, 100 * err)

    @property
    def names(self) -> list[str]:
        return list(self.cfg.models)

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size if self.runner is not None else self.cfg.batch_size

    def bytes_per_video(self, num_clips: int, compression: str = "none") -> int:
        """Stored bytes of one video's features: float16, times the codec's expected fraction."""
        raw = sum(num_clips * int(np.prod(s)) * 2 for s in self.shapes.values())
        return int(raw * COMPRESSED_FRACTION.get(compression, 1.0))

    def __call__(self, clips) -> dict[str, Any]:
        """(b, L, S, S, 3) uint8 on the device -> per model (b, T', H', W', C) float16 on the CPU, as
        the runner returns them and the shards store them (H' = W' = 1 with --spatial-pool). The
        per-clip GFLOPs of the models whose cost depends on the clip are left in ``last_gflops``."""
        out = {name: self.runner(name, clips).cpu() for name in self.names}
        self.last_gflops = {name: self.runner.last_gflops[name] for name in self.runner.clip_dependent}
        return out


@dataclass
class _Pending:
    """A decoded video whose clips are going through the models."""

    decoded: Decoded
    frames: Any  # on the device
    done: int = 0
    outputs: dict[str, list] = field(default_factory=dict)
    gflops: dict[str, list] = field(default_factory=dict)  # per clip-dependent model: each batch's (b,) GFLOPs


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"




class _StopFlag:
    """SIGINT/SIGTERM set the flag (the extraction closes its shard and stops); a second signal acts as usual."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        from faster import runtime

        self.signal = signal.Signals(signum).name
        runtime.received_signals.append(self.signal)
        log.warning("%s received: closing the current shard and stopping (again to abort)", self.signal)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)




# ----------------------------------------------------------------------------------------------
# The extraction

def extract_videos(cfg: ExtractConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extract the features of ``cfg.video_root`` into ``cfg.out``; return the extraction's summary.

    ``echo`` receives the user-facing lines (the work list with its size estimate); logging otherwise.
    Raises a faster.errors.UserError for a bad configuration, a configuration that differs from the
    shards in ``out``, or a disk without room for the estimated output.
    """
    import torch

    import faster
    from faster.runtime import cpu_threads, placement, resolve_device
    from faster.store.header import Header
    from faster.store.writer import FeatureSetWriter

    say = echo or log.info
    t0 = time.monotonic()
    place = placement(cfg.num_shards, cfg.shard_index)
    device = resolve_device(cfg.device, place.local_rank)
    found = video.discover(cfg.video_root, cfg.annotations, cfg.classes_file, cfg.unlabelled)
    for note in found.notes:
        log.warning("%s", note)
    if not found.items and not cfg.allow_empty:
        raise BadFile(f"no videos in {cfg.video_root}" + (f" or {cfg.annotations}" if cfg.annotations else "")
                      + f" (looked for {', '.join(sorted(video.VIDEO_EXTENSIONS))}"
                      + (f"; {found.ignored} other file{'s' if found.ignored != 1 else ''} ignored"
                         if found.ignored else "")
                      + "); pass --allow-empty to write an empty feature set anyway")
    out = Path(cfg.out)

    old_threads = torch.get_num_threads()
    old_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.workers, place.local_world_size))
    else:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    pool = None  # the decode workers, started before the backbones are built so the two overlap
    try:
        models = ClipModels(cfg, device, _compute_dtype(cfg, device, out))
        sampling = cfg.sampling
        header = Header(clip_len=sampling.clip_len, num_clips=sampling.num_clips, frame_stride=sampling.frame_stride,
                        size=sampling.size, classes=found.classes, models=models.headers,
                        software_version=faster.__version__, torch_version=str(torch.__version__))
        writer = FeatureSetWriter(out, header, part=place.part, num_parts=place.num_parts, shard_size=cfg.shard_size,
                                  compression=cfg.compression, wait=cfg.wait)
        mine = found.items[place.part::place.num_parts]
        work = _worklist(mine, writer.done)
        if work.todo:  # nothing to do: no decode process, no backbone built or counted
            pool = _open_pool(cfg, work.todo, models.cuda)  # decodes the first videos while the models load
            _start(cfg, models, place.local_world_size)
        per_video = models.bytes_per_video(cfg.num_clips, cfg.compression) if work.todo else 0
        need = per_video * len(work.todo)
        free = shutil.disk_usage(out if out.exists() else _existing_parent(out)).free
        if need > 0 and need * 1.02 + 64 * 2**20 > free:
            hint = [] if cfg.compression in ("zstd", "gzip") else ["--compression zstd"]
            hint += [] if cfg.spatial_pool else ["--spatial-pool (pooled aggregators only)"]
            raise BadValue(f"not enough disk space in {out}: the features need about {_fmt_bytes(need)} "
                           f"({len(work.todo)} videos x {_fmt_bytes(per_video)}"
                           + (f", {cfg.compression}" if cfg.compression != "none" else "")
                           + f"), {_fmt_bytes(free)} are free; free space or choose fewer --num-clips, a smaller "
                             f"--size" + "".join(f" or {h}" for h in hint))
        _note_compression(out, cfg.compression)
        with writer:  # holds this part's lock from here on
            again = _worklist(mine, writer.done)  # under the lock: what a process that just finished wrote counts
            if pool is not None and again.todo != work.todo:  # another process extracted some meanwhile
                pool.close()
                pool = _open_pool(cfg, again.todo, models.cuda)
            work = again
            if work.todo:
                _start(cfg, models, place.local_world_size)  # a no-op unless shards went away meanwhile
            say(f"{len(work.todo)} videos to extract ({work.skipped} done already, {len(work.missing)} "
                f"missing) of {len(found.items)} [{found.layout}, {len(found.classes)} classes]"
                + (f", part {place.part} of {place.num_parts}" if place.num_parts > 1 else "")
                + f"; {device}; about {_fmt_bytes(per_video * len(work.todo))} of features "
                  f"({_fmt_bytes(per_video)}/video"
                + (f", {cfg.compression}" if cfg.compression != "none" else "")
                + (", spatially pooled" if cfg.spatial_pool else "") + f"), {_fmt_bytes(free)} free")
            if cfg.spatial_pool and work.todo:
                say("--spatial-pool: maps are stored as their mean over H' x W' (T' kept); pooled aggregators "
                    "(avg, lstm, gru, netvlad, ...) lose nothing, map aggregators would run on a 1x1 grid")
            if work.todo:
                for name in cfg.models:
                    if str(models.headers[name].weights).startswith("random-init"):  # the provenance, not the option
                        warn_once(log, f"{name} is randomly initialised (seed {cfg.seed}): its features carry no "
                                       f"learned information; pass --weights {name}=PATH for real features")
            summary = _Extraction(cfg, place, models, writer).execute(work.todo, work.missing, work.skipped, pool)
        summary["merged"] = writer.merged is not None  # written when the with-block closed
    finally:
        if pool is not None:  # closed already after a run; here after an error before it
            pool.close()
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_benchmark
    summary.update(device=str(device), layout=found.layout, seconds=round(time.monotonic() - t0, 3))
    return summary


@dataclass
class _Worklist:
    """What this part still has to do, of its videos ``mine``."""

    todo: list  # VideoItems to extract
    missing: list  # listed by an annotation file but not found
    skipped: int  # already in a complete shard


def _worklist(mine: list, done: set[str]) -> _Worklist:
    todo = [it for it in mine if it.id not in done]
    missing = [it for it in todo if it.path is None]
    todo = [it for it in todo if it.path is not None]
    return _Worklist(todo, missing, len(mine) - len(todo) - len(missing))


def _note_compression(out: Path, compression: str) -> None:
    """A resume with another --compression is allowed (the values are the same; each shard names its
    filters) but said, so a directory of mixed codecs is never a surprise."""
    from faster.store import manifest

    used = {m.get("compression") for m in manifest.part_manifests(out).values() if m and m.get("shards")} - {None}
    if used and used != {compression}:
        log.warning("%s holds shards written with --compression %s; new shards use %s", out,
                    "/".join(sorted(used)), compression)


def _open_pool(cfg: ExtractConfig, todo: list[video.VideoItem], pin_memory: bool) -> DecodePool | None:
    """The decode workers of ``todo`` (None with --workers 0 or nothing to do), started now: their
    forkserver imports no torch, so they decode the first videos while the models are built."""
    if cfg.workers <= 0 or not todo:
        return None
    return DecodePool(todo, cfg.sampling, workers=cfg.workers, timeout=cfg.timeout, pin_memory=pin_memory,
                      recycle_every=cfg.recycle_every, decoder=cfg.decoder)


def _start(cfg: ExtractConfig, models: ClipModels, local_world_size: int) -> None:
    """Load the models and on a CPU give them the threads their cost calls for (faster.runtime.cpu_threads)."""
    import torch

    from faster.runtime import cpu_threads

    models.load()
    if models.device.type == "cpu":
        gflops = sum(h.gflops_per_clip for h in models.headers.values())
        torch.set_num_threads(cpu_threads(cfg.workers, local_world_size, gflops_per_clip=gflops))


def _compute_dtype(cfg: ExtractConfig, device: Any, out: Path) -> str:
    """float32 or bfloat16 for --dtype: under auto, what the directory's features were computed in (a
    resume is never refused because the default changed), else bf16 where the device has native bf16."""
    from faster.runtime import resolve_dtype

    if cfg.dtype == "auto":
        from faster.store import manifest

        for m in (manifest.part_manifests(out) if out.is_dir() else {}).values():
            for provenance in ((m or {}).get("config") or {}).get("models", {}).values():
                if provenance.get("compute_dtype") in ("float32", "bfloat16"):
                    return provenance["compute_dtype"]
    return resolve_dtype(cfg.dtype, device)


def _existing_parent(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (where a new output directory will be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class _Extraction:
    """One process's loop: decoded videos in, batches of clips through the models, videos to the writer."""

    def __init__(self, cfg: ExtractConfig, place: Any, models: ClipModels, writer: Any):
        self.cfg, self.place, self.models, self.writer = cfg, place, models, writer
        self.clips = 0
        self.short = 0
        self.decoders: dict[str, int] = {}  # videos read by each decoder (decord, pyav)

    def _add(self, p: _Pending) -> None:
        d = p.decoded
        feats = {m: np.concatenate(chunks) for m, chunks in p.outputs.items()}  # (N, T', H', W', C)
        gflops = {m: np.concatenate(chunks) for m, chunks in p.gflops.items()}  # (N,) per clip-dependent model
        self.writer.add(id=d.item.id, label=d.item.label, num_frames=d.num_frames, fps=d.fps,
                        clip_start=d.clip_start, features=feats, split=d.item.split, short=d.short,
                        gflops=gflops or None)
        self.clips += self.cfg.num_clips
        self.short += bool(d.short)
        self.decoders[d.decoder] = self.decoders.get(d.decoder, 0) + 1

    def _fail(self, item: video.VideoItem, stage: str, error: str, **extra: Any) -> None:
        log.warning("%s: %s failed: %s", item.id, stage, error)
        self.writer.fail(item.id, stage, error, **extra)

    def execute(self, todo: list[video.VideoItem], missing: list[video.VideoItem], skipped: int,
                pool: DecodePool | None = None) -> dict[str, Any]:
        """Extract ``todo`` with ``pool`` (the decode workers of ``todo``, closed here), else in this
        process (--workers 0, or nothing to do)."""
        from faster.progress import Progress

        cfg, w = self.cfg, self.writer
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        t0 = time.monotonic()
        bar = Progress(len(todo), "extract" if self.place.num_parts == 1 else f"extract part {self.place.part}",
                       unit="video", enabled=cfg.progress)
        pending: deque[_Pending] = deque()
        exhausted = not todo
        interrupted = None
        decoder = pool if pool is not None else InlineDecoder(todo, cfg.sampling, decoder=cfg.decoder)
        with _StopFlag() as stop, decoder:
            for item in missing:
                self._fail(item, item.stage, item.error or "not found")
            try:
                while True:
                    # Fill: decoded videos until a batch of clips is waiting (the workers decode meanwhile).
                    while not exhausted and stop.signal is None and \
                            sum(cfg.num_clips - p.done for p in pending) < self.models.batch_size:
                        try:
                            r = decoder.get(timeout=0.1)
                        except queue.Empty:
                            continue
                        if r is None:
                            exhausted = True
                        elif isinstance(r, Failed):
                            self._fail(r.item, r.stage, r.error, **r.extra)
                            bar.update(1)
                        else:
                            frames = r.frames.to(self.models.device, non_blocking=True)
                            pending.append(_Pending(r, frames, outputs={m: [] for m in self.models.names}))
                    if stop.signal is not None:
                        interrupted = stop.signal
                        break
                    if not pending:
                        break
                    self._step(pending, bar, t0)
            finally:
                bar.close()
            seconds = time.monotonic() - t0
            w.finish(started=started, seconds=round(seconds, 3), extracted=w.added, failed=w.failed, skipped=skipped,
                     interrupted=interrupted, device=str(self.models.device), batch_size=self.models.batch_size,
                     decoder=cfg.decoder, decoders=dict(self.decoders), compression=cfg.compression,
                     spatial_pool=cfg.spatial_pool)
        return {
            "extracted": w.added, "skipped": skipped, "failed": w.failed, "short": self.short,
            "clips": self.clips, "run_seconds": round(seconds, 3),
            "clips_per_s": round(self.clips / seconds, 3) if seconds > 0 else 0.0,
            "videos_per_s": round(w.added / seconds, 3) if seconds > 0 else 0.0,
            "shards_written": w.shards_written, "part": self.place.part, "num_parts": self.place.num_parts,
            "interrupted": interrupted, "out": str(w.out), "failures_file": str(w.failures.path),
            "compute_dtype": self.models.compute_dtype, "decoders": dict(self.decoders),
            "batch_size": self.models.batch_size, "config": asdict(cfg),
        }

    def _step(self, pending: deque, bar, t0: float) -> None:
        """One batch of clips, taken in order from the pending videos; finished videos go to the writer."""
        import torch

        want = self.models.batch_size
        parts = []
        for p in pending:
            if want == 0:
                break
            take = min(want, self.cfg.num_clips - p.done)
            if take:
                parts.append((p, p.done, p.done + take))
                want -= take
        clips = parts[0][0].frames[parts[0][1]:parts[0][2]] if len(parts) == 1 else \
            torch.cat([p.frames[a:b] for p, a, b in parts])  # (b, L, S, S, 3) uint8
        outs = self.models(clips)
        offset = 0
        for p, a, b in parts:
            for m, y in outs.items():
                p.outputs[m].append(y[offset:offset + b - a].numpy())
            for m, g in self.models.last_gflops.items():
                p.gflops.setdefault(m, []).append(g[offset:offset + b - a])
            p.done = b
            offset += b - a
        while pending and pending[0].done == self.cfg.num_clips:
            self._add(pending.popleft())
            elapsed = max(time.monotonic() - t0, 1e-9)
            bar.update(1, clips_per_s=f"{self.clips / elapsed:.1f}")
