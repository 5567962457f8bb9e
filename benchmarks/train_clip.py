"""Training throughput of `faster train-clip` (stage 1): decode-only, model-only and the whole step, in one run.

    python benchmarks/train_clip.py                      # CPU: r2d26 and r2plus1d50 at 112 px, 8-frame clips
    python benchmarks/train_clip.py --threads 1          # torch threads (train-clip's --threads)
    python benchmarks/train_clip.py --device cuda --batch-size 32 --steps 8 --workers 12 --videos 256

Videos are Kinetics-shaped (340x256, ``--seconds`` at 30 fps, H.264; generated once with
faster.synthetic and cached under the temp dir). Per model, with train-clip's own pieces
(faster.train: ``Augment.paper``, ``EpochStream``, ``_train_step``; faster.engine's ``Engine`` with
train-clip's SGD settings and precision) over the same ``--steps`` batches of ``--batch-size``
clips (epoch 1 of seed 0: the same clips in every stage):

* decode: the EpochStream iterated without a model (``--workers`` decode processes decoding one
  random clip per video to the jitter's canvas, uint8 batches formed in the main process);
* model: forward + backward + SGD step (the device-side crop/scale/flip/normalise included) on
  those batches, already in memory (on the device), after one warm-up step; the augment alone is
  also timed (its share of the model figure);
* whole: an EpochStream feeding ``Engine.train_epoch`` (what train-clip runs for an epoch), the
  model already warm; ``data_wait`` is the engine's share of the epoch spent waiting for batches.
* train-clip (``--no-train-clip`` skips it): ``faster.train.clip.train_clip`` itself, one epoch over
  ``steps x batch`` videos, no validation: its metrics.jsonl rate (a fresh model: the cold first
  step is in it).

Each stage runs ``--repeats`` times, the rounds interleaved, and its best round is kept (other
jobs on a shared CPU inflate wall times). Each stage's clips/s is over its whole epoch (a decode
pool starts per epoch, as in train-clip) and "steady" from the first batch on (start-up
excluded). Printed: a JSON line per model, a table, and whole / min(decode, model), the share of
the slower stage the whole step reaches (goal >= 0.85). On a CPU decoders and model share the
cores, so the whole step cannot reach the slower stage unless the other one is cheap; the sum
bound 1 / (1/decode + 1/model) (the stages one after the other) is printed beside it. The
forkserver's start-up (once per process: its imports of torch and decord) is timed separately,
with a first one-batch pool.

Model-only runs beside an idle thread holding an OpenMP team of its own, as the whole step and
train-clip run beside the decode pool's dispatcher thread: libgomp spins long at its barriers
unless a process's OpenMP threads outnumber the cores, and on a CPU shared with other jobs that
spinning alone made model-only 3-9x slower than the same steps in the whole step (BENCHMARKS.md
"Train-clip"; ``--no-openmp-team`` leaves the helper out). On such a CPU, compare runs with
``--threads 1`` too. CPU seconds per clip
(this process and its decode workers, read from /proc, from the second batch to the last; the
lowest round) are printed beside the wall figures: what the stages cost the cores whatever else
runs; decoding's share of decode + model, and the whole step's CPU against that sum (1.0: no
work beyond the two stages).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from backbones import cpu_model  # benchmarks/backbones.py, beside this script

from faster import runtime, synthetic
from faster.engine import Distributed, Engine
from faster.extract import decoders, video
from faster.train.clip import TrainClipConfig, _precision, _train_step, train_clip
from faster.train.data import Augment, Batch, EpochStream, augment
from faster.train.model import build_classifier

STEPS = {"r2d26": 12, "r2plus1d50": 3}  # default --steps per model (r2plus1d50: ~0.3-0.5 training clips/s on the shared 2 cores)
CLASSES = 4


def _write_video(path: Path, seconds: float, seed: int) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    synthetic.write_kinetics_like(tmp, seconds=seconds, fps=30, width=340, height=256, seed=seed)
    os.replace(tmp, path)


def make_videos(n: int, seconds: float) -> Path:
    """A folder-per-class set of ``n`` Kinetics-shaped videos (links into a cached pool, each written once,
    in one process per core)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache = Path(tempfile.gettempdir()) / f"faster-bench-train-clip-340x256-{seconds:g}s-v1"
    pool, root = cache / "pool", cache / f"set-{n}"
    pool.mkdir(parents=True, exist_ok=True)
    paths = [pool / f"video_{i:03d}.mp4" for i in range(n)]
    missing = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        with ProcessPoolExecutor(runtime.cores(), mp_context=multiprocessing.get_context("spawn")) as ex:
            list(ex.map(_write_video, [p for p, _ in missing], [seconds] * len(missing), [i for _, i in missing]))
    for i, path in enumerate(paths):
        link = root / f"class_{i % CLASSES}" / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream(items, aug: Augment, args: argparse.Namespace, device: torch.device) -> EpochStream:
    """Epoch 1 of seed 0 over ``items`` (steps x batch videos: the epoch is ``steps`` batches), as train-clip makes it."""
    return EpochStream(items, seed=0, epoch=1, dist=Distributed(), batch_size=args.batch_size, aug=aug,
                       workers=args.workers, decoder=args.decoder, pin_memory=device.type == "cuda")


