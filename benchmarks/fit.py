"""Feature loading and aggregator training speed on Kinetics-shaped features.

    python benchmarks/fit.py                          # CPU, ~5-7 minutes on 2 cores
    python benchmarks/fit.py --skip-loader --fit-videos 32 --engine-repeats 2
    python benchmarks/fit.py --device cuda --fit-videos 512

1. Loader throughput: the pattern-aware Dataset (faster.store.reader) behind fit's two loaders (one
   reader thread with reused buffers, workers=0; DataLoader worker processes) against a raw
   sequential h5py read of the same bytes in the same run, all from a cold page cache (every shard
   is evicted with posix_fadvise(DONTNEED) before each pass). Patterns: all-e (contiguous
   positions: one read per video) and 1:1 (per-position reads from two models). Goal: >= 0.8.
2. Seconds per training epoch for each aggregator (`faster fit`, pattern 1:1, 400 classes) on
   Kinetics-shaped videos: 8 clips x 4 x 7 x 7 x 2048 float16 per model (32-frame clips at 224 px,
   the paper's FASTER32 setting). The video count is scaled down to fit a few minutes on a CPU;
   seconds per video (the best warm epoch, see 3; the first epoch's beside it) and the
   extrapolation to 2,000 videos are printed.
3. The training engine (faster/engine.py) against the loop a user would write: per aggregator, the
   seconds of fit's training epoch beside a plain PyTorch loop (the same aggregator, AdamW, the
   same batches read by the same loader, forward / backward / step) in the same run: hand-loop /
   engine seconds of the best warm epoch (epochs after the first: both pay their one-time costs in
   the first), fit and hand loop in alternating order over --engine-repeats rounds. Goal: >= 0.95.
   (On a commit before the engine, the same script times fit's own loop.)

Each row also records every epoch's seconds and the 1-minute load average after each run: on a
shared box compare figures only at similar load.

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


def fit_epochs(feats: Path, val: Path, agg: str, args: argparse.Namespace) -> tuple[list[float], list[float], dict]:
    """(wall seconds, process CPU seconds of each epoch, result.json) of one `faster fit` of
    ``args.fit_epochs`` epochs. Wall: metrics.jsonl's train_seconds; CPU: around fit's epoch
    function (the engine's train_epoch; before the engine, aggregate/train.py's _train_epoch)."""
    try:
        from faster.aggregate.fit import FitConfig, fit
        from faster.engine import Engine as owner
        name = "train_epoch"
    except ImportError:  # before the training engine (commit 6adb2ef and older): fit's own loop
        import faster.aggregate.train as owner
        from faster.aggregate.train import FitConfig, fit
        name = "_train_epoch"

    cpu: list[float] = []
    inner = getattr(owner, name)

    def timed(*a, **k):
        t = time.process_time()
        try:
            return inner(*a, **k)
        finally:
            cpu.append(time.process_time() - t)

    out = feats.parent / f"run-{agg}"
    setattr(owner, name, timed)
    try:
        r = fit(FitConfig(feats=[str(feats)], val=[str(val)], out=str(out), agg=agg, expensive="exp", cheap="chp",
                          pattern="1:1", epochs=args.fit_epochs, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, progress=False, overwrite=True))
    finally:
        setattr(owner, name, inner)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(m["train_seconds"]) for m in rows], cpu, r


def hand_loop_epochs(feats: Path, agg: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """(wall, process CPU seconds) of each of ``args.fit_epochs`` epochs of the loop a user would
    write over fit's own loader (the same aggregator, AdamW, forward / backward / step; the model
    and loader built once)."""
    import torch
    import torch.nn.functional as F

    from faster.aggregate import patterns
    from faster.aggregate.models import build
    from faster.store.reader import FeatureSet, ThreadedLoader

    try:  # the aggregators take channels-last maps since the training engine; before it, channels first
        import faster.aggregate.fit  # noqa: F401
        old_layout = False
    except ImportError:
        old_layout = True
    fs = FeatureSet([str(feats)])
    mask = patterns.expensive_mask("1:1", NUM_CLIPS)
    sources = patterns.sources(list(range(NUM_CLIPS)), mask, "exp", "chp")
    shape = [SHAPE[-1], *SHAPE[:3]]
    device = torch.device(args.device)
    model = build(agg, num_classes=len(fs.classes), sources={"expensive": shape, "cheap": shape},
                  dropout=0.5).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    ds = fs.dataset(sources)
    loader = ThreadedLoader(ds, args.batch_size, shuffle=True, pin=device.type == "cuda")
    wall, cpu = [], []
    try:
        for _ in range(args.fit_epochs):
            t, c = time.perf_counter(), time.process_time()
            for batch in loader:
                x = {src: batch[src].to(device, non_blocking=True).float() for src in ("expensive", "cheap")}
                if old_layout:
                    x = {src: v.movedim(-1, 2) for src, v in x.items()}
                loss = F.cross_entropy(model(x, mask), batch["label"].to(device, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    finally:
        ds.close()
    return wall, cpu


def warm(runs: list[list[float]]) -> float:
    """The best epoch after the first of any run (the first epoch when there is only one)."""
    return min(s for run in runs for s in (run[1:] or run))


def rounded(runs: list[list[float]]) -> list[list[float]]:
    return [[round(s, 3) for s in run] for run in runs]


def bench_fit(feats: Path, val: Path, args: argparse.Namespace) -> list[dict]:
    """Per aggregator, ``args.engine_repeats`` rounds of a fit and a hand loop of ``args.fit_epochs``
    epochs each, the order alternating between rounds (fit first in the first). The first epoch of
    either pays one-time costs (allocations, cold caches, the optimiser's state): what is compared
    is the best later ("warm") epoch of each, in wall and in process CPU seconds (CPU seconds are
    less sensitive to other jobs on the box; with --threads 1 they count no idle OpenMP spinning).
    The first fit's first epoch is reported beside it (``cold_...``: what this script measured
    before, one epoch of one fit)."""
    rows = []
    for agg in args.aggs.split(","):
        fits, fits_cpu, hands, hands_cpu, loads = [], [], [], [], []
        result: dict = {}
        for rnd in range(max(args.engine_repeats, 1)):
            for kind in (("fit", "hand") if rnd % 2 == 0 else ("hand", "fit")):
                if kind == "fit":
                    wall, cpu, result = fit_epochs(feats, val, agg, args)
                    fits.append(wall)
                    fits_cpu.append(cpu)
                elif args.engine_repeats > 0:
                    wall, cpu = hand_loop_epochs(feats, agg, args)
                    hands.append(wall)
                    hands_cpu.append(cpu)
                else:
                    continue
                loads.append(os.getloadavg()[0])
        n = result["num_train"]
        row = {"agg": agg, "train_videos": n, "seconds_per_video": round(warm(fits) / n, 4),
               "cpu_seconds_per_video": round(warm(fits_cpu) / n, 4),
               "cold_seconds_per_video": round(fits[0][0] / n, 4),
               "epoch_seconds_2000_videos": round(warm(fits) / n * 2000, 1),
               "aggregator_gflops": round(result["aggregator_gflops"], 2)}
        if hands:
            row.update({"hand_loop_seconds_per_video": round(warm(hands) / n, 4),
                        "hand_loop_cpu_seconds_per_video": round(warm(hands_cpu) / n, 4),
                        "engine_vs_hand_loop": round(warm(hands) / warm(fits), 3),
                        "engine_vs_hand_loop_cpu": round(warm(hands_cpu) / warm(fits_cpu), 3)})
        row.update({"fit_epochs": rounded(fits), "fit_epochs_cpu": rounded(fits_cpu), "hand_loop_epochs": rounded(hands),
                    "hand_loop_epochs_cpu": rounded(hands_cpu), "load_average_1min": [round(x, 2) for x in loads]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=128, help="videos in the loader set (12.8 MB each: 2 models)")
    ap.add_argument("--repeats", type=int, default=5, help="cold-cache reads of each kind (best kept)")
    ap.add_argument("--loader-workers", default="0,2", help="loaders to compare with the raw read")
    ap.add_argument("--fit-videos", type=int, default=16, help="training videos for the per-epoch timing")
    ap.add_argument("--fit-epochs", type=int, default=2,
                    help="epochs of each fit and hand loop; epochs after the first are compared (warm)")
    ap.add_argument("--engine-repeats", type=int, default=1,
                    help="rounds of (fit, hand loop), order alternating, best warm epoch of each kept; "
                         "0: fit only, no hand loop")
    ap.add_argument("--aggs", default=",".join(AGGS))
    ap.add_argument("--workers", type=int, default=0, help="fit's loader (0: the reader thread)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads [default: torch's]")
    ap.add_argument("--dir", help="scratch directory [default: a temporary one, removed after]")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--skip-fit", action="store_true")
    args = ap.parse_args()

    import torch

    from faster.aggregate.synthetic import write_synthetic

    if args.threads:
        torch.set_num_threads(args.threads)
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
            bench_fit(feats, val, args)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
