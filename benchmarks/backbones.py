"""Throughput of the clip backbones: clips/s and achieved GFLOP/s (multiply-adds, as Table 2 counts).

    python benchmarks/backbones.py                       # CPU, every full-size backbone, 8 x 112 x 112
    python benchmarks/backbones.py --size 224 --models r2plus1d50,r2d26,r3d50
    python benchmarks/backbones.py --device cuda --batch-size 16 --iters 20
    python benchmarks/backbones.py --native --models zoo   # each real-weights backbone at its own input size

On CUDA the backbones run as extraction runs them: bf16 autocast, channels_last_3d model and input,
cudnn.benchmark with a fixed batch shape. On a CPU every ``--modes`` is timed (fp32 channels-first,
fp32 channels_last_3d, bf16 autocast + channels_last_3d: what `faster extract --dtype auto` runs on
a CPU with native bf16), beside the CPU's own ceilings measured in the same run: a large fp32 and
bf16 matrix product (multiply-adds/s); each model's rate is also printed as a fraction of the bf16
ceiling. Before timing, each model's bf16 output is checked once
against fp32 on the same input (PyTorch 2.9 disabled cuDNN conv3d under autocast, and cuDNN
9.8-9.10 gave wrong bf16 conv3d: see docs/pitfalls.md); the relative error is printed with the figures.
Weights are random (seeded): throughput does not depend on their values.
"""
from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

from faster.extract import models

DEFAULT_MODELS = "r2plus1d50,r2d26,r3d50,r2plus1d_18,r3d_18,mc3_18"
# backbones with published weights (docs/backbones.md); the pv_* ones need the extra "zoo"
ZOO_MODELS = ("r2plus1d_34,r2plus1d_152,ir_csn_152,ip_csn_152,pv_r2plus1d_r50,pv_slow_r50,pv_x3d_xs,pv_x3d_s,"
              "pv_x3d_m,pv_csn_r101")
# (frames, px) for --native where the backbone has no .native_input: the paper's 8-frame clips at 224 px,
# torchvision's Kinetics training clips (16 x 112)
NATIVE = {"r2plus1d50": (8, 224), "r2d26": (8, 224), "r3d50": (8, 224), "r2plus1d_18": (16, 112),
          "r3d_18": (16, 112), "mc3_18": (16, 112), "vared_r2plus1d50": (8, 224), "blvnet_tam50": (16, 224),
          "blvnet_tam101": (16, 224), "s3d": (128, 224), "mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224),
          "swin3d_t": (32, 224), "swin3d_s": (32, 224), "swin3d_b": (32, 224)}
