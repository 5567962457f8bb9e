"""`faster demo`: the whole pipeline on a laptop CPU, end to end and learned, in a few minutes.

1. Makes a small labelled set of videos whose class is a motion direction (faster.synthetic,
   "plain" style: the same grey background and white square in every video): a single frame cannot
   tell the class, only the square's motion can.
2. Trains the two clip backbones with their heads on the training videos, validated on the
   validation videos (stage 1: faster.train.clip, the `faster train-clip` recipe, no flips since a
   flip turns left into right): narrow variants of the paper's expensive R(2+1)D-50, whose (2+1)D
   convolutions model time at every stage, and cheap R2D-26, whose conv1 collapses the clip's
   frames into one step (Table 1), at a small spatial size.
3. Extracts both trained backbones over N clips of L = 8 frames per video, train and validation
   sets apart (the shards record the trained files' sha256).
4. Runs a small ablation grid (aggregators x all-c, first, 1:1, all-e: the paper's Tables 3 and 4
   in miniature) and returns where its tables and accuracy-vs-GFLOPs plot are, with the two
   backbones' own validation accuracies (their heads' scores averaged over ``train_val_clips`` clips).

The squares move fast (6-10 pixels per frame at 64 px, 3.5-6 at the 32 px the backbones see): R2D's
conv1 (8 x 7 x 7, the only layer that sees more than one frame) learns the direction only in part,
R(2+1)D's temporal convolutions in every stage learn it (stage 1's validation video@1: 67.5 and
97.5 % in README.md's run), so the cheap clips carry less than the expensive ones and all-c, first,
1:1 and all-e differ for that reason. Training starts from the seeded random init with the last
batch norm of every residual block zeroed (train-clip's own start from scratch: PySlowFast's
ZERO_INIT_FINAL_BN; without it the deep, narrow R(2+1)D does not learn in the demo's few epochs).
Backbones given in ``weights`` are not trained; a backbone neither trained nor given would be
randomly initialised (``random_init`` in the summary, now always empty). ``quick`` trains for one
epoch on a handful of smaller videos, so that CI runs the demo in seconds; its accuracies only show
that the pipeline works.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from faster.errors import BadFile, BadValue, Incompatible, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: videos, stage-1 training, extraction and grid."""

    classes: tuple[str, ...]        # motion directions (faster.synthetic.DIRECTIONS)
    train_per_class: int            # training videos per class
    val_per_class: int              # validation videos per class (another seed: other videos)
    frames: int                     # frames per video
    video_size: int                 # side of the square videos, pixels
    style: str                      # faster.synthetic.STYLES: "plain" (same colours everywhere) or "textured"
    speed: tuple[float, float]      # range of the square's speed, pixels per frame at 64 px
    size: int                       # crop size of training and extraction (the backbones see size x size)
    clip_len: int                   # L, frames per clip
    num_clips: int                  # N, clips extracted per video
    expensive: str                  # backbone names
    cheap: str
    train_epochs: int               # stage 1 (faster.train.clip), each backbone
    train_lr: float                 # peak SGD rate at train_batch_size
    train_batch_size: int
    train_dropout: float            # before the clip head
    train_val_clips: int            # uniform clips per validation video in stage 1's validation
    aggs: tuple[str, ...]           # the grid
    patterns: tuple[str, ...]
    grid_clips: tuple[int, ...]
    epochs: int                     # the grid's fits
    batch_size: int


FULL = DemoSize(classes=("left", "right", "up", "down"), train_per_class=40, val_per_class=10, frames=48,
                video_size=64, style="plain", speed=(6.0, 10.0), size=32, clip_len=8, num_clips=8,
                expensive="r2plus1d50_tiny", cheap="r2d26_tiny", train_epochs=14, train_lr=0.05,
                train_batch_size=8, train_dropout=0.0, train_val_clips=4,
                aggs=("avg", "gru", "fastgru"), patterns=("all-c", "first", "1:1", "all-e"), grid_clips=(8,),
                epochs=10, batch_size=16)
QUICK = DemoSize(classes=("left", "right", "up", "down"), train_per_class=3, val_per_class=2, frames=32,
                 video_size=64, style="plain", speed=(6.0, 10.0), size=32, clip_len=8, num_clips=4,
                 expensive="r2plus1d50_tiny", cheap="r2d26_tiny", train_epochs=1, train_lr=0.05,
                 train_batch_size=6, train_dropout=0.0, train_val_clips=2,
                 aggs=("avg", "fastgru"), patterns=("first", "all-e"), grid_clips=(4,), epochs=2, batch_size=8)


