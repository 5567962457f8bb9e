"""Online inference with a fitted FASTER run (paper: "Runtime vs. FLOPs", Table 5; Fig. 1's online use).

A run (``faster fit``) holds an aggregator fitted on cached res5 maps for one expensive:cheap
pattern. ``predict`` turns it back into a video classifier that spends only the FLOPs the pattern
promises:

1. rebuild both backbones and check that they are the ones the features were extracted with
   (a weights file's sha256 against the provenance recorded in the shards and the checkpoint;
   a recorded ``random-init:seed=S`` is rebuilt from S);
2. decode and sample each video exactly as extraction did (the same functions: uniform clip starts
   over the container's frame count, short-side resize to size*8/7, centre crop, the backbone's
   mean/std), but only at the clip positions the run was fitted on (a ``--num-clips`` subset);
3. at each position run only the backbone the pattern names (an expensive position never runs the
   cheap model and vice versa), round the map to the shards' float16 as the aggregator saw it in
   training, and step the aggregator clip by clip; a prediction exists after every clip;
4. write one JSON line per video: id, probs, top5 (class names), gflops (#E * E + #C * C + the
   aggregator's share: what the video actually cost), seconds; ``online`` adds the running
   prediction after every clip. A broken video is one line with ``error`` and ``stage``; the run
   goes on.

A run with an early exit (``faster fit --early-exit``) visits its clips in its order and stops
where its schedule leaves the video: its clips are then decoded on demand, in this process, only
at the positions visited (coarse-to-fine: the decoder seeks to each; temporal: it stops reading
the file at the exit), and neither backbone runs past the exit. Its line adds ``clips_seen`` and
``exit_clip``, the same as evaluate's.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from faster.aggregate.run import Run
from faster.errors import UserError

if TYPE_CHECKING:
    import torch

    from faster.extract.video import VideoItem

log = logging.getLogger(__name__)

_RANDOM_INIT = re.compile(r"^random-init:seed=(-?\d+)$")


@dataclass
class PredictConfig:
    videos: list[str]                                       # video files, or directories searched for videos
    run: str                                                # a run directory written by `faster fit`
    weights: dict[str, str] = field(default_factory=dict)   # model name -> weights file (as at extraction)
    out: str | None = None                                  # predictions JSONL; None: stdout (CLI) / iterator only
    online: bool = False                                    # add the running prediction after every clip
    device: str = "auto"                                    # auto, cpu, cuda or cuda:N
    batch_size: int = 8                                     # clips per backbone forward (of one video)
    workers: int = 1                                        # decoding processes (0: in this process, no timeout)
    timeout: float = 300.0                                  # seconds before a hanging decode counts as failed
    decoder: str = "auto"                                   # auto (video.decode_clips), decord or pyav
    dtype: str = "auto"                                     # auto: as the run's features were extracted; fp32, bf16
    strict: bool = False                                    # raise at the end if any video failed
    order: str | None = None                                # fold the clips in this order (None: the run's)
    echo: bool = False                                      # with online: print each step and the exit to stderr
    progress: bool = True                                   # a bar on a terminal, a line a minute in a log (faster.progress)

    def __post_init__(self) -> None:
        if not self.videos:
            raise PredictError("no videos given")
        for name, low in (("batch_size", 1), ("workers", 0)):
            if getattr(self, name) < low:
                raise PredictError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise PredictError(f"timeout must be > 0 seconds, got {self.timeout}")
        from faster.extract.video import check_decoder
        from faster.runtime import check_dtype

        check_decoder(self.decoder)
        check_dtype(self.dtype)


class PredictError(UserError):
    """A user-facing problem with the run or the weights (one line, names the bad value)."""


# ----------------------------------------------------------------------------------------------
# backbone provenance


def check_weights(model: str, recorded: str, given: str | None) -> tuple[str | None, int]:
    """Decide how to rebuild ``model`` so that it equals the backbone the features came from.

    ``recorded`` is the run's provenance string (a weights file's sha256, ``random-init:seed=S``,
    or for a torchvision weight enum whose file was not cached, ``torchvision:<enum>``); ``given``
    is the ``--weights`` value for this model, if any: a file (hashed and compared here) or a
    torchvision weight enum (compared by :class:`Predictor` once built). Returns (weights or None,
    seed). Raises PredictError naming the model, what the run expects and what was given.
    """
    if recorded.startswith("packed:"):
        where = recorded[len("packed:"):]
        raise PredictError(f"{model}: the run's features were packed from {where} by `faster pack`; there is no "
                           "backbone to rebuild, so `faster predict` cannot run it "
                           "(evaluate works on packed features)")
    m = _RANDOM_INIT.match(recorded)
    if m:
        if given is not None:
            raise PredictError(f"{model}: the run's features came from a random initialisation ({recorded}), "
                               f"but --weights {model}={given} was given; drop it to rebuild the same network")
        return None, int(m.group(1))
    if given is None:
        raise PredictError(f"{model}: the run's features were extracted with weights {recorded}; "
                           f"pass --weights {model}=PATH to that file")
    path = Path(given)
    if path.is_file():
        from faster.store.files import cached_sha256

        digest = cached_sha256(path)
        if digest != recorded:
            raise PredictError(f"{model}: weights file {given!r} has sha256 {digest}, but the run's features "
                               f"were extracted with {recorded}")
        return str(path), 0
    if path.exists() or "/" in given or "\\" in given or path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        from faster.store.files import describe_path

        raise PredictError(f"{model}: --weights {given!r} is {describe_path(path)}, not a weights file (the run "
                           f"expects {recorded})")
    return given, 0  # a weight name such as a torchvision enum: its provenance is compared once built


def _hf_weights(name: str) -> str | None:
    """The weights file of the directory ``hf:PATH`` names (what extraction read by default), or None
    when it has none; a missing directory is left to the build to report."""
    from faster.errors import BadFile
    from faster.extract.models import default_weights

    try:
        return default_weights(name, None)
    except (BadFile, OSError):  # a sharded or unreadable directory: the build names it
        return None


# ----------------------------------------------------------------------------------------------
# the predictor: the backbones and the aggregator of one run


class Predictor:
    """The backbones and the fitted aggregator of a run, ready to classify decoded clips.

    ``calls[model]`` counts the clips each backbone has processed: tests check that the pattern is
    obeyed, and each video's ``gflops`` is computed from what actually ran.
    """

    def __init__(self, run_dir: str | Path | Run, weights: dict[str, str] | None = None, *, device: str = "auto",
                 batch_size: int = 8, dtype: str = "auto", order: str | None = None) -> None:
        from faster.extract.runner import BackboneRunner
        from faster.runtime import resolve_device

        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.run = run_dir if isinstance(run_dir, Run) else Run.load(run_dir)  # a Run: loaded by the caller
        self.schedule = self.run.schedule if order is None else self.run.schedule.with_order(order)
        self.aggregator = self.run.model(self.device)  # the schedule's module (a policy: with its gate)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.run.models))
        if unknown:
            raise PredictError(f"--weights for {', '.join(unknown)}, but the run's models are "
                               f"{', '.join(self.run.models)}")
        if self.device.type == "cuda":
            import torch

            torch.backends.cudnn.benchmark = True  # a run's chunks have few distinct shapes: tune once each
        built = {name: self._build_backbone(name, weights.get(name)) for name in self.run.needed}
        # Extraction ran the backbones under bf16 autocast (on CUDA, or --dtype bf16 / auto on a CPU with
        # native bf16: recorded as compute_dtype): so do we, on whatever device predict runs.
        recorded = any(self.run.models[m].get("compute_dtype") == "bfloat16" for m in built)  # as extraction ran
        amp = recorded if dtype == "auto" else dtype == "bf16"
        self.runner = BackboneRunner(built, self.device, batch_size=batch_size, amp=amp, clip_len=self.run.clip_len,
                                     pooled={m for m in built if self.run.models[m].get("spatial_pool")},
                                     sizes={m: int(self.run.models[m].get("size") or self.run.size) for m in built},
                                     frames={m: self._frames(m) for m in built})
        self.backbones = self.runner.models
        self.calls = self.runner.calls
        self.clip_gflops_extra = 0.0  # this video's GFLOPs beyond the recorded per-clip figures (features())

    def _sampling(self, name: str) -> tuple[int, int]:
        """(clip_len, frame_stride) of ``name``'s clips as extracted: its own (format 3), else the run's."""
        recorded = self.run.models[name]
        return (int(recorded.get("clip_len") or self.run.clip_len),
                int(recorded.get("frame_stride") or self.run.frame_stride))

    def _frames(self, name: str) -> tuple[int, ...]:
        """The frames of each decoded clip (the run's clip grid) that ``name`` takes, as extraction did."""
        from faster.sampling import grid_frames

        return grid_frames(*self._sampling(name), self.run.frame_stride)

    def _build_backbone(self, name: str, given: str | None) -> torch.nn.Module:
        """``name`` as the features were extracted: same weights (checked), normalisation and layer.
        An ``hf:PATH`` model's weights default to its own directory's file, as at extraction."""
        from faster.extract import models

        recorded, run = self.run.models[name], self.run
        if given is None and name.startswith(models.HF_PREFIX) and not _RANDOM_INIT.match(str(recorded["weights"])):
            given = _hf_weights(name)
        path, seed = check_weights(name, str(recorded["weights"]), given)
        try:
            module = models.build(name, weights=path, seed=seed)
        except ValueError as err:  # an unreadable file, a wrong architecture, an unknown weight name
            raise PredictError(f"{name}: {err} (the run's features were extracted with {recorded['weights']})") from None
        if str(module.weights) != str(recorded["weights"]):
            raise PredictError(f"{name}: --weights {name}={given} gives {module.weights}, but the run's features "
                               f"were extracted with {recorded['weights']}")
        for attr in ("mean", "std"):
            want = [float(v) for v in recorded[attr]]
            have = [float(v) for v in getattr(module, attr)]
            if len(want) != len(have) or any(abs(a - b) > 1e-6 for a, b in zip(want, have)):
                raise PredictError(f"{name}: the backbone normalises with {attr}={have}, the features were "
                                   f"extracted with {attr}={want}")
        if recorded.get("layer") and str(module.layer) != str(recorded["layer"]):
            raise PredictError(f"{name}: the backbone outputs {module.layer}, the run's features are "
                               f"{recorded['layer']}")
        size = int(recorded.get("size") or run.size)  # this model's crop (format 2), else the extraction's
        clip_len = self._sampling(name)[0]  # this model's clip length (format 3), else the extraction's
        C, T, H, W = models.feature_shape(name, clip_len, size)
        if recorded.get("spatial_pool"):  # extracted with --spatial-pool: features() pools as extraction did
            H = W = 1
        if "shape" in recorded and [T, H, W, C] != [int(v) for v in recorded["shape"]]:
            raise PredictError(f"{name}: the backbone maps {clip_len}-frame clips at {size} px "
                               f"to {[T, H, W, C]} (T', H', W', C), the run's features are {list(recorded['shape'])}")
        return module

    def features(self, name: str, clips: torch.Tensor) -> torch.Tensor:
        """res5 maps (B, T', H', W', C) float32, channels-last as the shards store them, of uint8 clips
        (B, L, S, S, 3), rounded to the shards' float16 first: the aggregator was fitted on those
        values. A model extracted with --spatial-pool gives (B, T', 1, 1, C), the float16 mean over
        H' x W' as extraction stored it. A backbone whose cost depends on the clip (VA-RED²) adds what
        its clips cost beyond the run's recorded figure to ``clip_gflops_extra`` (classify's count)."""
        maps = self.runner(name, clips).float()
        if name in self.runner.clip_dependent:
            recorded = float(self.run.models[name]["gflops_per_clip"])
            self.clip_gflops_extra += float(self.runner.last_gflops[name].sum()) - recorded * int(clips.shape[0])
        return maps

    def steps(self, clips: Any) -> Iterator[dict[str, Any]]:
        """Fold one video's clips clip by clip, in the schedule's order, up to where it leaves the video.

        ``clips``: the run's clips (n, L, S, S, 3) uint8, taken at the run's positions, or a callable
        ``clips(ks)`` giving the clips ``ks`` (indices among the run's) on demand (:class:`LazyClips`:
        decoded only when a backbone needs them). Yields after every clip {"clip", "position",
        "model", "expensive", "probs"} with the running class probabilities (K,). The run's schedule
        (aggregate/schedule.py) says which backbone runs on which clip: within a chunk of
        ``batch_size`` clips each backbone runs once, on the clips the schedule gives it and no
        others (a learned policy: the cheap backbone on every clip, the expensive one where its gate
        decides; an early exit: clip by clip, nothing past the exit); the aggregator then steps
        through them in order.
        """
        import torch

        run = self.run
        if callable(clips):
            get = clips
        else:
            if clips.shape[0] != run.num_clips:
                raise ValueError(f"expected {run.num_clips} clips (the run's positions), got {clips.shape[0]}")

            def get(ks: list[int]) -> Any:
                return clips[ks]

        def features(source: str, ks: list[int]) -> torch.Tensor:
            return self.features(run.model_name(source), get(ks))

        with torch.inference_mode():
            for k, source, logits in self.schedule.steps(self.aggregator, features, self.batch_size):
                probs = torch.softmax(logits.float(), dim=-1)[0].cpu()
                yield {"clip": k, "position": run.positions[k], "model": run.model_name(source),
                       "expensive": source == "expensive", "probs": probs}

    def gflops(self, num_expensive: int, clips_seen: int | None = None) -> float:
        """A video's cost when ``num_expensive`` of the ``clips_seen`` clips it read (default: all) got
        the expensive backbone (per-clip GFLOPs as recorded at extraction, the aggregator's share,
        a policy's gate, an exit's decisions)."""
        return self.run.video_gflops(num_expensive, clips_seen)

    def classify(self, clips: Any, *, video_id: str = "", label: int = -1, online: bool = False,
                 on_step: Any = None) -> dict[str, Any]:
        """One video's line: the fields of `faster evaluate` (id, label, probs, top5, gflops,
        num_expensive, num_cheap, clips_seen, an exit's exit_clip) and, with ``online``, the running
        prediction after every clip read.

        ``clips``: the run's clips of one video as uint8 (n, L, S, S, 3), a torch tensor or a numpy
        array (what faster.extract.video.decode_clips returns in ``.frames``), or a callable giving
        the clips of the requested indices (:class:`LazyClips`). ``on_step(entry)``: called after
        every clip with its running prediction (what ``online`` collects), as it comes."""
        import torch

        from faster.aggregate.evaluation import prediction_rows

        if not callable(clips):
            clips = torch.as_tensor(clips)
            if clips.dtype != torch.uint8 or clips.ndim != 5:
                raise PredictError(f"clips must be uint8 (n, L, S, S, 3), got {tuple(clips.shape)} {clips.dtype}")

        classes = self.run.classes
        self.clip_gflops_extra = 0.0
        running, probs, decisions = [], None, [-1] * self.run.num_clips  # -1: a clip never read
        for step in self.steps(clips):
            probs = step["probs"].numpy()
            decisions[step["clip"]] = int(step["expensive"])
            if online or on_step is not None:
                row = next(prediction_rows([video_id], [label], probs[None], classes, None))
                entry = {k: step[k] for k in ("clip", "position", "model")} | {"probs": row["probs"], "top5": row["top5"]}
                running.append(entry)
                if on_step is not None:
                    on_step(entry)
        assert probs is not None, "a run has at least one clip"
        report = self.schedule.report(decisions)
        record = next(prediction_rows([video_id], [label], probs[None], classes,
                                      self.gflops(report["num_expensive"], report["clips_seen"])
                                      + self.clip_gflops_extra, [report]))
        if online:
            record["online"] = running
        return record


class LazyClips:
    """One video's clips at a run's positions, decoded only when asked for (an early-exit run):
    ``clips(ks)`` -> (len(ks), L, S, S, 3) uint8 of the run's clips ``ks``, each decoded once, with
    extraction's sampling (faster.extract.video.decode_clips at those positions only: the same frames
    a full decode gives there). ``decoded`` counts the clips decoded."""

    def __init__(self, path: str | Path, run: Run, decoder: str = "auto"):
        from faster.sampling import Sampling

        self.path, self.decoder, self.run = str(path), decoder, run
        self.sampling = Sampling(clip_len=run.clip_len, num_clips=run.num_extracted, frame_stride=run.frame_stride,
                                 size=run.size)
        self.cache: dict[int, Any] = {}
        self.num_frames: int | None = None

    @property
    def decoded(self) -> int:
        return len(self.cache)

    def __call__(self, ks: list[int]) -> Any:
        import dataclasses

        import torch

        from faster.extract.video import decode_clips

        missing = [k for k in ks if k not in self.cache]
        if missing:
            sampling = dataclasses.replace(self.sampling, positions=tuple(self.run.positions[k] for k in missing))
            d = decode_clips(self.path, sampling, decoder=self.decoder)
            frames = torch.from_numpy(d.frames)
            self.cache.update((k, frames[i]) for i, k in enumerate(missing))
            self.num_frames = d.num_frames
        return torch.stack([self.cache[k] for k in ks])


# ----------------------------------------------------------------------------------------------
# the command: videos in, JSON lines out


def list_videos(paths: list[str], classes: list[str]) -> list[VideoItem]:
    """Every video to classify: a file as given (id: its path as given, unlabelled), or the videos
    extraction's discovery finds under a directory (ids relative to it; a class folder named like
    one of the run's classes gives the label, as an index into the run's classes)."""
    from faster.extract.video import VideoItem, discover, is_video

    index = {c: i for i, c in enumerate(classes)}
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = discover(path)
            for item in found.items:
                name = found.classes[item.label] if item.label >= 0 else None
                out.append(VideoItem(item.id, item.path, index.get(name, -1)))
        elif path.is_file():
            if not is_video(path):
                log.warning("%s: not a video file name; trying it anyway", p)
            out.append(VideoItem(p, path))
        else:
            from faster.store.files import describe_path

            raise PredictError(f"video {p!r}: {describe_path(path)}, not a video file or a directory of them")
    return out


def decoded_videos(items: list[VideoItem], run: Run, *, workers: int = 1, timeout: float = 300.0,
                   pin_memory: bool = False, decoder: str = "auto") -> Iterator[tuple[VideoItem, Any]]:
    """(item, decoders.Decoded or decoders.Failed) per video, as extraction decodes them (the same
    worker processes, timeout, sampling and ``decoder``) but only at the run's clip positions.
    Order: as decoded."""

    with _open_decoder(items, run, workers=workers, timeout=timeout, pin_memory=pin_memory, decoder=decoder) as pool:
        for out in pool:
            yield out.item, out


def _open_decoder(items: list[VideoItem], run: Run, *, workers: int, timeout: float, pin_memory: bool,
                  decoder: str) -> Any:
    """The decoder of ``items`` at the run's clip positions: ``workers`` processes (started now), or
    this process with ``workers=0``."""
    from faster.extract.decoders import DecodePool, InlineDecoder
    from faster.sampling import Sampling

    sampling = Sampling(clip_len=run.clip_len, num_clips=run.num_extracted, frame_stride=run.frame_stride,
                        size=run.size, positions=run.positions)
    if workers:
        return DecodePool(items, sampling, workers=workers, timeout=timeout, pin_memory=pin_memory, decoder=decoder)
    return InlineDecoder(items, sampling, decoder=decoder)


@dataclass
class PredictSummary:
    predicted: int = 0
    failed: int = 0
    correct: int = 0                     # top-1 hits among the labelled videos
    labelled: int = 0
    seconds: float = 0.0
    gflops: float = 0.0
    expensive: int = 0                   # clips the expensive backbone ran on, over all videos
    seen: int = 0                        # clips read, over all videos (fewer than n each after an early exit)
    calls: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"predicted {self.predicted} videos", f"failed {self.failed}", f"{self.seconds:.1f} s"]
        if self.predicted:
            parts.append(f"{self.gflops / self.predicted:.4g} GFLOPs/video")
            parts.append(f"{self.expensive / self.predicted:.3g} expensive clips/video")
            parts.append(f"{self.seen / self.predicted:.3g} clips read/video")
        if self.labelled:
            parts.append(f"top-1 {self.correct / self.labelled:.3f} on {self.labelled} labelled")
        parts.append("clips: " + ", ".join(f"{m} {n}" for m, n in self.calls.items()))
        return ", ".join(parts)

    def add(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.failed += 1
            return
        self.predicted += 1
        self.gflops += record["gflops"]
        self.expensive += record.get("num_expensive", 0)
        self.seen += record.get("clips_seen", 0)
        if record["label"] >= 0:
            self.labelled += 1
            self.correct += int(max(range(len(record["probs"])), key=record["probs"].__getitem__) == record["label"])


def iter_predict(cfg: PredictConfig, predictor: Predictor | None = None) -> Iterator[dict[str, Any]]:
    """One record per video, as decoded: its prediction line, or {"id", "error", "stage"} when it
    could not be decoded or classified (logged; the run goes on). ``seconds`` is the wall time the
    video took here: waiting for its frames plus the backbones and the aggregator."""
    if predictor is None:
        predictor, items, pool = _start(cfg)
    else:
        items, pool = _videos(cfg, predictor.run), None
    yield from _records(cfg, predictor, items, pool)


def _videos(cfg: PredictConfig, run: Run) -> list[VideoItem]:
    items = list_videos(cfg.videos, run.classes)
    if not items:
        raise PredictError(f"no video files in {', '.join(cfg.videos)}")
    return items


def _start(cfg: PredictConfig) -> tuple[Predictor, list[VideoItem], Any]:
    """The predictor, the videos and their decode workers (None: decoded later, in this process),
    started so that they overlap: the workers' forkserver first (it imports no torch), then the run
    is read and the videos listed, the workers start decoding, and the backbones are built meanwhile."""
    from faster.extract.decoders import warm_up_workers
    from faster.runtime import resolve_device

    if cfg.workers > 0:
        warm_up_workers()  # its imports overlap this process's import of torch and the run's checkpoint
    run = Run.load(cfg.run)
    items = _videos(cfg, run)
    pool = None
    if cfg.workers > 0 and not run.schedule.stops_early:  # a run that may leave a video early decodes on demand
        pool = _open_decoder(items, run, workers=cfg.workers, timeout=cfg.timeout, decoder=cfg.decoder,
                             pin_memory=resolve_device(cfg.device).type == "cuda")
    try:
        predictor = Predictor(run, cfg.weights, device=cfg.device, batch_size=cfg.batch_size, dtype=cfg.dtype,
                              order=cfg.order)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    return predictor, items, pool


def _records(cfg: PredictConfig, predictor: Predictor, items: list[VideoItem], pool: Any) -> Iterator[dict[str, Any]]:
    """iter_predict's records of ``items``, decoded by ``pool`` (closed here) or by a decoder opened now."""
    from faster.progress import Progress

    bar = Progress(len(items), "predict", unit="video", enabled=cfg.progress)
    try:
        if predictor.schedule.stops_early:
            yield from _predict_on_demand(items, cfg, predictor, bar)
            return
        if pool is None:
            pool = _open_decoder(items, predictor.run, workers=cfg.workers, timeout=cfg.timeout,
                                 pin_memory=predictor.device.type == "cuda", decoder=cfg.decoder)
        t0 = time.perf_counter()
        for decoded in pool:
            item = decoded.item
            if not hasattr(decoded, "frames"):  # decoders.Failed
                log.warning("%s: %s failed: %s", item.id, decoded.stage, decoded.error)
                yield {"id": item.id, "error": decoded.error, "stage": decoded.stage}
            else:
                try:
                    record = predictor.classify(decoded.frames, video_id=item.id, label=item.label,
                                                online=cfg.online, on_step=_printer(cfg, item.id))
                except Exception as err:  # e.g. clips the backbone cannot take: this video's, not the run's
                    log.warning("%s: model failed: %s", item.id, err)
                    yield {"id": item.id, "error": f"{type(err).__name__}: {err}", "stage": "model"}
                else:
                    now = time.perf_counter()
                    yield {**record, "num_frames": decoded.num_frames, "seconds": round(now - t0, 4)}
            t0 = time.perf_counter()
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()


def _printer(cfg: PredictConfig, video_id: str) -> Any:
    """With ``cfg.online`` and ``cfg.echo``: print each clip's running prediction to stderr as it comes."""
    if not (cfg.online and cfg.echo):
        return None
    import sys

    def show(entry: dict[str, Any]) -> None:
        name, p = entry["top5"][0]
        print(f"{video_id}: clip {entry['clip']} (position {entry['position']}, {entry['model']}): {name} {p:.3f}",
              file=sys.stderr, flush=True)

    return show


def online_summary(record: dict[str, Any], num_clips: int) -> str:
    """One line on where a video was left and what it was: its exit point and class."""
    name, p = record["top5"][0]
    where = (f"left after {record['clips_seen']} of {num_clips} clips (clip {record['exit_clip']})"
             if record.get("exit_clip") is not None else f"read all {num_clips} clips")
    return f"{record['id']}: {where}: {name} {p:.3f}, {record['gflops']:.4g} GFLOPs"


def _predict_on_demand(items: list[VideoItem], cfg: PredictConfig, predictor: Predictor, bar: Any) -> Iterator[
        dict[str, Any]]:
    """iter_predict for a run that may leave a video early: each video's clips decoded in this
    process when the schedule reaches them (:class:`LazyClips`; no decode workers, no timeout)."""
    from faster.extract.video import DecodeError

    for item in items:
        t0 = time.perf_counter()
        clips = LazyClips(item.path, predictor.run, cfg.decoder)
        try:
            record = predictor.classify(clips, video_id=item.id, label=item.label, online=cfg.online,
                                        on_step=_printer(cfg, item.id))
        except DecodeError as err:
            log.warning("%s: %s failed: %s", item.id, err.stage, err)
            yield {"id": item.id, "error": str(err), "stage": err.stage}
        except Exception as err:  # e.g. clips the backbone cannot take: this video's, not the run's
            log.warning("%s: model failed: %s", item.id, err)
            yield {"id": item.id, "error": f"{type(err).__name__}: {err}", "stage": "model"}
        else:
            yield {**record, "num_frames": clips.num_frames, "clips_decoded": clips.decoded,
                   "seconds": round(time.perf_counter() - t0, 4)}
        bar.update(1)


def predict(cfg: PredictConfig, stream: IO[str] | None = None) -> PredictSummary:
    """Classify ``cfg.videos`` with the run; write JSON lines to ``cfg.out`` (else ``stream``, else stdout).

    A broken video is written as {"id", "error", "stage"} and skipped. With ``cfg.strict`` a
    PredictError is raised at the end when any failed (the output is complete anyway).
    """
    import contextlib
    import sys

    t0 = time.perf_counter()
    predictor, items, pool = _start(cfg)
    summary = PredictSummary()
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.callback(pool.close)  # closed by _records too; here when the output cannot be opened
        if cfg.out is not None:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            stream = stack.enter_context(open(cfg.out, "w"))
        elif stream is None:
            stream = sys.stdout
        for record in _records(cfg, predictor, items, pool):
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            summary.add(record)
            if cfg.online and cfg.echo and "error" not in record:
                print(online_summary(record, predictor.run.num_clips), file=sys.stderr, flush=True)
    summary.seconds = time.perf_counter() - t0
    summary.calls = dict(predictor.calls)
    log.info("%s", summary.line())
    if cfg.strict and summary.failed:
        raise PredictError(f"{summary.failed} of {summary.failed + summary.predicted} videos failed (--strict); "
                           f"{summary.line()}")
    return summary
