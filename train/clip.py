"""`faster train-clip`: train one clip backbone with its head on videos (the paper's first stage).

The paper (Sec. "Implementation details"): the two clip backbones are trained separately before
the aggregator; training clips are L consecutive frames at a random start, short side in
[256, 320], a random 224 crop; SGD with a cosine learning rate; testing averages N uniform clips
(N x L = 256: Table 2). Defaults follow it and PySlowFast's Kinetics recipe (momentum 0.9,
Nesterov, weight decay 1e-4 without decay on norm and bias parameters, linear warmup, dropout
0.5). The loop is faster.engine's (DDP under torchrun, per-epoch and every ``save_every`` minutes
training state, exact ``--resume``); the data is faster.train.data's.

A backbone whose cost depends on the clip (VA-RED², faster.extract.models.vared) learns its gates
with the weights: the loss adds ``flops_weight`` x (mean expected cost fraction - ``--flops-target``)^2
(train.model.clip_cost reads the backbone's cost of the batch), the fraction being of the full
network's GFLOPs per clip.

The run directory (rank 0 writes): config.json; metrics.jsonl (a line per finished epoch: train
loss, val video@1 and clip@1, val GFLOPs per clip (each clip's own for a clip-dependent backbone,
which also gets ``cost_fraction``: the training batches' mean expected fraction), data wait, ...);
last.pt (the training state); model.pt (the weights with the best val video@1: a backbone file
`faster extract --weights NAME=RUN/model.pt` reads as it is, with its head, classes and
provenance: faster.train.model); failures.jsonl (videos that failed to decode, once per video and
phase); result.json once it finished (with the best epoch's val GFLOPs per clip).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadValue
from faster.store import files

log = logging.getLogger(__name__)

CONFIG, STATE, MODEL, METRICS, RESULT, FAILURES = ("config.json", "last.pt", "model.pt", "metrics.jsonl",
                                                   "result.json", "failures.jsonl")
# May differ between an interrupted run and its --resume (where and how fast it runs, not what it learns).
RESUME_FREE = ("resume", "overwrite", "progress", "workers", "device", "save_every", "timeout", "threads")
VAL_SPLITS = ("val", "valid", "validate", "validation")


@dataclass
class TrainClipConfig:
    """The options of `faster train-clip` (cli.py documents each)."""

    video_root: str
    out: str
    model: str
    init: str | None = None
    val: str | None = None
    annotations: str | None = None
    val_annotations: str | None = None
    classes_file: str | None = None
    val_fraction: float = 0.1
    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.0125
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    dropout: float = 0.5
    label_smoothing: float = 0.0
    sync_bn: bool = False
    clip_len: int = 8
    frame_stride: int = 1
    size: int = 224
    flip: bool = True
    val_clips: int | None = None  # default 256 // clip_len (Table 2)
    val_batch_size: int | None = None  # default batch_size
    flops_target: float | None = None  # a clip-dependent backbone's cost fraction to aim at; None: its default
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    workers: int = 2
    decoder: str = "auto"
    timeout: float = 300.0
    save_every: float = 10.0  # minutes
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the provenance (the demo's notes)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "clip_len", "frame_stride", "size"):
            if int(getattr(self, name)) < 1:
                raise BadValue(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.size < 8:
            raise BadValue(f"--size must be >= 8 pixels, got {self.size}")
        if not self.lr > 0:
            raise BadValue(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise BadValue(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise BadValue(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.val_fraction < 1:
            raise BadValue(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.flops_target is not None and not 0 < self.flops_target <= 1:
            raise BadValue(f"--flops-target must be in (0, 1], got {self.flops_target}")
        if self.val_clips is not None and self.val_clips < 1:
            raise BadValue(f"--val-clips must be >= 1, got {self.val_clips}")
        if not self.save_every > 0:
            raise BadValue(f"--save-every must be > 0 minutes, got {self.save_every}")
        if self.workers < 0:
            raise BadValue(f"--workers must be >= 0, got {self.workers}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise BadValue(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        from faster.extract import models
        from faster.extract.models.cost import feature_shape

        models.get(self.model)  # BadValue naming an unknown backbone, before any video is read
        feature_shape(self.model, self.clip_len, self.size)  # the backbone's own error for a clip it cannot take

    @property
    def num_val_clips(self) -> int:
        return self.val_clips or max(1, 256 // self.clip_len)

    def settings(self, precision: str) -> Any:
        from faster.engine import Settings

        return Settings(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, optimizer="sgd",
                        momentum=self.momentum, nesterov=self.nesterov, decay_norm_and_bias=False,
                        warmup_epochs=min(self.warmup_epochs, self.epochs), precision=precision)

    def record(self) -> dict[str, Any]:
        """config.json: every option, with the defaults resolved."""
        out = asdict(self)
        out["val_clips"] = self.num_val_clips
        return out


@dataclass
class Videos:
    """The labelled videos to train and validate on, and the class list."""

    train: list[Any]
    val: list[Any]
    classes: list[str]
    layout: str
    missing: list[Any]  # listed in the annotations but not found (stage missing), or refused before decoding (open)


def find_videos(cfg: TrainClipConfig, classes_file: str | None = None) -> Videos:
    """Training and validation videos: ``--val`` (a second root) when given, else the annotation
    file's split column (train / val), else a ``val_fraction`` held out by hashing ids. Only
    labelled videos; BadValue when there are none or fewer than two classes."""
    from faster.aggregate.data import holdout
    from faster.extract.video import discover

    found = discover(cfg.video_root, cfg.annotations, cfg.classes_file)
    if found.layout == "unlabelled":
        raise BadValue(f"{cfg.video_root}: no labels (put each class's videos in a folder named after it, or pass "
                       f"--annotations)")
    usable = [it for it in found.items if it.path is not None and it.label >= 0]
    missing = [it for it in found.items if it.path is None]
    if cfg.val is not None:
        listing = classes_file or cfg.classes_file
        val_found = discover(cfg.val, cfg.val_annotations, listing)
        train = [it for it in usable if (it.split or "train") not in VAL_SPLITS]
        val = [it for it in val_found.items if it.path is not None and it.label >= 0]
        if val_found.classes != found.classes:
            raise BadValue(f"--val {cfg.val}: its classes differ from the training videos' (pass --classes)")
    elif any(it.split for it in usable):
        train = [it for it in usable if it.split == "train"]
        val = [it for it in usable if it.split in VAL_SPLITS]
    else:
        held = holdout(np.array([it.id for it in usable]), cfg.val_fraction)
        train = [it for it, h in zip(usable, held) if not h]
        val = [it for it, h in zip(usable, held) if h]
    if not train:
        raise BadValue(f"{cfg.video_root}: no labelled training videos found")
    if len(found.classes) < 2:
        raise BadValue(f"{cfg.video_root}: found {len(found.classes)} class; training a classifier needs two or more")
    if not val:
        log.warning("no validation videos: model.pt is the last epoch's weights")
    return Videos(train, val, found.classes, found.layout, missing)


def _precision(dtype: str, device: Any) -> str:
    """--dtype auto: bf16 autocast on a CUDA device that supports it, else fp32; fp32 / bf16 as asked.
    Unlike fit and extract, auto stays fp32 on a CPU with native bf16: measured on an AVX512-BF16
    EPYC (2026-12-03, one training step, SGD, channels first), bf16 autocast is slower at the demo's
    32 px (r2d26_tiny 23.6 against 18.5 ms for 8 clips, r2plus1d50_tiny 64 against 57) and faster
    at 112 px (r2d26 1.23x, r2plus1d50 1.55x for 4 clips): there, pass --dtype bf16."""
    import torch

    if dtype == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return dtype


class _Failures:
    """failures.jsonl: each (video, phase) once; every rank's failures reach rank 0 at the end of a phase."""

    def __init__(self, path: Path, dist: Any):
        self.path, self.dist = path, dist
        self.seen = {(r.get("id"), r.get("phase")) for r in files.read_jsonl(path)} if path.exists() else set()
        self.pending: list[dict[str, Any]] = []

    def add(self, failed: Any, phase: str, epoch: int) -> None:
        from faster.store.manifest import failure_record

        if (failed.item.id, phase) in self.seen:
            return
        self.seen.add((failed.item.id, phase))
        log.warning("%s (%s): %s failed (%s): %s; replaced", failed.item.id, phase, failed.stage,
                    failed.item.path, failed.error)
        self.pending.append(failure_record(failed.item.id, failed.stage, failed.error, path=str(failed.item.path),
                                           phase=phase, epoch=epoch, **failed.extra))

    def flush(self) -> int:
        """Gather every rank's new failures; rank 0 appends them. Returns the number of records in the file."""
        rows = [r for part in self.dist.gather(self.pending) for r in part]
        self.pending = []
        if self.dist.main:
            known = {(r.get("id"), r.get("phase")) for r in files.read_jsonl(self.path)} if self.path.exists() else set()
            for r in rows:
                if (r["id"], r["phase"]) not in known:
                    files.append_jsonl(self.path, r)
                    known.add((r["id"], r["phase"]))
        self.seen |= {(r["id"], r["phase"]) for r in rows}
        return len({k for k in self.seen})


