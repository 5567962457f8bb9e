"""`faster demo`: the whole pipeline on a laptop CPU, end to end, in a few minutes.

1. Makes a small labelled set of videos whose class is a motion direction (faster.synthetic): a
   single frame cannot tell the class, the order of the clips can, so temporal aggregation matters.
2. Extracts the paper's expensive R(2+1)D-50 and cheap R2D-26 (Table 1; full architectures, at a
   small spatial size) over N clips of L = 8 frames per video, train and validation sets apart.
3. Runs a small ablation grid (aggregators x patterns first, 1:1, all-e: the paper's Tables 3
   and 4 in miniature) and returns where its tables and accuracy-vs-GFLOPs plot are.

Without ``weights`` the backbones are randomly initialised (seeded, recorded in the shards): the
accuracies then only show that the pipeline works, not what the method reaches. ``quick`` uses the
tiny backbone variants and fewer, smaller videos so that CI runs the demo in seconds.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faster.errors import BadFile, BadValue, Incompatible

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: videos, extraction and grid."""

    classes: tuple[str, ...]        # motion directions (faster.synthetic.DIRECTIONS)
    train_per_class: int            # training videos per class
    val_per_class: int              # validation videos per class (another seed: other videos)
    frames: int                     # frames per video
    video_size: int                 # side of the square videos, pixels
    style: str                      # faster.synthetic.STYLES: "plain" (same colours everywhere) or "textured"
    speed: tuple[float, float]      # range of the square's speed, pixels per frame at 64 px
    size: int                       # extraction crop size (the backbones see size x size)
    clip_len: int                   # L, frames per clip
    num_clips: int                  # N, clips extracted per video
    expensive: str                  # backbone names
    cheap: str
    aggs: tuple[str, ...]           # the grid
    patterns: tuple[str, ...]
    grid_clips: tuple[int, ...]
    epochs: int
    batch_size: int


FULL = DemoSize(classes=("left", "right", "up", "down"), train_per_class=20, val_per_class=5, frames=64,
                video_size=80, style="plain", speed=(1.0, 2.0), size=64, clip_len=8, num_clips=8,
                expensive="r2plus1d50", cheap="r2d26",
                aggs=("avg", "gru", "fastgru"), patterns=("first", "1:1", "all-e"), grid_clips=(8,), epochs=10,
                batch_size=20)  # large batches: on a CPU a step of a C=2048 aggregator is bound by weight reads
QUICK = DemoSize(classes=("left", "right", "up", "down"), train_per_class=3, val_per_class=2, frames=32,
                 video_size=64, style="plain", speed=(1.0, 2.0), size=32, clip_len=8, num_clips=4,
                 expensive="r2plus1d50_tiny", cheap="r2d26_tiny",
                 aggs=("avg", "fastgru"), patterns=("first", "all-e"), grid_clips=(4,), epochs=2, batch_size=8)


@dataclass
class DemoConfig:
    out: str = "faster-demo"                                  # everything the demo writes goes here
    quick: bool = False                                       # the CI size (QUICK) instead of FULL
    weights: dict[str, str] = field(default_factory=dict)     # backbone name -> weights file
    device: str = "auto"                                      # extraction and fitting device
    jobs: int = 1                                             # grid cells trained at once
    seed: int = 0                                             # videos, backbone init and fits
    progress: bool = True


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Make the videos, extract both backbones, run the grid; return the ablation summary plus timings.

    Running it again into the same directory reuses the videos' features and the finished cells.
    """
    size = QUICK if cfg.quick else FULL
    for name, path in cfg.weights.items():
        if name not in (size.expensive, size.cheap):
            raise BadValue(f"--weights {name}=...: the demo extracts {size.expensive} and {size.cheap}")
        if not Path(path).is_file():  # before any video is written
            raise BadFile(f"--weights {name}={path}: no such file")
    from faster import synthetic
    from faster.aggregate.ablate import AblateConfig, run_ablate
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
    extractions = {}
    for split in sets:
        ecfg = ExtractConfig(video_root=str(out / "videos" / split), out=str(out / "features" / split),
                             models=[size.expensive, size.cheap], weights=dict(cfg.weights),
                             clip_len=size.clip_len, num_clips=size.num_clips, size=size.size,
                             device=cfg.device, seed=cfg.seed, batch_size=size.num_clips, progress=cfg.progress,
                             workers=0)  # tiny synthetic videos: decoding in-process beats starting workers
        extractions[split] = extract_videos(ecfg)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    acfg = AblateConfig(feats=[str(out / "features" / "train")], out=str(out / "ablate"), aggs=list(size.aggs),
                        num_clips=list(size.grid_clips), patterns=list(size.patterns), seeds=[cfg.seed],
                        jobs=cfg.jobs, expensive=size.expensive, cheap=size.cheap, progress=cfg.progress,
                        fit={"val": [str(out / "features" / "val")], "epochs": size.epochs,
                             "batch_size": size.batch_size, "dropout": 0.2, "device": cfg.device,
                             "workers": 0})
    summary = run_ablate(acfg)
    timings["ablate"] = time.perf_counter() - t
    summary.update(extractions=extractions, timings={k: round(v, 1) for k, v in timings.items()},
                   random_init=sorted({size.expensive, size.cheap} - set(cfg.weights)), quick=cfg.quick)
    return summary


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
