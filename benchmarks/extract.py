"""Extraction throughput: decode-only, model-only and the full `faster extract` pipeline, in one run.

    python benchmarks/extract.py                                   # CPU: r2d26, 8 x 112 px, 8 videos
    python benchmarks/extract.py --model r2plus1d50 --model r2d26 --videos 4
    python benchmarks/extract.py --device cuda --size 224 --videos 32 --batch-size 32

Videos are Kinetics-shaped (340x256, 10 s at 30 fps, H.264; generated once with faster.synthetic
and cached under the temp dir). Every stage processes the same videos with the same settings as
`faster extract` (N x L = 256 frames per video):

* decode-only: the decode worker pool (``--workers`` processes, uint8 frames to the main process);
* model-only: every backbone over the already decoded clips (batches of ``--batch-size``);
* pipeline: ``extract_videos`` end to end, shards written: its whole time less one build of the
  models (timed here beforehand). Not its ``run_seconds``: the decode workers start before the
  models are built, so the loop that ``run_seconds`` times finds the first videos decoded already.

Printed: clips/s of each stage and the ratio of seconds pipeline / (decode + model). On a CPU the
stages share the cores, so the pipeline cannot beat their sum; the goal is <= 1.1 (no overhead
beyond the two stages). On CUDA the stages run on different hardware and should overlap: the
goal is pipeline / max(decode, model) <= 1.1. Beside them, the device's bf16 matmul rate measured
in the same run, and model-only and pipeline GFLOP/s as fractions of it.

    python benchmarks/extract.py --startup               # start-up, in subprocesses (one run)

``--startup`` measures what a short job pays: `python -c "import torch, decord, h5py"`, `faster
extract` on a directory where nothing is left to do, `faster flops`, and the whole `faster extract`
process on 12 short videos against the loop a user writes by hand (decord + one clip at a time
through the same backbone, np.save per video), each the best of 3, the commands interleaved round
by round (``--baseline DIR``: also an older faster's extract, from DIR/faster, in the same rounds).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from backbones import cpu_model, matmul_rate  # benchmarks/backbones.py, beside this script

from faster import runtime, synthetic
from faster.extract import decoders, pipeline, video

CACHE = Path(tempfile.gettempdir()) / "faster-bench-kinetics-340x256-10s-v1"


def make_videos(n: int) -> Path:
    """A folder of ``n`` Kinetics-shaped videos (links into CACHE/pool, where each is written once)."""
    pool, root = CACHE / "pool", CACHE / f"set-{n}"
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = pool / f"video_{i:03d}.mp4"
        if not path.exists():
            tmp = pool / f".tmp_{i:03d}.mp4"
            synthetic.write_kinetics_like(tmp, seconds=10.0, fps=30, width=340, height=256, seed=i)
            os.replace(tmp, path)
        if not (root / path.name).exists():
            (root / path.name).symlink_to(path)
    return root


def decode_only(items, cfg: pipeline.ExtractConfig, pin: bool) -> tuple[float, list]:
    """Seconds to decode every video through the worker pool, and the decoded frames."""
    frames = []
    t0 = time.perf_counter()
    with decoders.DecodePool(items, cfg.sampling, workers=cfg.workers, timeout=cfg.timeout, pin_memory=pin,
                             decoder=cfg.decoder) as pool:
        for r in pool:
            if isinstance(r, decoders.Failed):
                raise RuntimeError(f"{r.item.id}: {r.stage}: {r.error}")
            frames.append(r.frames)
    return time.perf_counter() - t0, frames


def model_only(models: pipeline.ClipModels, frames: list) -> float:
    """Seconds to run every backbone over every decoded clip, in batches as the pipeline forms them."""
    clips = torch.cat(frames)  # (V*N, L, S, S, 3) uint8
    if models.cuda:
        clips = clips.to(models.device)
        models(clips[: models.batch_size])  # cudnn.benchmark tuning outside the timing
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, clips.shape[0], models.batch_size):
        models(clips[start:start + models.batch_size])
    if models.cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="backbone (repeat); default r2d26")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--num-clips", type=int, help="default 256 // clip-len")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="CPU: torch threads for model-only and pipeline "
                                                "(sets OMP_NUM_THREADS; default: faster's choice)")
    ap.add_argument("--dtype", default="auto", choices=runtime.DTYPES)
    ap.add_argument("--startup", action="store_true", help="measure start-up and short jobs instead (see above)")
    ap.add_argument("--baseline", help="with --startup: also time `faster extract` imported from this directory "
                                       "(holding an older checkout as faster/), interleaved")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.startup:
        startup(args)
        return

    root = make_videos(args.videos)
    out = Path(tempfile.mkdtemp(prefix="faster-bench-extract-"))
    cfg = pipeline.ExtractConfig(str(root), str(out / "feats"), tuple(args.model or ["r2d26"]), clip_len=args.clip_len,
                                 num_clips=args.num_clips, size=args.size, batch_size=args.batch_size,
                                 workers=args.workers, device=args.device, progress=False, shard_size=64,
                                 dtype=args.dtype)
    device = runtime.resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(runtime.cpu_threads(cfg.workers))
    else:
        torch.backends.cudnn.benchmark = True
    items = video.discover(root).items
    clips = len(items) * cfg.num_clips
    decoders.warm_up_workers()
    models = pipeline.ClipModels(cfg, device, pipeline._compute_dtype(cfg, device, out / "feats"))
    t0 = time.perf_counter()
    models.load()
    t_load = time.perf_counter() - t0  # what extract_videos also spends building them, before its loop
    if device.type == "cpu":  # the threads extract_videos gives these models (heavy ones take every core)
        torch.set_num_threads(runtime.cpu_threads(cfg.workers, gflops_per_clip=sum(
            h.gflops_per_clip for h in models.headers.values())))
    bf16_rate = matmul_rate(torch.bfloat16, device)
    try:
        t_decode, frames = decode_only(items, cfg, pin=models.cuda)
        models(frames[0][: cfg.batch_size].to(models.device))  # warm-up forward
        t_model = model_only(models, frames)
        del frames
        summary = pipeline.extract_videos(cfg)
        t_pipe = summary["seconds"] - t_load
        assert summary["extracted"] == len(items), summary
    finally:
        shutil.rmtree(out, ignore_errors=True)

    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpu_model()} "
          f"({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{len(items)} videos 340x256 10 s 30 fps H.264; models {', '.join(cfg.models)}; {cfg.num_clips} clips x "
          f"{cfg.clip_len} frames at {cfg.size} px; batch {cfg.batch_size}; {cfg.workers} decode workers; {device} "
          f"({models.compute_dtype})")
    gflops = sum(models.headers[m].gflops_per_clip for m in cfg.models)  # per clip, every model
    print(f"bf16 matmul ceiling {bf16_rate:.1f} G multiply-adds/s in this run")
    print("| stage | seconds | clips/s | GFLOP/s | vs bf16 matmul |\n|---|---|---|---|---|")
    for name, t in (("decode only", t_decode), ("model only", t_model), ("pipeline", t_pipe)):
        rate = "-" if name == "decode only" else f"{clips / t * gflops:.1f}"
        frac = "-" if name == "decode only" else f"{clips / t * gflops / bf16_rate:.2f}"
        print(f"| {name} | {t:.2f} | {clips / t:.1f} | {rate} | {frac} |")
    if device.type == "cpu":
        print(f"pipeline / (decode + model) = {t_pipe / (t_decode + t_model):.3f}  (goal <= 1.1)")
    else:
        print(f"pipeline / max(decode, model) = {t_pipe / max(t_decode, t_model):.3f}  (goal <= 1.1)")


HAND_LOOP = """
import sys, numpy as np, torch, decord
from pathlib import Path
from faster.extract import models
from faster.sampling import clip_starts
root, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(exist_ok=True)
model = models.build("r2d26", seed=0).eval()
mean = torch.tensor(model.mean).view(1, 3, 1, 1, 1)
std = torch.tensor(model.std).view(1, 3, 1, 1, 1)
for path in sorted(root.glob("*.mp4")):
    vr = decord.VideoReader(str(path), num_threads=1, width=64, height=64)
    maps = []
    for s in clip_starts(len(vr), 4, 8):
        x = torch.from_numpy(vr.get_batch(list(range(s, s + 8))).asnumpy()).permute(3, 0, 1, 2)[None].float() / 255
        with torch.no_grad():
            maps.append(model((x - mean) / std).numpy())
    np.save(out / (path.stem + ".npy"), np.concatenate(maps))
