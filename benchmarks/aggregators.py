"""Training-step time of every registered aggregator on Kinetics-shaped clip maps, as ratios to FAST-GRU.

    python benchmarks/aggregators.py                  # CPU (figures: BENCHMARKS.md, docs/aggregators.md)
    python benchmarks/aggregators.py --device cuda --batch-size 32

One training step = forward of a batch of B videos (pattern 1:1 over N clips of T' x H' x W' x C maps
from two sources of equal shape, channels last as the shards store them and fit passes them),
cross-entropy over 400 classes, backward, AdamW step (fused, as fit's engine; --unfused: per tensor), at each
aggregator's defaults. Inputs are random (the cost does not depend on their values) and are built
once, outside the timing. Every aggregator is timed in the same run, round-robin (one step of each
in turn, so a machine that other work slows down slows them alike), after a warm-up step, as the
median of ``--steps`` steps. Prints one row per aggregator: seconds per step and per video, the
ratio to fastgru, and the aggregator's counted GFLOPs per video (faster.aggregate.flops).

``--dtype bf16`` (or ``auto``: bf16 where the device computes it natively, faster/runtime.py) runs
the forward under bf16 autocast, as ``faster fit --dtype`` does. The CPU's (or GPU's) ceiling is
measured in the same run, round-robin with the aggregators: a 2048 x 2048 x 2048 matrix product in
bf16 (and fp32), in G multiply-adds/s. Each aggregator's rate is 3 x its forward multiply-adds per
training video x B / seconds per step (forward + backward, the issue's convention), printed as a
share of the bf16 matmul's rate (issue [22]: FAST-GRU >= 0.4).

``--fit-videos 64`` also measures FAST-GRU from outside, as a user runs it (issue [22]): whole
``faster fit`` processes (fastgru, pattern all-e, ``--val-fraction 0.25``, batch ``--batch-size``,
``--dtype``) over that many generated videos of ``--num-clips`` x ``--shape`` maps, of 1 and of 3
epochs, interleaved over ``--fit-repeats`` rounds (best of each). The two extra epochs' multiply-adds
(3 x the aggregator's GFLOPs per training video, 1 x per validation video, per epoch) divided by the
difference of the best times is a rate that includes loading, validation and checkpoints; it is
printed as a share of the bf16 (and fp32) matmul measured between the runs; then ``faster evaluate``
of the last run over all the videos with ``--dtype fp32`` and ``bf16``, best of ``--fit-repeats``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Stepper:
    """One aggregator at its defaults, its AdamW optimiser and a fixed random batch; ``step()`` times one
    training step."""

    def __init__(self, agg: str, shape: list[int], num_clips: int, batch_size: int, device: str, bf16: bool,
                 fused: bool = True):
        import torch

        from faster.aggregate.models import build
        from faster.aggregate.patterns import expensive_mask

        torch.manual_seed(0)
        self.device = device
        self.mask = expensive_mask("1:1", num_clips)
        n_e = sum(self.mask)
        self.model = build(agg, num_classes=400, sources={"expensive": shape, "cheap": shape},
                           dropout=0.5).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused)  # fused: as fit's engine
        c, *grid = shape  # the aggregators' ``sources`` order; the maps themselves are channels last
        self.x = {src: torch.randn((batch_size, n, *grid, c), device=device)  # (B, n, T', H', W', C)
                  for src, n in (("expensive", n_e), ("cheap", num_clips - n_e))}
        self.y = torch.randint(400, (batch_size,), device=device)
        self.bf16 = bf16

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(self.x, self.mask), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class Matmul:
    """The device's ceiling: one n x n x n matrix product in ``dtype``; ``step()`` times one."""

    def __init__(self, n: int, dtype: str, device: str):
        import torch

        g = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(n, n, generator=g).to(device=device, dtype=getattr(torch, dtype)) for _ in "ab")
        self.device, self.macs = device, n ** 3

    def step(self) -> float:
        import torch

        t0 = time.perf_counter()
        for _ in range(3):
            self.a @ self.b
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 3


