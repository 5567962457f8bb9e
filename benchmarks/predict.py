"""Runtime vs. FLOPs of `faster predict` (the paper's Table 5 on this hardware).

    python benchmarks/predict.py                    # CPU: R(2+1)D-50 + R2D-26 at 112 px, 8 x 8-frame clips, 3 videos
    python benchmarks/predict.py --size 224 --clip-len 32 --num-clips 8 --videos 20 --device cuda

Makes Kinetics-shaped videos (340x256, H.264), extracts both backbones' features once, fits the
four runs of Table 5 / Table 4 (all-c and all-e with the avg-pool aggregator, 1:1 and 1:3 with
FAST-GRU; one epoch each: timing does not depend on accuracy), a learned policy (pattern
adaptive, FAST-GRU, budget 0.25: the cheap backbone on every clip, the expensive one where its gate
says, clip by clip) and an early exit (all-e, FAST-GRU, ``--early-exit --exit-budget 0.5`` in
coarse-to-fine order: clip by clip, the video left once its prediction is sure enough, its clips
decoded on demand), and then times `predict` of each run on the same videos:

* ``model s``: the backbones and the aggregator on already decoded clips (what the FLOPs count);
* ``end-to-end s``: `iter_predict` decoding in the main process (`--workers 0`: decode, then model,
  per video, no worker start-up in the figure), decoding included.

Each figure is the best of ``--repeats`` passes after one warm-up video, the patterns timed in
interleaved rounds; ``model CPU s`` is the process's CPU time for the same work (robust to other
jobs sharing a small CPU, whose load inflates wall times). The paper's claim (Table 5:
"the reduction of FLOPs is roughly proportional to the decrease of runtime") is checked as
time saved / FLOPs saved against all-e, both 1 - x / x(all-e); the goal on a GPU is >= 0.8.

    python benchmarks/predict.py --startup --num-clips 4 --videos 4 --seconds 2 [--baseline DIR]

``--startup`` times instead what one short video costs a user: the whole `faster predict` process
(1:3 FAST-GRU, default workers) against `python -c "import torch, decord, h5py"` (goal: <= 2x).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from backbones import cpu_model  # benchmarks/backbones.py, beside this script

RUNS = (("all-c", "avg", None, None), ("all-e", "avg", None, None), ("1:1", "fastgru", None, None),
        ("1:3", "fastgru", None, None), ("adaptive", "fastgru", 0.25, None),
        ("all-e", "fastgru", None, 0.5))  # (pattern, aggregator, budget, exit budget)


def label(pattern: str, budget: float | None, exit_budget: float | None) -> str:
    """A run's row name: the pattern, "adaptive B=0.25", "all-e + exit F=0.5"."""
    name = pattern if budget is None else f"{pattern} B={budget:g}"
    return name if exit_budget is None else f"{name} + exit F={exit_budget:g}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(work: Path, args: argparse.Namespace, runs: tuple = RUNS) -> dict[str, Path]:
    """Videos, features and the ``runs`` (default: every one of RUNS) under ``work`` (reused when already there)."""
    from faster import synthetic
    from faster.aggregate.fit import FitConfig, fit
    from faster.extract.pipeline import ExtractConfig, extract_videos

    videos, feats = work / "videos", work / "feats"
    for i in range(args.videos):
        path = videos / f"class_{i % 2}" / f"video_{i:03d}.mp4"  # two classes: the fits need labels
        if not path.exists():
            synthetic.write_kinetics_like(path, seconds=args.seconds, seed=i)
    if not any(feats.glob("shard-*.h5")):
        extract_videos(ExtractConfig(str(videos), str(feats), (args.expensive, args.cheap), clip_len=args.clip_len,
                                  num_clips=args.num_clips, size=args.size, workers=1, device=args.device,
                                  progress=False))
    made = {}
    for pattern, agg, budget, exit_budget in runs:
        out = work / (f"run-{agg}-{pattern.replace(':', '_')}" + ("" if exit_budget is None else f"-exit{exit_budget:g}"))
        if not (out / "result.json").exists():
            fit(FitConfig([str(feats)], str(out), agg, args.expensive, args.cheap, pattern, budget=budget,
                          val=[str(feats)], epochs=1, batch_size=4, workers=0, device=args.device, progress=False,
                          early_exit=exit_budget is not None, exit_budget=exit_budget))
        made[label(pattern, budget, exit_budget)] = out
    return {"videos": videos, **made}