def first(batches, steps: int):
    """The first ``steps`` batches; the stream (and its decode pool) closed after the last."""
    it = iter(batches)
    try:
        for k, batch in enumerate(it, start=1):
            yield batch
            if k >= steps:
                return
    finally:
        it.close()


def workers_cpu() -> float:
    """CPU seconds of this process's live decode workers (the forkserver's children, from /proc): NaN where unknown."""
    from multiprocessing import forkserver

    parent = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if parent is None or not os.path.isdir("/proc"):
        return float("nan")
    total = 0.0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
    return total / os.sysconf("SC_CLK_TCK")


def cpu_now() -> float:
    """CPU seconds so far of this process (every thread) and of its live decode workers."""
    return time.process_time() + workers_cpu()


def decode_stage(items, aug: Augment, steps: int, args: argparse.Namespace,
                 device: torch.device) -> tuple[float, float, float, list[Batch]]:
    """(seconds of the epoch, seconds to its first batch, CPU seconds per clip (:func:`cpu_per_clip`), the
    batches) of the stream without a model."""
    batches, stamps, cpu = [], [], []
    t0 = time.perf_counter()
    for b in first(stream(items, aug, args, device), steps):
        batches.append(b)
        stamps.append(time.perf_counter())
        cpu.append(cpu_now())
    return stamps[-1] - t0, stamps[0] - t0, cpu_per_clip(cpu, args.batch_size), batches


def cpu_per_clip(cpu: list[float], batch: int) -> float:
    """CPU seconds per clip between the second batch and the last (the decode pool's look-ahead filled at
    both ends), or the first and the last when there are two."""
    k = 1 if len(cpu) > 2 else 0
    return (cpu[-1] - cpu[k]) / ((len(cpu) - 1 - k) * batch) if len(cpu) > 1 else float("nan")


@contextmanager
def openmp_team_beside(device: torch.device, enabled: bool = True):
    """A second thread that ran one OpenMP-parallel op and waits, for the model-only stage: the OpenMP
    conditions of the whole step and of train-clip, where the decode pool's dispatcher thread holds a team
    of its own (its copy out of shared memory). libgomp spins at its barriers for a short count when a
    process's OpenMP threads outnumber the cores and for a long one otherwise; on a CPU shared with other
    jobs the long spin made model-only 3-9x slower than the same steps inside the whole step."""
    if not enabled or device.type != "cpu" or torch.get_num_threads() < 2:
        yield
        return
    done = threading.Event()

    def hold() -> None:
        torch.ones(1 << 20).add_(1)  # above ATen's grain size: an OpenMP team for this thread
        done.wait()

    helper = threading.Thread(target=hold, name="openmp-team", daemon=True)
    helper.start()
    try:
        yield
    finally:
        done.set()
        helper.join()