"""


def startup(args: argparse.Namespace) -> None:
    """Start-up figures, each the best of 3 whole processes, the commands interleaved round by round;
    with ``--baseline DIR`` also `faster extract` imported from DIR (a checkout of an older faster
    as DIR/faster), in the same rounds."""
    import sys

    from backbones import best_of_processes

    work = Path(tempfile.mkdtemp(prefix="faster-bench-startup-"))
    try:
        videos = work / "videos"
        for i in range(12):  # 12 short videos (2 s at 64 px), the size where start-up dominates
            synthetic.write_video(videos / f"v{i:02d}.mp4", synthetic.motion_frames("left", frames=60, size=64, seed=i))
        faster = [sys.executable, "-m", "faster"]
        extract = [*faster, "extract", str(videos), "--model", "r2d26", "--size", "64", "--num-clips", "4",
                   "--no-progress", "--allow-empty", "--unlabelled"]
        best_of_processes({"fill caches": [*extract, "-o", str(work / "done")]}, repeats=1)
        commands = {
            "import": [sys.executable, "-c", "import torch, decord, h5py"],
            "nothing": [*extract, "-o", str(work / "done")],
            "flops": [*faster, "flops"],
            "torch": [sys.executable, "-c", "import torch"],
            "whole": lambda k: [*extract, "-o", str(work / f"new{k}")],
            "hand": lambda k: [sys.executable, "-c", HAND_LOOP, str(videos), str(work / f"hand{k}")],
            # one torch thread: on a CPU shared with other jobs torch's default (a thread per core) can
            # make the hand loop several times slower (OpenMP threads waiting on each other)
            "hand1": (lambda k: [sys.executable, "-c", HAND_LOOP, str(videos), str(work / f"hand1-{k}")],
                      {"OMP_NUM_THREADS": "1"}),
        }
        if args.baseline:
            commands["baseline"] = (lambda k: [*extract, "-o", str(work / f"old{k}")], {"PYTHONPATH": args.baseline})
        t = best_of_processes(commands, repeats=3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpu_model()} "
          f"({len(os.sched_getaffinity(0))} cores), load average {os.getloadavg()[0]:.1f}; best of 3 processes, "
          f"interleaved")
    print("| figure | seconds | ratio | goal |\n|---|---|---|---|")
    print(f"| python -c 'import torch, decord, h5py' | {t['import']:.2f} | 1.00 | |")
    print(f"| faster extract, nothing left to do | {t['nothing']:.2f} | {t['nothing'] / t['import']:.2f} x import | "
          f"<= 1.3 |")
    print(f"| python -c 'import torch' | {t['torch']:.2f} | | |")
    print(f"| faster flops | {t['flops']:.2f} | +{t['flops'] - t['torch']:.2f} s beyond import torch | < 1 s |")
    for name, what in (("whole", "faster extract, 12 short videos (whole process)"),
                       ("baseline", f"the same, faster from {args.baseline}")):
        if name in t:
            print(f"| {what} | {t[name]:.2f} | {t['hand'] / t[name]:.2f} x the hand loop's speed, "
                  f"{t['hand1'] / t[name]:.2f} x its speed on 1 thread | >= 1 |")
    print(f"| hand-written decord + per-clip loop | {t['hand']:.2f} | | |")
    print(f"| the same, OMP_NUM_THREADS=1 | {t['hand1']:.2f} | | |")


if __name__ == "__main__":
    main()