@dataclass
class DemoConfig:
    out: str = "faster-demo"                                  # everything the demo writes goes here
    quick: bool = False                                       # the CI size (QUICK) instead of FULL
    weights: dict[str, str] = field(default_factory=dict)     # backbone name -> weights file (not trained)
    device: str = "auto"                                      # training, extraction and fitting device
    jobs: int | None = None                                   # grid cells trained at once; None: 2 (1 with quick)
    expensive: str | None = None                              # a registered backbone; None: the size's (r2plus1d50_tiny)
    cheap: str | None = None                                  # a registered backbone; None: the size's (r2d26_tiny)
    seed: int = 0                                             # videos, backbone init, training and fits
    progress: bool = True
    echo: Callable[[str], None] | None = None                 # stage 1's per-epoch lines


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Make the videos, train both backbones, extract them, run the grid; return the ablation
    summary plus "backbones" (each one's stage-1 validation accuracies and weights file) and timings.

    Running it again into the same directory reuses the videos, the finished training runs
    (result.json; an interrupted one resumes), the features and the finished cells.
    """
    size = _size(cfg)
    for name, path in cfg.weights.items():
        if name not in (size.expensive, size.cheap):
            raise BadValue(f"--weights {name}=...: the demo extracts {size.expensive} and {size.cheap}")
        if not Path(path).is_file():  # before any video is written
            raise BadFile(f"--weights {name}={path}: no such file")
    from faster import synthetic
    from faster.aggregate.ablate import AblateConfig, run_ablate
    from faster.extract import models
    from faster.extract.pipeline import ExtractConfig, extract_videos

    out = Path(cfg.out)
    _claim(out, {"size": asdict(size), "weights": cfg.weights, "seed": cfg.seed})
    timings: dict[str, float] = {}

    t = time.perf_counter()
    sets = {"train": (size.train_per_class, cfg.seed), "val": (size.val_per_class, cfg.seed + 1)}
    for split, (per_class, seed) in sets.items():
        if not (out / "videos" / split).exists():
            tmp = out / "videos" / f".{split}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            synthetic.make_motion_dataset(tmp, classes=size.classes, per_class=per_class, frames=size.frames,
                                          size=size.video_size, seed=seed, style=size.style,
                                          speed=size.speed)
            tmp.rename(out / "videos" / split)
    timings["videos"] = time.perf_counter() - t
    log.info("videos: %d classes, %d train and %d val per class in %s", len(size.classes), size.train_per_class,
             size.val_per_class, out / "videos")

    t = time.perf_counter()
    weights, backbones = dict(cfg.weights), {}
    for name in (size.expensive, size.cheap):
        row: dict[str, Any] = {"gflops_per_clip": models.clip_gflops(name, size.clip_len, size.size)}
        if name in cfg.weights:
            row.update(trained=False, video_top1=None, clip_top1=None, seconds=None, weights=cfg.weights[name])
        else:
            r = _train_backbone(name, size, out, cfg)
            weights[name] = r["weights"]
            if r.get("flops_target") is not None and r.get("gflops_per_clip") is not None:
                row["gflops_per_clip"] = r["gflops_per_clip"]  # VA-RED²: what its validation clips cost, on average
            row.update(trained=True, video_top1=r["video_top1"], clip_top1=r["clip_top1"], seconds=r["seconds"],
                       weights=r["weights"], best_epoch=r["best_epoch"], epochs=r["epochs"],
                       val_clips=size.train_val_clips, reused=r["reused"])
        backbones[name] = row
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    extractions = {}
    for split in sets:
        ecfg = ExtractConfig(video_root=str(out / "videos" / split), out=str(out / "features" / split),
                             models=[size.expensive, size.cheap], weights=weights,
                             clip_len=size.clip_len, num_clips=size.num_clips, size=size.size,
                             device=cfg.device, seed=cfg.seed, batch_size=size.num_clips, progress=cfg.progress,
                             # one decoding process, so the tiny backbones run on one torch thread: two
                             # threads' OpenMP barriers stall whenever another job takes a core (2-3x slower)
                             workers=1)
        extractions[split] = extract_videos(ecfg)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    acfg = AblateConfig(feats=[str(out / "features" / "train")], out=str(out / "ablate"), aggs=list(size.aggs),
                        num_clips=list(size.grid_clips), patterns=list(size.patterns), seeds=[cfg.seed],
                        # two cells at once, one torch thread each: the aggregators are too small for two
                        # threads' OpenMP barriers; the quick grid's few steps do not pay for starting processes
                        jobs=cfg.jobs or (1 if cfg.quick else 2), expensive=size.expensive, cheap=size.cheap,
                        progress=cfg.progress,
                        fit={"val": [str(out / "features" / "val")], "epochs": size.epochs,
                             "batch_size": size.batch_size, "dropout": 0.2, "device": cfg.device,
                             "workers": 0})
    summary = run_ablate(acfg)
    timings["ablate"] = time.perf_counter() - t
    summary.update(extractions=extractions, backbones=backbones,
                   timings={k: round(v, 1) for k, v in timings.items()},
                   random_init=sorted({size.expensive, size.cheap} - set(weights)), quick=cfg.quick)
    return summary


def _size(cfg: DemoConfig) -> DemoSize:
    """QUICK or FULL with the backbones ``cfg`` names (e.g. vared_r2plus1d50_tiny, blvnet_tam50), each
    checked to take the demo's clips (BadValue naming it otherwise) before anything is written."""
    from faster.extract import models

    size = QUICK if cfg.quick else FULL
    size = replace(size, expensive=cfg.expensive or size.expensive, cheap=cfg.cheap or size.cheap)
    if size.expensive == size.cheap:
        raise BadValue(f"--expensive and --cheap are both {size.expensive}: the demo pairs two backbones")
    for flag, name in (("--expensive", size.expensive), ("--cheap", size.cheap)):
        if name not in models.names():
            raise BadValue(f"{flag} {name}: not a registered backbone (`faster flops --list` lists them)")
        try:
            models.feature_shape(name, size.clip_len, size.size)
        except UserError as err:
            raise BadValue(f"{flag} {name}: cannot take the demo's {size.clip_len}-frame clips at {size.size} px "
                           f"({str(err).splitlines()[0]})") from None
    return size


def _train_backbone(name: str, size: DemoSize, out: Path, cfg: DemoConfig) -> dict[str, Any]:
    """Stage 1 for ``name`` in OUT/train/NAME: the finished run's result.json when there is one (its
    ``reused`` True), else train_clip's result (resuming an interrupted run); ``weights`` is the
    run's model.pt."""
    import torch

    from faster.store import files
    from faster.train.clip import CONFIG, METRICS, MODEL, RESULT, STATE, TrainClipConfig, train_clip

    run = out / "train" / name
    done = files.read_json(run / RESULT) if (run / RESULT).is_file() and (run / MODEL).is_file() else None
    if done is not None:
        log.info("%s: reusing the finished stage-1 run %s", name, run)
        return {**done, "weights": str(run / MODEL), "reused": True}
    tcfg = TrainClipConfig(video_root=str(out / "videos" / "train"), val=str(out / "videos" / "val"), out=str(run),
                           model=name, epochs=size.train_epochs, batch_size=size.train_batch_size,
                           lr=size.train_lr, dropout=size.train_dropout, clip_len=size.clip_len, size=size.size,
                           flip=False, val_clips=size.train_val_clips, seed=cfg.seed, device=cfg.device,
                           # tiny models and videos: one torch thread and one decoding process share 2 cores
                           threads=1, workers=1,
                           resume=any((run / f).exists() for f in (CONFIG, STATE, METRICS, MODEL)),
                           progress=cfg.progress, extra={"demo": "faster demo" + (" --quick" if cfg.quick else "")})
    threads = torch.get_num_threads()
    try:
        r = train_clip(tcfg, echo=cfg.echo)
    finally:
        torch.set_num_threads(threads)  # train_clip leaves its --threads set
    return {**r, "weights": str(run / MODEL), "reused": False}


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """Record the demo's settings in OUT/demo.json; refuse a directory holding a demo made otherwise."""
    path = out / "demo.json"
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if path.exists():
        if json.loads(path.read_text()) != settings:
            raise Incompatible(f"{str(out)!r} holds a demo made with other settings (see {path}); "
                             f"choose another -o or remove it")
        return
    if out.exists() and any(out.iterdir()):
        raise BadValue(f"{str(out)!r} is not empty and holds no demo: choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")