class _CostMeter:
    """Sums of a clip-dependent backbone's per-clip cost over an epoch: the expected fraction of the
    full cost in training, the GFLOPs of each clip in validation."""

    def __init__(self) -> None:
        self.total: Any = 0.0  # a device tensor once added to: read once, in mean(), not at every step
        self.count = 0

    def add(self, values: Any) -> None:
        self.total = self.total + values.detach().float().sum()
        self.count += int(values.numel())

    def mean(self, dist: Any) -> float | None:
        total, count = dist.sum([float(self.total), float(self.count)])
        self.total, self.count = 0.0, 0
        return total / count if count else None


def _train_step(aug: Any, mean: Any, std: Any, device: Any, smoothing: float, flops_target: float | None = None,
                flops_weight: float = 0.0, meter: _CostMeter | None = None) -> Callable[[Any, Any], tuple[Any, int]]:
    """The loss of one batch: cross-entropy, plus, for a backbone whose cost depends on the clip
    (``train.model.clip_cost``), ``flops_weight`` x (the batch's mean expected cost fraction -
    ``flops_target``)^2, the penalty that trains its gates toward the target (VA-RED²)."""
    from torch.nn import functional

    from faster.train.data import augment
    from faster.train.model import clip_cost

    def step(model: Any, batch: Any) -> tuple[Any, int]:
        frames = batch.frames.to(device, non_blocking=True)
        x = augment(frames, batch.params, aug, mean, std)
        logits = model(x)
        loss = functional.cross_entropy(logits.float(), batch.labels.to(device), label_smoothing=smoothing)
        cost = clip_cost(model) if flops_target is not None else None
        if cost is not None:
            fraction = cost[0].float() / cost[1]  # (B,)
            loss = loss + flops_weight * (fraction.mean() - flops_target) ** 2
            if meter is not None:
                meter.add(fraction)
        return loss, len(frames)

    return step