# the backbones added with [19] and [21] (docs/backbones.md "Every registered backbone")
NEW_MODELS = "vared_r2plus1d50,blvnet_tam50,blvnet_tam101,r2plus1d_18,r3d_18,mc3_18,s3d,mvit_v1_b,mvit_v2_s,swin3d_t,swin3d_s,swin3d_b"
BF16_TOLERANCE = 0.05  # relative max error; bf16 has an 8-bit mantissa, a broken kernel is off by O(1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best_of_processes(commands: dict[str, Any], repeats: int = 3) -> dict[str, float]:
    """Each command's best wall time over ``repeats`` whole processes (seconds), run in interleaved
    rounds (every command once per round) so that load from other jobs hits them alike. A command is
    an argv list, a function of the round's index giving one (a fresh output each round), or either
    as (command, extra environment variables)."""
    import os
    import subprocess

    times: dict[str, list[float]] = {name: [] for name in commands}
    for k in range(repeats):
        for name, spec in commands.items():
            cmd, env = spec if isinstance(spec, tuple) else (spec, None)
            t0 = time.perf_counter()
            subprocess.run(cmd(k) if callable(cmd) else cmd, check=True, capture_output=True,
                           env={**os.environ, **env} if env else None)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def bf16_error(model: torch.nn.Module, clip: torch.Tensor, device_type: str = "cuda") -> float:
    """max |bf16 - fp32| / max |fp32| of the model's output on ``clip``."""
    with torch.no_grad():
        ref = model(clip).float()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            low = model(clip).float()
    return ((low - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


MODES = ("fp32-cf", "fp32-cl", "bf16-cl")  # precision - memory format (channels-first / channels_last_3d)


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 2048, iters: int = 5) -> float:
    """Multiply-adds/s (G) of an n x n matrix product: the device's ceiling for this dtype."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n ** 3 * iters / (time.perf_counter() - start) / 1e9


def bench(name: str, args: argparse.Namespace, device: torch.device, mode: str = "bf16-cl") -> dict:
    model = models.build(name, seed=0)
    clip_len, size = args.clip_len, args.size
    if args.native:
        clip_len, size = getattr(model, "native_input", None) or NATIVE.get(name, (clip_len, size))
    clip = torch.randn(args.batch_size, 3, clip_len, size, size)  # (B, 3, L, H, W)
    cuda = device.type == "cuda"
    bf16, channels_last = mode.startswith("bf16"), mode.endswith("-cl")
    err = None
    model, clip = model.to(device), clip.to(device)
    from faster.extract.runner import fold_batchnorm

    fold_batchnorm(model, clip_len)  # as faster's BackboneRunner runs every backbone
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        clip = clip.contiguous(memory_format=torch.channels_last_3d)
    if bf16:
        err = bf16_error(model, clip, device.type)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(clip)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    seconds = (time.perf_counter() - start) / args.iters
    gflops = models.clip_gflops(name, clip_len, size)
    clips_per_s = args.batch_size / seconds
    with torch.no_grad():
        shape = tuple(model(clip[:1]).shape[1:])  # (C, T', H', W')
    return {"model": name, "mode": mode, "input": f"{clip_len}x{size}", "shape": "x".join(map(str, shape)),
            "gflops": gflops, "ms_per_clip": 1e3 * seconds / args.batch_size, "clips_per_s": clips_per_s,
            "gflop_per_s": clips_per_s * gflops, "bf16_err": err}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated backbone names; 'zoo' stands for "
                   "the backbones with published weights, 'new' for those added with VA-RED², bLVNet-TAM and torchvision's "
                   "S3D / MViT / Swin3D")
    p.add_argument("--native", action="store_true", help="each backbone at its native clip length and size "
                   "(.native_input), instead of --clip-len / --size")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:N]")
    p.add_argument("--clip-len", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=None, help="clips per forward [cpu 1, cuda 8]")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="timed forwards [cpu 2, cuda 20]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    p.add_argument("--modes", default=None, help=f"comma-separated of {', '.join(MODES)} [cpu: all; cuda: bf16-cl]")
    args = p.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = (args.modes or ("bf16-cl" if cuda else ",".join(MODES))).split(",")
    if cuda:
        torch.backends.cudnn.benchmark = True
        hw = f"{torch.cuda.get_device_name(device)}, cuDNN {torch.backends.cudnn.version()}"
    else:
        hw = f"{cpu_model()}, {torch.get_num_threads()} threads"
    ceiling = {"fp32": matmul_rate(torch.float32, device), "bf16": matmul_rate(torch.bfloat16, device)}
    print(f"# {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {hw}")
    print(f"# clip {'native per model' if args.native else f'{args.clip_len} x {args.size} x {args.size}'}, "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.iters} timed forwards, random init; "
          f"matmul ceilings: fp32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f} G multiply-adds/s")
    cols = ("| model | mode | input | map (C x T' x H' x W') | GFLOPs/clip | ms/clip | clips/s | GFLOP/s | "
            "vs bf16 matmul | bf16 rel. err |")
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for name in args.models.replace("zoo", ZOO_MODELS).replace("new", NEW_MODELS).split(","):
        for mode in modes:
            r = bench(name.strip(), args, device, mode.strip())
            err = "-" if r["bf16_err"] is None else f"{r['bf16_err']:.1e}"
            print(f"| {r['model']} | {r['mode']} | {r['input']} | {r['shape']} | {r['gflops']:.2f} | "
                  f"{r['ms_per_clip']:.1f} | {r['clips_per_s']:.2f} | {r['gflop_per_s']:.1f} | "
                  f"{r['gflop_per_s'] / ceiling['bf16']:.2f} | {err} |", flush=True)
            if r["bf16_err"] is not None and r["bf16_err"] > BF16_TOLERANCE:
                print(f"# WARNING {r['model']}: bf16 output differs from fp32 by {r['bf16_err']:.1e} (relative "
                      "max): check the torch/cuDNN versions (docs/pitfalls.md)", flush=True)


if __name__ == "__main__":
    main()
