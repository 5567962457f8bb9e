"""Scoring fitted aggregators: metrics, per-video prediction rows, and `faster evaluate`.

``score`` runs a schedule's module over a loader in eval mode; ``metrics`` gives top-1/top-5/mean
class accuracy; ``prediction_rows`` writes the per-video JSON lines that evaluate, fit's validation
and predict share (predict imports this module, not the training code).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def score(module: Any, schedule: Any, batches: Any, device: Any, *, progress: bool = False,
          desc: str = "evaluate", bf16: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """(probs (V, K) float32, labels (V,), indices (V,), mean loss over labelled videos, decisions
    (V, n) int8 per clip: 1 expensive, 0 cheap, -1 not read (an early exit)) of ``module`` under
    ``schedule`` (aggregate/schedule.py), in eval mode; ``bf16``: the forward under bf16 autocast."""
    import torch
    import torch.nn.functional as F

    from faster.aggregate.data import inputs
    from faster.progress import track

    module.eval()
    probs, labels, indices, chosen = [], [], [], []
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in track(batches, desc, unit="batch", enabled=progress):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits, decisions = schedule.forward(module, inputs(batch, device))
            logits = logits.float()
            d = decisions.float().cpu().numpy()
            chosen.append(np.where(d < -0.5, -1, d > 0.5).astype(np.int8))
            y = batch["label"].to(device)
            known = y >= 0
            if known.any():
                loss_sum += float(F.cross_entropy(logits[known], y[known], reduction="sum"))
                count += int(known.sum())
            probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
            labels.append(batch["label"].numpy().copy())  # a ThreadedLoader reuses its buffers
            indices.append(batch["index"].numpy().copy())

    def cat(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape)

    return (cat(probs, (0, 0)).astype(np.float32), cat(labels, (0,)).astype(np.int64),
            cat(indices, (0,)).astype(np.int64), loss_sum / max(count, 1),
            cat(chosen, (0, schedule.num_clips)).astype(np.int8))


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """top1, top5 (fractions) and mean per-class accuracy over the labelled videos."""
    known = labels >= 0
    p, y = probs[known], labels[known]
    if not len(y):
        return {"top1": None, "top5": None, "mean_class_acc": None, "num_labelled": 0}
    k = min(5, p.shape[1])
    topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
    hit1 = topk[:, 0] == y
    hit5 = (topk == y[:, None]).any(axis=1)
    per_class = [hit1[y == c].mean() for c in np.unique(y)]
    return {"top1": float(hit1.mean()), "top5": float(hit5.mean()), "mean_class_acc": float(np.mean(per_class)),
            "num_labelled": int(len(y))}


def prediction_rows(ids: Sequence[Any], labels: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                    gflops: Any, reports: Sequence[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Per-video JSON objects: id, label, probs, top5 [[class, prob], ...], gflops (one value, or one
    per video), and with ``reports`` each video's schedule report (num_expensive, num_cheap,
    clips_seen and, for a policy, expensive_clips, for an early exit exit_clip: aggregate/schedule.py
    ``Schedule.report``)."""
    k = min(5, len(classes))
    for i, (video_id, y, p) in enumerate(zip(ids, labels, probs)):
        top = np.argsort(-p, kind="stable")[:k]
        row = {"id": str(video_id), "label": int(y), "probs": [float(v) for v in p],
               "top5": [[classes[int(c)], float(p[c])] for c in top],
               "gflops": gflops if gflops is None or np.isscalar(gflops) else float(gflops[i])}
        if reports is not None:
            row.update(reports[i])
        yield row


def evaluate(run_dir: str | Path, feats: list[str], out: str | None = None, *, batch_size: int | None = None,
             workers: int | None = None, device: str | None = None, progress: bool = True,
             skip_bad: bool = False, order: str | None = None, dtype: str = "fp32") -> dict[str, Any]:
    """Score a fitted run on ``feats``; write per-video predictions (default RUN/predictions.jsonl);
    return the metrics over the labelled videos (top1, top5, mean_class_acc), the mean cost
    (gflops_per_video: only the clips read count), clips_seen_mean and the counts. ``order``: fold
    the clips in this order instead of the run's (refused for an early-exit run, whose thresholds
    belong to its order). ``dtype``: fp32 (as predict runs the aggregator: the same probabilities),
    or bf16 autocast (auto: where native), ~2x faster on bf16 hardware, probabilities to ~1e-2."""
    from faster.aggregate import data, run
    from faster.runtime import resolve_device, resolve_dtype
    from faster.store import files, integrity
    from faster.store.reader import FeatureSet

    t0 = time.perf_counter()
    fitted = run.Run.load(run_dir)
    dev = resolve_device(device or "auto")
    schedule = fitted.schedule if order is None else fitted.schedule.with_order(order)
    module = fitted.model(dev)
    checked = integrity.check(feats, skip_bad=skip_bad, models=[name for name, _ in fitted.sources().values()])
    fs = FeatureSet(feats, skip_shards=checked.bad_shards, skip_videos=checked.bad_videos)
    fitted.check_features(fs, str(feats))
    ds = fs.dataset(fitted.sources())
    batches = data.loader(ds, batch_size or fitted.config["batch_size"],
                          fitted.config["workers"] if workers is None else workers,
                          seed=fitted.config["seed"], pin=dev.type == "cuda")
    bf16 = resolve_dtype(dtype, dev) == "bfloat16"
    probs, labels, indices, loss, chosen = score(module, schedule, batches, dev, progress=progress, bf16=bf16)
    ds.close()
    clip_gflops = fitted.clip_gflops(fs, indices)  # backbones whose cost depends on the clip (VA-RED²)
    gflops = fitted.videos_gflops(chosen, clip_gflops)
    path = Path(out) if out else Path(run_dir) / run.PREDICTIONS
    files.write_jsonl(path, prediction_rows(fs.ids[indices], labels, probs, fitted.classes, gflops,
                                            [schedule.report(row) for row in chosen]))
    result = {**metrics(probs, labels), "loss": loss, "num_videos": int(len(indices)),
              "gflops_per_video": None if gflops is None or not len(gflops) else float(np.mean(gflops)),
              **({"clip_gflops_mean": fitted.backbone_clip_gflops(chosen, clip_gflops)} if clip_gflops else {}),
              "num_expensive_mean": float((chosen == 1).sum(1).mean()) if len(chosen) else None,
              "clips_seen_mean": float((chosen >= 0).sum(1).mean()) if len(chosen) else None,
              "order": schedule.order, "exit_budget": schedule.exit_budget, "precision": "bf16" if bf16 else "fp32",
              "agg": fitted.agg, "pattern": fitted.pattern, "num_clips": fitted.num_clips, "predictions": str(path),
              "skipped": {"shards": checked.bad_shards, "videos": checked.bad_videos},
              "seconds": round(time.perf_counter() - t0, 3)}
    log.info("evaluate %s: %d videos, top-1 %s", run_dir, len(indices), result["top1"])
    return result
