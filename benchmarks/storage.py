"""Shard codecs on res5-like features: bytes per video, write and read MiB/s, and what the fit loader pays.

    python benchmarks/storage.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/storage.py --videos 32 --json out.json

Features: the res5 maps of a randomly initialised R2D-26 (full width, 2048 channels) on 8-frame
clips at 224 px of a Kinetics-shaped synthetic video (faster.synthetic.write_kinetics_like): real
ReLU maps with the zeros a ReLU network gives (their zero fraction is printed; trained weights
give more zeros, which only helps the codecs). A few distinct clips are computed once and tiled
into ``--clips`` clips per video, each video a different rotation of them, so no two chunks
(one video each) are equal. ``--synthetic`` uses max(0, N(0, 1) - 0.35) instead (about 64%
zeros) and needs no model.

For each --compression (none, lzf, gzip, zstd, lz4): stored bytes per video and the ratio to
none; write MiB/s through FeatureSetWriter (float16 bytes / seconds, with the fsync and sha256 the
writer does); read MiB/s of every video with one h5py read each, from a cold page cache
(posix_fadvise DONTNEED); and the pass time of store.reader.ThreadedLoader over the set (what
`faster fit --workers 0` reads per epoch), as a ratio to none. MiB/s are of uncompressed bytes.
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

CODECS = ("none", "lzf", "gzip", "zstd", "lz4")


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def res5_maps(distinct: int, size: int, synthetic: bool, seed: int) -> np.ndarray:
    """(distinct, T', H', W', C) float16 ReLU maps."""
    if synthetic:
        rng = np.random.default_rng(seed)
        x = np.maximum(rng.standard_normal((distinct, 1, size // 32, size // 32, 2048), dtype=np.float32) - 0.35, 0)
        return x.astype(np.float16)
    import torch

    from faster import synthetic
    from faster.extract import models
    from faster.extract.video import decode_clips, normalise_clips
    from faster.sampling import Sampling

    tmp = Path(tempfile.mkdtemp(prefix="faster-storage-"))
    try:
        video = synthetic.write_kinetics_like(tmp / "k.mp4", seconds=4.0, seed=seed)
        d = decode_clips(video, Sampling(num_clips=distinct, clip_len=8, size=size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = models.build("r2d26", weights=None, seed=seed).eval()
    with torch.inference_mode():
        y = model(normalise_clips(torch.from_numpy(d.frames), model.mean, model.std))  # (n, C, T', H', W')
    return y.permute(0, 2, 3, 4, 1).half().numpy()  # (n, T', H', W', C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--clips", type=int, default=32, help="clips per video (256 // 8)")
    ap.add_argument("--distinct", type=int, default=8, help="distinct clips computed by the model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--synthetic", action="store_true", help="max(0, N(0,1) - 0.35) maps instead of R2D-26's")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--dir", default=None, help="where to write the shards [default: a temporary folder]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import h5py
    import torch

    import faster
    from faster.store.header import Header, ModelHeader
    from faster.store.reader import FeatureSet, ThreadedLoader, list_shards
    from faster.store.writer import FeatureSetWriter

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    base = res5_maps(args.distinct, args.size, args.synthetic, seed=0)
    model_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    zeros = float((base == 0).mean())
    reps = -(-args.clips // len(base))
    videos = [np.roll(np.tile(base, (reps, 1, 1, 1, 1))[: args.clips], v, axis=0) for v in range(args.videos)]
    raw_per_video = videos[0].nbytes
    head = Header(clip_len=8, num_clips=args.clips, frame_stride=1, size=args.size, classes=["a", "b"],
                  models={"r2d26": ModelHeader(gflops_per_clip=0.0, layer="res5", weights="random-init:seed=0",
                                               mean=[0.45] * 3, std=[0.225] * 3, compute_dtype="float32")},
                  software_version=faster.__version__, torch_version=str(torch.__version__))
    root = Path(args.dir or tempfile.mkdtemp(prefix="faster-storage-"))
    rows = []
    try:
        for codec in args.codecs.split(","):
            out = root / codec
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            with FeatureSetWriter(out, head, shard_size=args.videos, compression=codec) as w:
                for v, x in enumerate(videos):
                    w.add(id=f"v{v:04d}.mp4", label=v % 2, num_frames=300, fps=30.0,
                          clip_start=np.linspace(0, 292, args.clips).astype(int), features={"r2d26": x})
            write_s = time.perf_counter() - t
            shards = list_shards(out)
            stored = 0
            for p in shards:
                with h5py.File(p) as f:
                    stored += f["features/r2d26"].id.get_storage_size()
            evict(shards)
            t = time.perf_counter()
            for p in shards:
                with h5py.File(p, "r", rdcc_nbytes=2 * raw_per_video) as f:
                    ds = f["features/r2d26"]
                    buf = np.empty(ds.shape[1:], np.float16)
                    for i in range(ds.shape[0]):
                        ds.read_direct(buf, np.s_[i])
            read_s = time.perf_counter() - t
            evict(shards)
            fs = FeatureSet([out])
            loader = ThreadedLoader(fs.dataset({"expensive": ("r2d26", range(args.clips))}), batch_size=4)
            t = time.perf_counter()
            for _ in loader:
                pass
            loader_s = time.perf_counter() - t
            mib = raw_per_video * args.videos / 2**20
            rows.append({"codec": codec, "bytes_per_video": stored // args.videos, "write_MiBps": round(mib / write_s, 1),
                         "read_MiBps": round(mib / read_s, 1), "loader_pass_s": round(loader_s, 3)})
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    none = next((r for r in rows if r["codec"] == "none"), rows[0])
    for r in rows:
        r["size_ratio"] = round(r["bytes_per_video"] / none["bytes_per_video"], 3)
        r["loader_ratio"] = round(r["loader_pass_s"] / none["loader_pass_s"], 2)
    source = "synthetic max(0, N(0,1) - 0.35)" if args.synthetic else f"random-init R2D-26 res5, 8-frame clips at {args.size} px"
    print(f"features: {source}; {args.videos} videos x {args.clips} clips x {tuple(base.shape[1:])} float16 = "
          f"{raw_per_video / 2**20:.2f} MiB/video; {zeros:.1%} zeros; model {model_s:.1f} s")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
          f"h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}")
    print(f"{'codec':6} {'bytes/video':>12} {'ratio':>6} {'write MiB/s':>12} {'read MiB/s':>11} {'loader s':>9} {'vs none':>8}")
    for r in rows:
        print(f"{r['codec']:6} {r['bytes_per_video']:>12,} {r['size_ratio']:>6.3f} {r['write_MiBps']:>12.1f} "
              f"{r['read_MiBps']:>11.1f} {r['loader_pass_s']:>9.3f} {r['loader_ratio']:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"features": source, "zeros": zeros, "rows": rows,
                                               "load": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