def time_runs(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per pattern: cost and the best of ``args.repeats`` timings. Patterns are timed in interleaved
    rounds, so a burst of load from other processes hits all of them alike."""
    from faster.predict import PredictConfig, Predictor, decoded_videos, iter_predict, list_videos

    runs = {}
    for spec in RUNS:
        pattern = label(spec[0], spec[2], spec[3])
        predictor = Predictor(paths[pattern], device=args.device, batch_size=args.batch_size)
        items = list_videos([str(paths["videos"])], predictor.run.classes)
        clips = [d.frames for _, d in decoded_videos(items, predictor.run, workers=0)]
        predictor.classify(clips[0])  # warm-up: kernel selection, allocator
        records = [predictor.classify(c) for c in clips]  # a policy's cost differs per video: sum what ran
        cfg = PredictConfig(videos=[str(paths["videos"])], run=str(paths[pattern]), device=args.device,
                            batch_size=args.batch_size, workers=0)
        runs[pattern] = {"predictor": predictor, "clips": clips, "cfg": cfg,
                         "result": {"gflops": sum(r["gflops"] for r in records),
                                    "num_expensive": sum(r["num_expensive"] for r in records) / len(records),
                                    "num_cheap": sum(r["num_cheap"] for r in records) / len(records),
                                    "clips_seen": sum(r["clips_seen"] for r in records) / len(records),
                                    "model_s": [], "model_cpu_s": [], "e2e_s": []}}
    for _ in range(args.repeats):
        for r in runs.values():
            _sync(r["predictor"].device)
            t0, c0 = time.perf_counter(), time.process_time()
            for c in r["clips"]:
                r["predictor"].classify(c)
            _sync(r["predictor"].device)
            r["result"]["model_s"].append(time.perf_counter() - t0)
            r["result"]["model_cpu_s"].append(time.process_time() - c0)
        for r in runs.values():
            t0 = time.perf_counter()
            records = list(iter_predict(r["cfg"], r["predictor"]))
            _sync(r["predictor"].device)
            r["result"]["e2e_s"].append(time.perf_counter() - t0)
            assert all("error" not in x for x in records), [x for x in records if "error" in x]
    out = {"parts": time_parts(runs["1:1"]["predictor"], runs["1:1"]["clips"][0], args.repeats)}
    for pattern, r in runs.items():
        res = r["result"]
        out[pattern] = {**res, **{k: min(res[k]) for k in ("model_s", "model_cpu_s", "e2e_s")},
                        "all": {k: res[k] for k in ("model_s", "model_cpu_s", "e2e_s")}}
    return out


def time_parts(predictor, clips: torch.Tensor, repeats: int) -> dict[str, float]:
    """Where a mixed pattern's time goes: wall ms per clip of each backbone (a batch of all of one
    video's clips) and per aggregator step, best of ``repeats``."""

    spec, n = predictor.run, clips.shape[0]
    parts: dict[str, float] = {}
    with torch.inference_mode():
        for role, name in (("expensive", spec.expensive), ("cheap", spec.cheap)):
            best = float("inf")
            for _ in range(repeats):
                _sync(predictor.device)
                t0 = time.perf_counter()
                maps = predictor.features(name, clips)
                _sync(predictor.device)
                best = min(best, time.perf_counter() - t0)
            parts[f"{role}_ms_per_clip"] = 1e3 * best / n
            parts[f"{role}_gflops_per_clip"] = float(spec.models[name]["gflops_per_clip"])
        agg, best = predictor.aggregator, float("inf")
        for _ in range(repeats):
            _sync(predictor.device)
            t0 = time.perf_counter()
            state = agg.init_state(1, predictor.device)
            for k in range(n):
                state = agg.step(state, maps[k:k + 1], expensive=False)
                agg.logits(state).float().cpu()
            best = min(best, time.perf_counter() - t0)
        parts["aggregator_ms_per_step"] = 1e3 * best / n
        parts["aggregator_gflops_per_step"] = spec.agg_gflops / max(n - 1, 1)
    return parts


def startup(args: argparse.Namespace) -> None:
    """Whole-process `faster predict` of one short video against `python -c "import torch, decord,
    h5py"`, each the best of ``--repeats`` processes, interleaved round by round (``--baseline DIR``:
    also an older faster's predict, from DIR/faster, in the same rounds)."""
    import os
    import sys

    from backbones import best_of_processes

    run_spec = ("1:3", "fastgru", None, None)
    with tempfile.TemporaryDirectory(prefix="faster-bench-predict-startup-") as tmp:
        work = Path(args.work or tmp)
        paths = prepare(work, args, runs=(run_spec,))
        one = sorted(paths["videos"].rglob("*.mp4"))[0]
        run = paths[label(run_spec[0], run_spec[2], run_spec[3])]
        predict = [sys.executable, "-m", "faster", "predict", "--run", str(run), str(one), "--device", args.device,
                   "--no-progress"]
        commands = {"import": [sys.executable, "-c", "import torch, decord, h5py"],
                    "predict": lambda k: [*predict, "-o", str(work / f"new{k}.jsonl")]}
        if args.baseline:
            commands["baseline"] = (lambda k: [*predict, "-o", str(work / f"old{k}.jsonl")],
                                    {"PYTHONPATH": args.baseline})
        t = best_of_processes(commands, repeats=args.repeats)
    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpu_model()} "
          f"({len(os.sched_getaffinity(0))} cores), load average {os.getloadavg()[0]:.1f}; best of {args.repeats} "
          f"processes, interleaved")
    print(f"faster predict of one {args.seconds:g} s 340x256 video: 1:3 FAST-GRU over {args.expensive} + {args.cheap} "
          f"(random init) at {args.size} px, {args.num_clips} clips of {args.clip_len} frames, default workers")
    print("| figure | seconds | ratio | goal |\n|---|---|---|---|")
    print(f"| python -c 'import torch, decord, h5py' | {t['import']:.2f} | 1.00 | |")
    print(f"| faster predict, one short video (whole process) | {t['predict']:.2f} | {t['predict'] / t['import']:.2f} "
          f"x import | <= 2 |")
    if args.baseline:
        print(f"| the same, faster from {args.baseline} | {t['baseline']:.2f} | {t['baseline'] / t['import']:.2f} "
              f"x import | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expensive", default="r2plus1d50")
    p.add_argument("--cheap", default="r2d26")
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="length of each generated video")
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--num-clips", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=8, help="clips per backbone forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", help="directory for videos, features and runs [default: a temporary one]")
    p.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]; 1 is steadier on a shared CPU")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    p.add_argument("--startup", action="store_true", help="time one short video's whole `faster predict` process "
                   "instead (1:3 FAST-GRU; use with --num-clips 4 --videos 4 --seconds 2)")
    p.add_argument("--baseline", help="with --startup: also time `faster predict` imported from this directory "
                                      "(holding an older checkout as faster/), interleaved")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.startup:
        startup(args)
        return
    dev = torch.device(args.device)
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory(prefix="faster-bench-predict-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = prepare(work, args)
        setup_s = time.perf_counter() - t0
        results = time_runs(paths, args)
    print(f"predict, {args.videos} videos x {args.num_clips} clips of {args.clip_len} x {args.size} x {args.size}; "
          f"E={args.expensive}, C={args.cheap}; torch {torch.__version__} on {args.device} ({hw}); "
          f"batch {args.batch_size} clips; best of {args.repeats} (setup {setup_s:.0f} s)")
    parts = results.pop("parts")
    print(f"per clip: {args.expensive} {parts['expensive_ms_per_clip']:.1f} ms ({parts['expensive_gflops_per_clip']:.2f} "
          f"GFLOPs), {args.cheap} {parts['cheap_ms_per_clip']:.1f} ms ({parts['cheap_gflops_per_clip']:.2f} GFLOPs): "
          f"time ratio {parts['expensive_ms_per_clip'] / parts['cheap_ms_per_clip']:.1f}x, FLOPs ratio "
          f"{parts['expensive_gflops_per_clip'] / parts['cheap_gflops_per_clip']:.1f}x; FAST-GRU "
          f"{parts['aggregator_ms_per_step']:.1f} ms per step (~{parts['aggregator_gflops_per_step']:.2f} GFLOPs)")
    ref = results["all-e"]
    cols = ["model s", "model CPU s", "end-to-end s"]
    print("| pattern | agg | #E:#C | clips read | GFLOPs/video | FLOPs vs all-e | "
          + " | ".join(f"{c} | vs all-e | saved/saved" for c in cols) + " |")
    print("|" + "---|" * (6 + 3 * len(cols)))
    for pattern, agg, budget, exit_budget in RUNS:
        name = label(pattern, budget, exit_budget)
        r = results[name]
        f = r["gflops"] / ref["gflops"]
        row = [name, agg, f"{r['num_expensive']:.3g}:{r['num_cheap']:.3g}", f"{r['clips_seen']:.3g}",
               f"{r['gflops'] / args.videos:.1f}", f"{f:.3f}"]
        for key in ("model_s", "model_cpu_s", "e2e_s"):
            t = r[key] / ref[key]
            ratio = "-" if name == "all-e" or f == 1 else f"{(1 - t) / (1 - f):.2f}"
            row += [f"{r[key]:.2f}", f"{t:.3f}", ratio]
        print("| " + " | ".join(row) + " |")
    if args.json:
        print(json.dumps({"config": vars(args), "hardware": hw, "results": results, "parts": parts}))


if __name__ == "__main__":
    main()
