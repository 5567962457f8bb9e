"""Decode speed per decoder and codec on one core, and the CPU cores a GPU extraction needs.

    python benchmarks/decode.py                  # ~2-3 minutes on 2 CPU cores
    python benchmarks/decode.py --seconds 10 --json out.json

Videos: faster.synthetic.write_kinetics_like (a scrolling texture and a moving square, camera-like
motion) encoded with PyAV in H.264, HEVC, VP9, AV1 (libsvtav1), ProRes 422 Proxy, MPEG-2 and MPEG-4 Part 2
(Xvid-like, in AVI), at 340x256 (Kinetics' size) and 1280x720, 30 fps. For each file and decoder
(auto, decord, pyav; auto's row says which one it chose and what choosing cost: its header read,
``video.auto_order``) the process is pinned to one core
(sched_setaffinity, torch and the decoders one thread) and ``decode_clips`` samples every frame
(N x 8 frames, N = frames // 8) at 224 px: frames/s = frames / seconds of decode + RGB
conversion + resize and crop, what a decode worker does per video. Best of ``--repeat`` runs.

torchcodec (PyTorch's decoder, ``pip install torchcodec``) is measured beside them when it imports
and finds an FFmpeg (it links the system's libavcodec at run time; on a machine without one,
point LD_LIBRARY_PATH at FFmpeg's shared libraries, e.g. PyAV's bundled ones under sonames they
answer to): ``VideoDecoder(dimension_order="NHWC", num_ffmpeg_threads=1).get_frames_at`` of the
same frames, 64 at a time, then the same resize and crop (faster.extract.video.resize_crop).

Cores per GPU: extraction runs R(2+1)D-50 and R2D-26 on every clip. No GPU has been measured
here, so the GPU rate is the paper's Table 5 (TITAN X, FASTER32's setting, 100 videos of 8 x 32
= 256 frames): all-e 75.7 s (R(2+1)D-50 on every clip) + all-c 15.1 s (R2D-26 on every clip) =
0.908 s per video, i.e. ~282 frames/s; cores = that rate / frames/s per core.
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

CODECS = {"h264": ".mp4", "hevc": ".mp4", "vp9": ".webm", "av1": ".mkv", "prores": ".mov", "mpeg2": ".mpg",
          "mpeg4": ".avi"}
SIZES = {"340x256": (340, 256), "720p": (1280, 720)}
TABLE5_S_PER_VIDEO = (75.7 + 15.1) / 100  # all-e + all-c seconds per video, paper Table 5 (TITAN X)
FRAMES_PER_VIDEO = 256


def _torchcodec() -> object | None:
    """torchcodec's VideoDecoder class, or None (not installed, or no FFmpeg it can load)."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception:  # ImportError, or its core library failing to find libavcodec
        return None
    return VideoDecoder


def _decode_torchcodec(decoder_cls, path: Path, num_frames: int, size: int) -> None:
    """What decode_clips does per video, with torchcodec: the frames, then resize + centre crop."""
    from faster.extract.video import resize_crop

    dec = decoder_cls(str(path), dimension_order="NHWC", num_ffmpeg_threads=1)
    for a in range(0, num_frames, 64):
        frames = dec.get_frames_at(list(range(a, min(a + 64, num_frames)))).data  # (k, H, W, 3) uint8
        resize_crop(frames, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the 340x256 videos (720p: half)")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import av
    import decord
    import torch

    from faster import synthetic
    from faster.extract.video import DecodeError, auto_order, decode_clips
    from faster.sampling import Sampling

    tc = _torchcodec()
    tmp = Path(tempfile.mkdtemp(prefix="faster-decode-"))
    rows = []
    try:
        files = {}
        t = time.perf_counter()
        for res, (w, h) in SIZES.items():
            seconds = args.seconds if res == "340x256" else args.seconds / 2
            for codec in args.codecs.split(","):
                files[res, codec] = synthetic.write_kinetics_like(tmp / f"{res}-{codec}{CODECS[codec]}", seconds=seconds,
                                                                  width=w, height=h, codec=codec)
        encode_s = time.perf_counter() - t
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        torch.set_num_threads(1)
        for (res, codec), path in files.items():
            with av.open(str(path)) as c:
                frames = sum(1 for _ in c.decode(video=0))
            n = max(1, frames // 8)
            for dec in ("auto", "decord", "pyav") + (("torchcodec",) if tc is not None else ()):
                best, error, note = None, None, ""
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    try:
                        if dec == "torchcodec":
                            _decode_torchcodec(tc, path, n * 8, args.size)
                        else:
                            d = decode_clips(path, Sampling(num_clips=n, clip_len=8, size=args.size), decoder=dec)
                    except (DecodeError, RuntimeError, ValueError) as err:
                        error = str(err)[:80]
                        break
                    s = time.perf_counter() - t
                    best = s if best is None else min(best, s)
                fps = round(n * 8 / best, 1) if best else None
                if dec == "auto" and best:
                    t = time.perf_counter()
                    for _ in range(5):
                        auto_order(path)
                    probe = (time.perf_counter() - t) / 5
                    note = f"read with {d.decoder}; choosing took {probe * 1e3:.1f} ms ({probe / best:.2%} of the decode)"
                rows.append({"size": res, "codec": codec, "decoder": dec, "frames": frames, "frames_per_s": fps,
                             "error": error, "note": note, "MiB": round(path.stat().st_size / 2**20, 2)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    need = FRAMES_PER_VIDEO / TABLE5_S_PER_VIDEO
    print(f"{platform.processor() or platform.machine()}, one core of {os.cpu_count()}, load "
          f"{os.getloadavg()[0]:.2f}; decord {decord.__version__}, PyAV {av.__version__} (FFmpeg "
          f"{'.'.join(map(str, av.library_versions['libavcodec']))} libavcodec); crops {args.size} px; "
          f"encoding took {encode_s:.0f} s; torchcodec "
          f"{'not available' if tc is None else __import__('torchcodec').__version__}")
    print(f"GPU rate (paper Table 5, not measured here): {need:.0f} frames/s for R(2+1)D-50 + R2D-26")
    print(f"{'size':8} {'codec':7} {'decoder':7} {'frames/s':>9} {'cores/GPU':>10}  note")
    for r in rows:
        fps = r["frames_per_s"]
        r["cores_per_gpu"] = round(need / fps, 2) if fps else None
        print(f"{r['size']:8} {r['codec']:7} {r['decoder']:7} {fps if fps else '-':>9} "
              f"{r['cores_per_gpu'] if fps else '-':>10}  {r['error'] or r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "gpu_frames_per_s": need,
                                               "load": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
