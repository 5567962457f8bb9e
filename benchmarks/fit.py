"""Feature loading and aggregator training speed on Kinetics-shaped features.

    python benchmarks/fit.py                          # CPU, ~3-5 minutes on 2 cores
    python benchmarks/fit.py --device cuda --fit-videos 512

1. Loader throughput: the pattern-aware Dataset (faster.store.reader) behind fit's two loaders (one
   reader thread with reused buffers, workers=0; DataLoader worker processes) against a raw
   sequential h5py read of the same bytes in the same run, all from a cold page cache (every shard
   is evicted with posix_fadvise(DONTNEED) before each pass). Patterns: all-e (contiguous
   positions: one read per video) and 1:1 (per-position reads from two models). Goal: >= 0.8.
2. Seconds per training epoch for each aggregator (`faster fit`, pattern 1:1, 400 classes) on
   Kinetics-shaped videos: 8 clips x 4 x 7 x 7 x 2048 float16 per model (32-frame clips at 224 px,
   the paper's FASTER32 setting). The video count is scaled down to fit a few minutes on a CPU;
   seconds per video and the extrapolation to 2,000 videos are printed.
3. The training engine (faster/engine.py) against the loop a user would write: per aggregator, the
   seconds of fit's training epoch beside a plain PyTorch loop (the same aggregator, AdamW, the
   same batches read by the same loader, forward / backward / step) in the same run. Goal: >= 0.95.

Features are random (loading and training cost do not depend on their values).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (4, 7, 7, 2048)  # (T', H', W', C) of a 32-frame clip at 224 px
NUM_CLIPS = 8
AGGS = ("avg", "concat", "lstm", "gru", "fastgru")


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are clean: the writer fsyncs)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(shards: list[Path], sources: dict[str, tuple[str, list[int]]]) -> int:
    """Sequential h5py reads of the same bytes: shard by shard, video by video, position by position
    (a whole row in one read when the positions are all N)."""
    import h5py

    nbytes = 0
    for path in shards:
        with h5py.File(path, "r") as f:
            for model, pos in sources.values():
                ds = f[f"features/{model}"]
                for r in range(ds.shape[0]):
                    if pos == list(range(ds.shape[1])):
                        nbytes += ds[r].nbytes
                    else:
                        for p in pos:
                            nbytes += ds[r, p].nbytes
    return nbytes


def make_loader(feats: Path, sources: dict[str, tuple[str, list[int]]], workers: int, batch_size: int):
    """What fit uses: one reader thread with reused buffers (workers=0) or persistent DataLoader workers."""
    from torch.utils.data import DataLoader

    from faster.store.reader import FeatureSet, ThreadedLoader

    ds = FeatureSet([feats]).dataset(sources)
    if workers == 0:
        return ThreadedLoader(ds, batch_size)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=True)


def loader_read(loader, sources: dict[str, tuple[str, list[int]]]) -> int:
    nbytes = 0
    for batch in loader:
        nbytes += sum(batch[s].numel() * batch[s].element_size() for s in sources)
    return nbytes


def bench_loader(feats: Path, workers: list[int], batch_size: int, repeats: int) -> list[dict]:
    """For each loader in turn, raw and loader passes alternate ``repeats`` times (like epochs: the
    loader is built once), each from a cold cache. Reported: the best pass of each kind and their
    ratio, and the median ratio of back-to-back (raw, loader) pairs (the box is shared and noisy)."""
    from faster.store.reader import list_shards

    shards = list_shards(feats)
    rows = []
    for pattern, sources in (("all-e", {"expensive": ("exp", list(range(NUM_CLIPS)))}),
                             ("1:1", {"expensive": ("exp", [0, 2, 4, 6]), "cheap": ("chp", [1, 3, 5, 7])})):
        result: dict = {"pattern": pattern}
        for w in workers:  # one loader at a time (no idle DataLoader workers beside the thread's passes)
            loader = make_loader(feats, sources, w, batch_size)
            kinds = {"raw": lambda sources=sources: raw_read(shards, sources),
                     f"workers={w}": lambda loader=loader, sources=sources: loader_read(loader, sources)}
            ratios = []
            for _ in range(repeats):
                speed = {}
                for kind, fn in kinds.items():
                    evict(shards)
                    t = time.perf_counter()
                    nbytes = fn()
                    dt = time.perf_counter() - t
                    clips = nbytes // (int(np.prod(SHAPE)) * 2)
                    run = {"seconds": round(dt, 3), "MB": round(nbytes / 1e6, 1),
                           "MB/s": round(nbytes / 1e6 / dt, 1), "clips/s": round(clips / dt, 1)}
                    if kind not in result or run["MB/s"] > result[kind]["MB/s"]:
                        result[kind] = run
                    speed[kind] = nbytes / dt
                ratios.append(speed[f"workers={w}"] / speed["raw"])  # raw and loader back to back
            result[f"ratio workers={w}"] = round(result[f"workers={w}"]["MB/s"] / result["raw"]["MB/s"], 3)
            result[f"median pair ratio workers={w}"] = round(float(np.median(ratios)), 3)
            del loader
        rows.append(result)
    return rows


def bench_fit(feats: Path, val: Path, args: argparse.Namespace) -> list[dict]:
    from faster.aggregate.fit import FitConfig, fit

    rows = []
    for agg in args.aggs.split(","):
        out = feats.parent / f"run-{agg}"
        r = fit(FitConfig(feats=[str(feats)], val=[str(val)], out=str(out), agg=agg, expensive="exp", cheap="chp",
                          pattern="1:1", epochs=1, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, progress=False))
        m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        per_video = m["train_seconds"] / r["num_train"]
        rows.append({"agg": agg, "train_videos": r["num_train"], "epoch_seconds": m["train_seconds"],
                     "seconds_per_video": round(per_video, 4), "epoch_seconds_2000_videos": round(per_video * 2000, 1),
                     "aggregator_gflops": round(r["aggregator_gflops"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def hand_loop_seconds(feats: Path, agg: str, batch_size: int) -> tuple[float, int]:
    """(seconds, videos) of one epoch of the loop a user would write over fit's own loader."""
    import torch
    import torch.nn.functional as F

    from faster.aggregate import patterns
    from faster.aggregate.models import build
    from faster.store.reader import FeatureSet, ThreadedLoader

    fs = FeatureSet([str(feats)])
    mask = patterns.expensive_mask("1:1", NUM_CLIPS)
    sources = patterns.sources(list(range(NUM_CLIPS)), mask, "exp", "chp")
    shape = [SHAPE[-1], *SHAPE[:3]]
    model = build(agg, num_classes=len(fs.classes), sources={"expensive": shape, "cheap": shape}, dropout=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    ds = fs.dataset(sources)
    t = time.perf_counter()
    for batch in ThreadedLoader(ds, batch_size, shuffle=True):
        x = {src: batch[src].float() for src in ("expensive", "cheap")}
        loss = F.cross_entropy(model(x, mask), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ds.close()
    return time.perf_counter() - t, len(fs)


def bench_engine(feats: Path, fits: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for row in fits:
        seconds, videos = hand_loop_seconds(feats, row["agg"], args.batch_size)
        hand = seconds / videos
        rows.append({"agg": row["agg"], "engine_seconds_per_video": row["seconds_per_video"],
                     "hand_loop_seconds_per_video": round(hand, 4),
                     "engine_vs_hand_loop": round(hand / row["seconds_per_video"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=128, help="videos in the loader set (12.8 MB each: 2 models)")
    ap.add_argument("--repeats", type=int, default=5, help="cold-cache reads of each kind (best kept)")
    ap.add_argument("--loader-workers", default="0,2", help="loaders to compare with the raw read")
    ap.add_argument("--fit-videos", type=int, default=16, help="training videos for the per-epoch timing")
    ap.add_argument("--aggs", default=",".join(AGGS))
    ap.add_argument("--workers", type=int, default=0, help="fit's loader (0: the reader thread)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", help="scratch directory [default: a temporary one, removed after]")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    args = ap.parse_args()

    import torch

    from faster.aggregate.synthetic import write_synthetic

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="faster-bench-fit-"))
    models = {"exp": SHAPE, "chp": SHAPE}
    print(f"{platform.node()}: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    try:
        if not args.skip_loader:
            t = time.perf_counter()
            loader_set = write_synthetic(root / "loader", num_videos=args.videos, num_clips=NUM_CLIPS, clip_len=32,
                                         models=models, signal="none", shard_size=16, seed=0)
            print(f"wrote {args.videos} videos x 2 models x {NUM_CLIPS} clips x {SHAPE} float16 in "
                  f"{time.perf_counter() - t:.1f} s")
            workers = [int(w) for w in args.loader_workers.split(",")]
            print(f"loaders: workers=0 is one reader thread with reused buffers, workers=W persistent DataLoader "
                  f"workers; batch {args.batch_size}; best of {args.repeats} cold-cache passes")
            for row in bench_loader(loader_set, workers, args.batch_size, args.repeats):
                print(json.dumps(row), flush=True)
            shutil.rmtree(loader_set)
        if not args.skip_fit:
            feats = write_synthetic(root / "train", num_videos=args.fit_videos, num_clips=NUM_CLIPS, clip_len=32,
                                    models=models, signal="static", num_classes=400, shard_size=16, seed=1)
            val = write_synthetic(root / "val", num_videos=max(args.batch_size, 8), num_clips=NUM_CLIPS, clip_len=32,
                                  models=models, signal="static", num_classes=400, shard_size=16, seed=2,
                                  id_prefix="val")
            bench_engine(feats, bench_fit(feats, val, args), args)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