def bench(name: str, items, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    steps = args.steps or STEPS.get(name, 4)
    clips = steps * args.batch_size
    # one epoch of ``steps`` batches, one clip per video: the first videos written (every class), in
    # train-clip's order (sorted by id), so train_clip below draws the same clips
    items = sorted(sorted(items, key=lambda it: Path(it.id).name)[:clips], key=lambda it: it.id)
    aug = Augment.paper(args.clip_len, args.size)
    cfg = TrainClipConfig(video_root="", out="", model=name, batch_size=args.batch_size, clip_len=args.clip_len,
                          size=args.size, epochs=1, warmup_epochs=0.0)
    model = build_classifier(name, CLASSES, dropout=cfg.dropout, seed=0)
    engine = Engine(model, cfg.settings(precision), device=device, steps_per_epoch=steps, progress=False)
    step = _train_step(aug, model.backbone.mean, model.backbone.std, device, 0.0)

    on_device = None
    best: dict[str, dict] = {}
    cpu: dict[str, float] = {}  # CPU seconds per clip, this process and its decode workers (the lowest round)
    rounds = []

    def keep(stage: str, **fig) -> None:
        if stage not in best or fig["s"] < best[stage]["s"]:
            best[stage] = fig

    for _ in range(args.repeats):  # rounds of the three stages; the best of each kept (a shared CPU is noisy)
        # (a) decode only
        t_decode, first_decode, cpu_decode, batches = decode_stage(items, aug, steps, args, device)
        keep("decode", s=t_decode, first=first_decode)
        cpu["decode"] = min(cpu.get("decode", float("inf")), cpu_decode)
        # (b) model only: batches already in memory on the device; one warm-up step before the first round
        if on_device is None:
            on_device = [Batch(b.frames.to(device), b.labels.to(device), b.params) for b in batches]
            with openmp_team_beside(device, args.openmp_team):
                engine.train_epoch(1, on_device[:1], step)
        del batches
        _sync(device)
        with openmp_team_beside(device, args.openmp_team):
            t, c = time.perf_counter(), time.process_time()
            engine.train_epoch(1, on_device, step)
            _sync(device)
            t_model = time.perf_counter() - t
        keep("model", s=t_model)
        cpu["model"] = min(cpu.get("model", float("inf")), (time.process_time() - c) / clips)
        # (c) the whole step: the stream feeding the engine (the model warm)
        stamps: list[float] = []
        cpus: list[float] = []

        def timed(m, b, stamps=stamps, cpus=cpus):
            stamps.append(time.perf_counter())
            cpus.append(cpu_now())
            return step(m, b)

        t = time.perf_counter()
        stats = engine.train_epoch(1, first(stream(items, aug, args, device), steps), timed)
        _sync(device)
        t_whole = time.perf_counter() - t
        keep("whole", s=t_whole, first=stamps[0] - t, stats=stats)
        cpu["whole"] = min(cpu.get("whole", float("inf")), cpu_per_clip(cpus, args.batch_size))
        rounds.append([round(t_decode, 2), round(t_model, 2), round(t_whole, 2)])
    with openmp_team_beside(device, args.openmp_team):  # the device-side augment alone (inside the model figures)
        t = time.perf_counter()
        for b in on_device:
            augment(b.frames, b.params, aug, model.backbone.mean, model.backbone.std)
        _sync(device)
        t_augment = time.perf_counter() - t
    del engine, model, on_device
    dec, mod, whole = best["decode"], best["model"], best["whole"]
    wait_s = whole["stats"]["data_wait"] * whole["stats"]["train_seconds"]

    rates = {"decode": clips / dec["s"], "model": clips / mod["s"], "whole": clips / whole["s"]}
    steady = {"decode": (clips - args.batch_size) / (dec["s"] - dec["first"]), "model": rates["model"],
              "whole": clips / (whole["s"] - whole["first"])}
    row = {"model": name, "steps": steps, "batch": args.batch_size, "clips": clips,
           "decode_s": round(dec["s"], 3), "decode_first_batch_s": round(dec["first"], 3),
           "model_s": round(mod["s"], 3),
           "whole_s": round(whole["s"], 3), "whole_first_batch_s": round(whole["first"], 3),
           "whole_engine_train_seconds": whole["stats"]["train_seconds"], "data_wait": whole["stats"]["data_wait"],
           "data_wait_after_first": round(max(0.0, wait_s - whole["first"]) / (whole["s"] - whole["first"]), 4),
           "augment_s_per_clip": round(t_augment / clips, 4), "augment_share_of_model": round(t_augment / mod["s"], 4),
           "rounds_decode_model_whole_s": rounds,
           **{f"{k}_clips_per_s": round(v, 2) for k, v in rates.items()},
           **{f"{k}_steady_clips_per_s": round(v, 2) for k, v in steady.items()}}
    for key, r in (("", rates), ("_steady", steady)):
        row[f"whole_vs_min{key}"] = round(r["whole"] / min(r["decode"], r["model"]), 3)
        row[f"whole_vs_sum{key}"] = round(r["whole"] * (1 / r["decode"] + 1 / r["model"]), 3)
    row.update({f"{k}_cpu_s_per_clip": round(v, 4) for k, v in cpu.items()})
    if {"decode", "model", "whole"} <= set(cpu):
        # the cores' work: decoding's share of it, and the whole step's against decode + model
        row["decode_share_of_cpu"] = round(cpu["decode"] / (cpu["decode"] + cpu["model"]), 3)
        row["whole_cpu_vs_sum"] = round(cpu["whole"] / (cpu["decode"] + cpu["model"]), 3)
    if args.train_clip:
        row.update(run_train_clip(name, items, steps, args))
    print(json.dumps(row), flush=True)
    return row


def run_train_clip(name: str, items, steps: int, args: argparse.Namespace) -> dict:
    """One epoch of ``train_clip`` itself over ``items`` (steps x batch videos), no validation; its metrics.jsonl."""
    work = Path(tempfile.mkdtemp(prefix="faster-bench-train-clip-"))
    try:
        root = Path(items[0].path).parent.parent
        rows = ["path,label,split"] + [f"{it.id},{it.id.split('/')[0]},train" for it in items]
        (work / "train.csv").write_text("\n".join(rows) + "\n")
        cfg = TrainClipConfig(video_root=str(root), out=str(work / "run"), model=name, annotations=str(work / "train.csv"),
                              epochs=1, batch_size=args.batch_size, clip_len=args.clip_len, size=args.size,
                              workers=args.workers, decoder=args.decoder, device=args.device, dtype=args.dtype,
                              threads=args.threads, progress=False)
        t = time.perf_counter()
        result = train_clip(cfg)
        seconds = time.perf_counter() - t
        m = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"train_clip_samples": m["samples"], "train_clip_train_seconds": m["train_seconds"],
            "train_clip_clips_per_s": round(m["samples"] / m["train_seconds"], 2), "train_clip_data_wait": m["data_wait"],
            "train_clip_call_seconds": round(seconds, 3), "train_clip_precision": result["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="backbone (repeat); default r2d26 and r2plus1d50")
    ap.add_argument("--videos", type=int, default=48, help="generated videos (>= steps x batch of every model)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each generated video")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, help=f"optimiser steps per stage; default {STEPS}, 4 for other models")
    ap.add_argument("--workers", type=int, default=2, help="decode processes (train-clip's --workers)")
    ap.add_argument("--decoder", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                    help="train-clip's --dtype (auto: bf16 on CUDA, fp32 on a CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (train-clip's --threads; default torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three stages (the best of each kept)")
    ap.add_argument("--no-openmp-team", dest="openmp_team", action="store_false",
                    help="model-only without the helper thread holding an OpenMP team (see above)")
    ap.add_argument("--no-train-clip", dest="train_clip", action="store_false",
                    help="skip the run of train_clip itself")
    args = ap.parse_args()
    names = args.model or ["r2d26", "r2plus1d50"]
    need = max(args.batch_size * (args.steps or STEPS.get(n, 4)) for n in names)
    if args.steps is not None and args.steps < 2:
        ap.error("--steps must be >= 2 (the steady figures start at the second batch)")
    if args.videos < need:
        ap.error(f"--videos {args.videos}: the longest stage takes {need} clips (one per video)")

    device = runtime.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = _precision(args.dtype, device)
    root = make_videos(args.videos, args.seconds)
    items = video.discover(root).items
    t = time.perf_counter()  # the forkserver's imports and a first pool: once per process (train-clip's first epoch pays it)
    decoders.warm_up_workers()
    decode_stage(items[:args.batch_size], Augment.paper(args.clip_len, args.size), 1, args, device)
    t_fork = time.perf_counter() - t
    load = [os.getloadavg()[0]]
    if load[0] > runtime.cores():
        print(f"note: load average {load[0]:.1f} on {runtime.cores()} cores: other jobs share the CPU, wall times are "
              f"inflated and noisy", flush=True)
    rows = []
    for name in names:
        rows.append(bench(name, items, args, device, precision))
        load.append(os.getloadavg()[0])

    print(f"date {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpu_model()} "
          f"({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), load average {min(load):.1f}-{max(load):.1f}")
    print(f"{args.videos} videos 340x256 {args.seconds:g} s 30 fps H.264; {args.clip_len}-frame clips at {args.size} "
          f"px (canvas {Augment.paper(args.clip_len, args.size).canvas} px); batch {args.batch_size}; {args.workers} "
          f"decode workers; {device} ({precision}); first pool (forkserver start-up + one batch) {t_fork:.2f} s (once "
          f"per process, not in the figures)")
    print("| model | steps x batch | decode clips/s (steady) | model clips/s | whole clips/s (steady) | data wait "
          "| whole / min (steady) | whole / sum bound (steady) | train_clip clips/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tc = f"{r['train_clip_clips_per_s']:.2f} (wait {r['train_clip_data_wait']:.2f})" if args.train_clip else "-"
        print(f"| {r['model']} | {r['steps']} x {r['batch']} | {r['decode_clips_per_s']:.2f} "
              f"({r['decode_steady_clips_per_s']:.2f}) | {r['model_clips_per_s']:.2f} | {r['whole_clips_per_s']:.2f} "
              f"({r['whole_steady_clips_per_s']:.2f}) | {r['data_wait']:.2f} | {r['whole_vs_min']:.3f} "
              f"({r['whole_vs_min_steady']:.3f}) | {r['whole_vs_sum']:.3f} ({r['whole_vs_sum_steady']:.3f}) | {tc} |")
    for r in rows:
        print(f"{r['model']}: whole / min(decode, model) = {r['whole_vs_min']:.3f} (steady {r['whole_vs_min_steady']:.3f};"
              f" goal >= 0.85); data wait {r['data_wait']:.3f} ({r['data_wait_after_first']:.3f} after the first batch);"
              f" augment {100 * r['augment_share_of_model']:.1f}% of the model step")
        if "whole_cpu_vs_sum" in r:
            print(f"{r['model']}: CPU s/clip decode {r['decode_cpu_s_per_clip']:.3f}, model {r['model_cpu_s_per_clip']:.3f}, "
                  f"whole {r['whole_cpu_s_per_clip']:.3f}: decoding {100 * r['decode_share_of_cpu']:.0f}% of the work, "
                  f"whole / (decode + model) = {r['whole_cpu_vs_sum']:.3f}")


if __name__ == "__main__":
    main()