def _validate(cfg: TrainClipConfig, model: Any, videos: Videos, dist: Any, device: Any, engine: Any,
              failures: _Failures, epoch: int) -> dict[str, Any]:
    """This rank's share of the validation videos scored; every rank gets the pooled metrics."""
    from faster.train.data import validate, validation_sampling
    from faster.train.model import clip_cost

    share = videos.val[dist.rank::dist.world_size]
    t = time.perf_counter()
    meter = _CostMeter()
    hook = model.backbone.register_forward_hook(lambda m, i, o: meter.add(clip_cost(m)[0]) if clip_cost(m) else None)
    try:
        r = validate(model, share, validation_sampling(cfg.clip_len, cfg.num_val_clips, cfg.size, cfg.frame_stride),
                     device=device, batch_size=cfg.val_batch_size or cfg.batch_size, workers=cfg.workers,
                     autocast=engine.autocast, decoder=cfg.decoder, timeout=cfg.timeout,
                     on_failure=lambda f: failures.add(f, "val", epoch))
    finally:
        hook.remove()
    gflops = meter.mean(dist)  # a clip-dependent backbone: the mean over the validation clips
    correct = int(sum(int(np.argmax(p) == y) for p, y in zip(r["probs"], r["labels"])))
    videos_n, clip_correct, losses = len(r["labels"]), int(sum(r["clip_correct"])), 0.0
    if videos_n:
        probs = np.clip(r["probs"][np.arange(videos_n), np.asarray(r["labels"])], 1e-12, None)
        losses = float(-np.log(probs).sum())
    correct, videos_n, clip_correct, losses = dist.sum([correct, videos_n, clip_correct, losses])
    clips = videos_n * r["clips"]
    return {"video_top1": correct / videos_n if videos_n else None, "clip_top1": clip_correct / clips if clips else None,
            "val_loss": losses / videos_n if videos_n else None, "val_videos": int(videos_n),
            "gflops_per_clip": gflops if gflops is not None else _fixed_gflops(cfg),
            "val_seconds": round(time.perf_counter() - t, 3)}


