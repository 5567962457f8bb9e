"""VA-RED² against the network it reduces: accuracy and mean GFLOPs per clip, trained here, in one run.

    python benchmarks/vared.py                          # the demo's full motion videos, tiny widths
    python benchmarks/vared.py --epochs 4 --per-class 10 --targets 0.6   # a quick look

Both networks are trained by ``faster train-clip`` (faster.train.clip) with the demo's stage-1
settings (faster.demo.FULL: 4 motion classes, 40 training and 10 validation videos per class, 8-frame
clips at 32 px, SGD 0.05, no flips): ``r2plus1d50_tiny`` (R(2+1)D-50 at tiny widths, every clip at
full computation) and ``vared_r2plus1d50_tiny`` at each ``--targets`` FLOPs target (its gates and
weights learned jointly, faster.extract.models.vared; from scratch, or with ``--init-from-base`` from
the trained R(2+1)D-50 tiny of the same run, as the paper starts from a trained network). Printed per run: val video@1 and clip@1 of
the best epoch, its mean GFLOPs per validation clip (each clip's own: the gates are input
dependent), the fraction of the full network's cost, the video@1 difference to R(2+1)D-50, and the
options the gates chose on the validation clips (share of full / half-time / half-channels /
half-both per stage). The issue's acceptance ([19]): video@1 within 0.02 at >= 20% fewer GFLOPs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path


def _videos(root: Path, size, seed: int) -> Path:
    from faster import synthetic

    for split, per_class, s in (("train", size.train_per_class, seed), ("val", size.val_per_class, seed + 1)):
        if not (root / split).exists():
            tmp = root / f".{split}.tmp"
            synthetic.make_motion_dataset(tmp, classes=size.classes, per_class=per_class, frames=size.frames,
                                          size=size.video_size, seed=s, style=size.style, speed=size.speed)
            tmp.rename(root / split)
    return root


def _options(run: Path, size, name: str, videos: Path) -> dict[str, list[float]]:
    """Per stage, the share of validation clips taking each option (the trained gates, eval mode)."""
    import torch

    from faster.extract import models, video
    from faster.extract.models import vared
    from faster.sampling import Sampling

    net = models.build(name, weights=str(run / "model.pt")).eval()
    sampling = Sampling(clip_len=size.clip_len, num_clips=size.train_val_clips, size=size.size)
    counts = torch.zeros(len(vared.STAGES), len(vared.OPTIONS))
    for path in sorted((videos / "val").rglob("*.mp4")):
        clips = torch.as_tensor(video.decode_clips(path, sampling).frames)  # (N, L, S, S, 3) uint8
        x = video.normalise_clips(clips, net.mean, net.std)
        with torch.no_grad():
            net(x)
        for s in range(len(vared.STAGES)):
            counts[s] += torch.bincount(net.last_options[:, s], minlength=len(vared.OPTIONS)).float()
    counts /= counts.sum(dim=1, keepdim=True)
    return {stage: [round(float(v), 3) for v in counts[s]] for s, stage in enumerate(vared.STAGES)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "faster-bench-vared"))
    p.add_argument("--epochs", type=int, default=None, help="default: the demo's (14)")
    p.add_argument("--per-class", type=int, default=None, help="training videos per class (default: the demo's 40)")
    p.add_argument("--targets", default="0.6", help="comma-separated FLOPs targets of the VA-RED² runs")
    p.add_argument("--init-from-base", action="store_true",
                   help="start the VA-RED² runs from the trained R(2+1)D-50 tiny (its model.pt: --init), as the "
                        "paper starts from a trained network; default: from scratch, like it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from faster.demo import FULL
    from faster.train.clip import TrainClipConfig, train_clip

    size = FULL
    if args.epochs:
        size = replace(size, train_epochs=args.epochs)
    if args.per_class:
        size = replace(size, train_per_class=args.per_class, val_per_class=max(2, args.per_class // 4))
    out = Path(args.out)
    videos = _videos(out / f"videos-{size.train_per_class}", size, args.seed)
    runs = [("r2plus1d50_tiny", None)] + [("vared_r2plus1d50_tiny", float(t)) for t in args.targets.split(",")]
    rows = []
    for name, target in runs:
        init = str(out / rows[0]["tag"] / "model.pt") if target is not None and args.init_from_base else None
        tag = (f"{name}-{size.train_epochs}e-{size.train_per_class}" + ("" if target is None else f"-t{target:g}")
               + ("-init" if init else ""))
        done = out / tag / "result.json"
        r = json.loads(done.read_text()) if done.is_file() else train_clip(TrainClipConfig(
            video_root=str(videos / "train"), val=str(videos / "val"), out=str(out / tag), model=name,
            epochs=size.train_epochs, batch_size=size.train_batch_size, lr=size.train_lr, dropout=size.train_dropout,
            clip_len=size.clip_len, size=size.size, flip=False, val_clips=size.train_val_clips, seed=args.seed,
            threads=args.threads, workers=1, progress=False, flops_target=target, init=init,
            resume=(out / tag / "config.json").exists()))  # a finished run is read back, not trained again
        row = {"model": name, "tag": tag, "init": init, "flops_target": target, "video_top1": r["video_top1"], "clip_top1": r["clip_top1"],
               "best_epoch": r["best_epoch"], "gflops_per_clip": r["gflops_per_clip"],
               "full_gflops_per_clip": r["full_gflops_per_clip"], "seconds": round(r["seconds"], 1)}
        if target is not None:
            row["options"] = _options(out / tag, size, name, videos)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'run':<44} {'target':>6} {'video@1':>8} {'clip@1':>7} {'GFLOPs/clip':>12} {'of full':>8} "
          f"{'d video@1':>10} {'seconds':>8}")
    for r in rows:
        frac = r["gflops_per_clip"] / base["full_gflops_per_clip"]
        print(f"{r['tag']:<44} {'-' if r['flops_target'] is None else r['flops_target']:>6} "
              f"{r['video_top1']:8.4f} {r['clip_top1']:7.4f} {r['gflops_per_clip']:12.6f} {frac:8.3f} "
              f"{r['video_top1'] - base['video_top1']:+10.4f} {r['seconds']:8.1f}")
    for r in rows[1:]:
        print(f"{r['tag']}: options (full, half-time, half-channels, half-both) per stage: "
              + "; ".join(f"{k} {v}" for k, v in r["options"].items()))


if __name__ == "__main__":
    main()