def fit_outside(args: argparse.Namespace, ceilings: dict[str, Matmul]) -> dict:
    """Best wall seconds of whole ``faster fit`` processes of 1 and 3 epochs (fastgru, all-e) and the
    rate of the two extra epochs, as a share of the matmuls in ``ceilings`` timed between the runs."""
    from faster.aggregate.flops import aggregator_gflops
    from faster.aggregate.synthetic import write_synthetic

    C, T, H, W = args.shape
    root = Path(tempfile.mkdtemp(prefix="faster-bench-agg-"))
    try:
        feats = write_synthetic(root / "feats", num_videos=args.fit_videos, num_clips=args.num_clips, clip_len=8,
                                models={"exp": (T, H, W, C), "chp": (T, H, W, C)}, signal="static",
                                num_classes=400, shard_size=16, seed=0)
        seconds: dict[int, list[float]] = {1: [], 3: []}
        matmul: dict[str, list[float]] = {name: [] for name in ceilings}
        for _ in range(args.fit_repeats):
            for epochs in (1, 3):
                cmd = [sys.executable, "-m", "faster", "fit", str(feats), "-o", str(root / "run"), "--agg", "fastgru",
                       "--expensive", "exp", "--cheap", "chp", "--pattern", "all-e", "--epochs", str(epochs),
                       "--val-fraction", "0.25", "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                       "--device", args.device, "--overwrite", "--no-progress"]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                seconds[epochs].append(time.perf_counter() - t)
                for name, m in ceilings.items():
                    m.step()  # warm
                    matmul[name].append(m.macs / min(m.step() for _ in range(3)) / 1e9)
        result = json.loads((root / "run" / "result.json").read_text())
        n_val = int(result.get("num_val", round(args.fit_videos * 0.25)))
        evaluate_seconds = evaluate_dtypes(root / "run", feats, args.fit_repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_train = args.fit_videos - n_val
    gflops = aggregator_gflops("fastgru", C, (T, H, W), args.num_clips)
    extra = 2 * gflops * (3 * n_train + n_val)  # G multiply-adds of epochs 2 and 3
    rate = extra / (min(seconds[3]) - min(seconds[1]))
    out = {"videos": args.fit_videos, "train": n_train, "val": n_val, "gflops_per_video": gflops,
           "seconds_1_epoch": seconds[1], "seconds_3_epochs": seconds[3], "gmacs_per_second": rate,
           "matmul_gmacs_per_second": {k: statistics.median(v) for k, v in matmul.items()},
           "evaluate_seconds": evaluate_seconds}
    for name, v in out["matmul_gmacs_per_second"].items():
        out[f"share_of_{name}"] = rate / v
    return out


def evaluate_dtypes(run: Path, feats: Path, repeats: int) -> dict[str, float]:
    """Best seconds of `faster evaluate` (in process: faster.aggregate.evaluation.evaluate) of ``run``
    over every video of ``feats``, the aggregator's forward in fp32 and under bf16 autocast, interleaved."""
    from faster.aggregate.evaluation import evaluate

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats + 1):  # the first round warms up (imports, allocator)
        for dtype in seconds:
            t = time.perf_counter()
            evaluate(run, [str(feats)], str(run.parent / "predictions.jsonl"), progress=False, dtype=dtype)
            seconds[dtype].append(time.perf_counter() - t)
    return {dtype: min(ts[1:]) for dtype, ts in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aggs", nargs="*", default=None, help="default: every registered aggregator")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-clips", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=4, default=[2048, 1, 7, 7], metavar=("C", "T", "H", "W"),
                   help="per-clip map size, given as the aggregators' sources are (the inputs are built "
                        "channels last, T' x H' x W' x C; default: 8-frame clips at 224 px, 1 x 7 x 7 x 2048)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="the aggregators' forward: fp32, or bf16 autocast (auto: where native, as fit's --dtype)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--unfused", action="store_true",
                   help="AdamW's per-tensor implementation instead of the fused one fit's engine uses")
    p.add_argument("--fit-videos", type=int, default=0,
                   help="also time whole `faster fit` runs (fastgru, all-e) of 1 and 3 epochs over this many videos")
    p.add_argument("--fit-repeats", type=int, default=2, help="rounds of the --fit-videos runs (best kept)")
    args = p.parse_args()

    import torch

    from faster import aggregate
    from faster.aggregate.flops import aggregator_gflops
    from faster.runtime import resolve_dtype

    bf16 = resolve_dtype(args.dtype, torch.device(args.device)) == "bfloat16"
    if args.threads:
        torch.set_num_threads(args.threads)
    aggs = args.aggs or aggregate.names()
    if "fastgru" not in aggs:
        aggs = [*aggs, "fastgru"]
    C, T, H, W = args.shape
    steppers: dict[str, Stepper | Matmul] = {
        agg: Stepper(agg, args.shape, args.num_clips, args.batch_size, args.device, bf16, not args.unfused)
        for agg in aggs}
    native = resolve_dtype("auto", torch.device(args.device)) == "bfloat16"
    ceilings = {"matmul_fp32": Matmul(2048, "float32", args.device)}
    if native or bf16:  # an emulated bf16 matmul (no AVX512-BF16/AMX) takes minutes and bounds nothing
        ceilings["matmul_bf16"] = Matmul(2048, "bfloat16", args.device)
    steppers.update(ceilings)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i in range(args.steps + 1):  # round-robin, so a busy machine slows every aggregator alike
        for name, stepper in steppers.items():
            t = stepper.step()
            if i:  # step 0 warms up (allocator, kernels)
                times[name].append(t)
    ceiling = {name: m.macs / statistics.median(times[name]) / 1e9 for name, m in ceilings.items()}  # G MAC/s
    rows = {}
    for agg in aggs:
        s = statistics.median(times[agg])
        gflops = aggregator_gflops(agg, C, (T, H, W), args.num_clips)
        rate = 3 * gflops * args.batch_size / s  # G multiply-adds/s of the training step
        rows[agg] = {"seconds_per_step": s, "seconds_per_video": s / args.batch_size, "gflops_per_video": gflops,
                     "gmacs_per_second": rate, "share_of_fp32_matmul": rate / ceiling["matmul_fp32"],
                     "share_of_bf16_matmul": rate / ceiling["matmul_bf16"] if "matmul_bf16" in ceiling else None}
    ref = rows["fastgru"]["seconds_per_step"]
    for r in rows.values():
        r["ratio_to_fastgru"] = r["seconds_per_step"] / ref
    setting = {"batch_size": args.batch_size, "num_clips": args.num_clips, "shape_cthw": args.shape,
               "steps": args.steps, "device": args.device, "threads": torch.get_num_threads(),
               "dtype": "bf16" if bf16 else "fp32", "adamw": "foreach" if args.unfused else "fused",
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    outside = fit_outside(args, ceilings) if args.fit_videos else None
    if args.json:
        print(json.dumps({"setting": setting, "ceilings_gmacs_per_second": ceiling, "rows": rows,
                          "fit_outside": outside}, indent=1))
        return
    print(f"# {json.dumps(setting)}")
    bf16_ceiling = f"{ceiling['matmul_bf16']:.1f}" if "matmul_bf16" in ceiling else "not measured (no native bf16)"
    print(f"# 2048^3 matmul: fp32 {ceiling['matmul_fp32']:.1f}, bf16 {bf16_ceiling} G multiply-adds/s")
    print("| aggregator | s / step | s / video | x fastgru | GFLOPs / video | G MAC/s (training) | / fp32 matmul "
          "| / bf16 matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for agg, r in rows.items():
        share = "-" if r["share_of_bf16_matmul"] is None else f"{r['share_of_bf16_matmul']:.3f}"
        print(f"| {agg} | {r['seconds_per_step']:.4f} | {r['seconds_per_video']:.4f} | "
              f"{r['ratio_to_fastgru']:.3f} | {r['gflops_per_video']:.3f} | {r['gmacs_per_second']:.1f} | "
              f"{r['share_of_fp32_matmul']:.3f} | {share} |")

    if outside:
        o = outside
        shares = ", ".join(f"{o[f'share_of_{k}']:.3f} of the {k[len('matmul_'):]} matmul ({v:.1f})"
                           for k, v in o["matmul_gmacs_per_second"].items())
        print(f"# faster fit fastgru all-e, {o['train']} + {o['val']} val videos, --dtype {args.dtype}: "
              f"1 epoch {min(o['seconds_1_epoch']):.2f} s, 3 epochs {min(o['seconds_3_epochs']):.2f} s "
              f"(best of {args.fit_repeats}); the 2 extra epochs: {o['gmacs_per_second']:.1f} G MAC/s = {shares}")
        e = o["evaluate_seconds"]
        print(f"# faster evaluate of that run over all {o['videos']} videos: fp32 {e['fp32']:.2f} s, bf16 "
              f"{e['bf16']:.2f} s ({e['fp32'] / e['bf16']:.2f}x)")


if __name__ == "__main__":
    main()