def _fixed_gflops(cfg: TrainClipConfig) -> float:
    from faster.extract.models.cost import clip_gflops

    return clip_gflops(cfg.model, cfg.clip_len, cfg.size)


def train_clip(cfg: TrainClipConfig, *, dist: Any = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` with a fresh head on ``cfg.video_root``; write the run; return result.json."""
    import torch

    from faster.engine import Distributed, Engine, check_run_dir
    from faster.runtime import resolve_device
    from faster.train.data import Augment, EpochStream
    from faster.train.model import build_classifier, save_model

    t0 = time.perf_counter()
    cfg.validate()
    dist = Distributed.from_env() if dist is None else dist
    device = resolve_device(cfg.device, dist.local_rank)
    echo = echo if echo is not None and dist.main else (lambda line: None)
    out = Path(cfg.out)
    videos = find_videos(cfg)
    config = cfg.record()
    precision = _precision(cfg.dtype, device)
    if cfg.sync_bn and device.type != "cuda":
        raise BadValue("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_classifier(cfg.model, len(videos.classes), init=cfg.init, dropout=cfg.dropout, seed=cfg.seed)
    flops_target = _flops_target(cfg, model.backbone)
    config["flops_target"] = flops_target
    dist.start(device)
    resuming = bool(dist.decide(lambda: check_run_dir(out, config, resume=cfg.resume, overwrite=cfg.overwrite,
                                                      done=RESULT, partial=(CONFIG, STATE, METRICS, MODEL),
                                                      state=STATE, free=RESUME_FREE, what="train-clip"),
                                (ValueError,)))
    created = not out.exists()
    try:
        if dist.main:
            if not resuming:
                for name in (CONFIG, STATE, MODEL, METRICS, RESULT, FAILURES):
                    (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            files.write_json(out / CONFIG, config)
        dist.barrier()
        failures = _Failures(out / FAILURES, dist)
        for it in videos.missing if not resuming else []:
            if dist.main:
                files.append_jsonl(out / FAILURES, {"id": it.id, "stage": it.stage, "error": it.error or "not found",
                                                    "phase": "train"})
        if cfg.sync_bn and dist.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        aug = Augment.paper(cfg.clip_len, cfg.size, cfg.frame_stride, cfg.flip)
        share = len(dist.shard(np.arange(len(videos.train))))
        steps = max(1, share // cfg.batch_size)
        engine = Engine(model, cfg.settings(precision), device=device, steps_per_epoch=steps, dist=dist,
                        state_path=out / STATE, metrics_path=out / METRICS, progress=cfg.progress)
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between the ranks
        first, best = 1, {}
        if resuming:
            done, extra = engine.resume()
            first, best = done + 1, extra.get("best", {})
            log.info("resuming %s after epoch %d of %d", out, done, cfg.epochs)
        echo(f"train-clip {cfg.model}: {len(videos.train)} training / {len(videos.val)} validation videos, "
             f"{len(videos.classes)} classes; {dist.world_size} process(es) x batch {cfg.batch_size} = global batch "
             f"{cfg.batch_size * dist.world_size} at lr {cfg.lr:g}; {steps} steps per epoch on {device} ({precision})")
        meter = _CostMeter()
        step = _train_step(aug, model.backbone.mean, model.backbone.std, device, cfg.label_smoothing, flops_target,
                           float(getattr(model.backbone, "flops_weight", 0.0)), meter)
        val_row: dict[str, Any] = {}
        for epoch in range(first, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            if hasattr(model.backbone, "set_progress"):  # a backbone with a training schedule of its own (VA-RED²)
                model.backbone.set_progress((epoch - 1) / max(1, cfg.epochs - 1))
            partial = engine.partial if engine.partial and engine.partial.get("epoch") == epoch else None
            stream = EpochStream(videos.train, seed=cfg.seed, epoch=epoch, dist=dist, batch_size=cfg.batch_size, aug=aug,
                                 workers=cfg.workers, decoder=cfg.decoder, timeout=cfg.timeout,
                                 pin_memory=device.type == "cuda",
                                 start=int(partial["positions"][dist.rank]) if partial else 0,
                                 done=int(partial["steps"]) if partial else 0,
                                 on_failure=lambda f, e=epoch: failures.add(f, "train", e))
            stats = engine.train_epoch(epoch, stream, step, save_every=cfg.save_every * 60, position=stream.position,
                                       extra={"best": best})
            n_failed = failures.flush()
            cost_fraction = meter.mean(dist)
            val_row = _validate(cfg, model, videos, dist, device, engine, failures, epoch) if videos.val else {}
            n_failed = failures.flush()
            improved = bool(videos.val) and val_row["video_top1"] is not None and (
                not best or val_row["video_top1"] > best["video_top1"]
                # a clip-dependent backbone at the same accuracy: the cheaper epoch (the gates learn to save)
                or (flops_target is not None and val_row["video_top1"] == best["video_top1"]
                    and val_row["gflops_per_clip"] < best["gflops_per_clip"]))
            if improved or not videos.val:
                best = {"epoch": epoch, "video_top1": val_row.get("video_top1"), "clip_top1": val_row.get("clip_top1"),
                        "gflops_per_clip": val_row.get("gflops_per_clip")}
                if dist.main:
                    save_model(model, out / MODEL, videos.classes, _provenance(cfg, videos, epoch, val_row))
            rate = stats["samples"] / stats["train_seconds"] if stats["train_seconds"] else 0.0
            row = {"train_loss": stats["train_loss"], **val_row, "lr": stats["lr"], "steps": stats["steps"],
                   "samples": stats["samples"], "clips_per_s": round(rate, 2), "data_wait": stats["data_wait"],
                   "train_seconds": stats["train_seconds"], "failures": n_failed,
                   **({"cost_fraction": cost_fraction} if cost_fraction is not None else {}),
                   "seconds": round(time.perf_counter() - t_epoch, 3)}
            engine.end_epoch(epoch, row, {"best": best})
            vals = (f", val video@1 {val_row['video_top1']:.4f}, clip@1 {val_row['clip_top1']:.4f}"
                    if val_row.get("video_top1") is not None else "")
            if cost_fraction is not None:
                vals += (f"; cost {100 * cost_fraction:.0f}% of full (train, expected)"
                         + (f", {val_row['gflops_per_clip']:.4g} GFLOPs/clip (val)" if val_row else ""))
            echo(f"epoch {epoch}/{cfg.epochs}: train loss {stats['train_loss']:.4f}{vals}; {rate:.1f} clips/s, "
                 f"{100 * stats['data_wait']:.0f}% of the step time waiting for data")
        result = None
        if dist.main:
            metrics = files.read_jsonl(out / METRICS)
            last = metrics[-1] if metrics else {}
            result = {"model": cfg.model, "weights": str(out / MODEL), "video_top1": best.get("video_top1"),
                      "clip_top1": best.get("clip_top1"), "best_epoch": best.get("epoch"),
                      "gflops_per_clip": best.get("gflops_per_clip"), "full_gflops_per_clip": _fixed_gflops(cfg),
                      "flops_target": flops_target,
                      "last_video_top1": last.get("video_top1"), "last_clip_top1": last.get("clip_top1"),
                      "epochs": cfg.epochs, "world_size": dist.world_size,
                      "global_batch_size": cfg.batch_size * dist.world_size, "lr": cfg.lr, "precision": precision,
                      "num_train": len(videos.train), "num_val": len(videos.val), "num_classes": len(videos.classes),
                      "classes": videos.classes, "failures": len(failures.seen),
                      "train_seconds": round(sum(float(m.get("train_seconds", 0)) for m in metrics), 3),
                      "val_seconds": round(sum(float(m.get("val_seconds", 0) or 0) for m in metrics), 3),
                      "data_wait": round(float(np.mean([m.get("data_wait", 0) for m in metrics])), 4) if metrics else 0,
                      "seconds": round(time.perf_counter() - t0, 3), "device": str(device)}
            files.write_json(out / RESULT, result)
        dist.barrier()
    except BaseException:
        if dist.main and not (out / STATE).exists():  # nothing resumable yet: leave no half run that looks like one
            for name in (CONFIG, METRICS, MODEL, FAILURES):
                (out / name).unlink(missing_ok=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        dist.stop()
    return result if result is not None else files.read_json(out / RESULT)


def _flops_target(cfg: TrainClipConfig, backbone: Any) -> float | None:
    """The FLOPs target of this run: --flops-target, else the backbone's default (VA-RED²: 0.6);
    None for a backbone whose cost does not depend on the clip (BadValue if one was asked for)."""
    default = getattr(backbone, "default_flops_target", None)
    if default is None:
        if cfg.flops_target is not None:
            raise BadValue(f"--flops-target: {cfg.model} costs the same for every clip; it applies to backbones whose "
                           f"cost depends on the clip (vared_*)")
        return None
    target = float(cfg.flops_target if cfg.flops_target is not None else default)
    table = backbone.cost_table(cfg.clip_len, cfg.size)
    floor = table["cheapest"] / table["full"]
    if target < floor:  # reachable only by the cheapest path everywhere: the penalty then outweighs accuracy
        log.warning("--flops-target %.2f is below what %s can reach at %d x %d px (%.2f of its GFLOPs: the stem and "
                    "the shortcuts always run in full): its gates will be pushed to the cheapest path for every clip",
                    target, cfg.model, cfg.clip_len, cfg.size, floor)
    return target


def _provenance(cfg: TrainClipConfig, videos: Videos, epoch: int, val_row: dict[str, Any]) -> dict[str, Any]:
    return {"trained_by": "faster train-clip", "video_root": str(cfg.video_root), "layout": videos.layout,
            "annotations": cfg.annotations, "num_train": len(videos.train), "num_val": len(videos.val),
            "epoch": epoch, "epochs": cfg.epochs, "val_video_top1": val_row.get("video_top1"),
            "val_clip_top1": val_row.get("clip_top1"), "clip_len": cfg.clip_len, "frame_stride": cfg.frame_stride,
            "size": cfg.size, "init": cfg.init, "seed": cfg.seed, **cfg.extra}
