"""`faster pack` throughput against a raw np.load loop over the same files (one run each).

    python benchmarks/pack.py                      # ~10 s on a 2-core CPU
    python benchmarks/pack.py --videos 400 --shape 32,2048

Writes ``--videos`` video_features-style files (``<class>/<stem>_i3d.npy``, float32 of ``--shape``,
by default (clips, C) = (32, 2048): I3D features of 64-frame clips), then times

1. raw: np.load(allow_pickle=False) of every file and a float16 cast (the least any packer does);
2. pack: ``faster.pack.run_pack`` into a fresh directory (checks, float16 shards, sha256, manifest).

Both read the files from a cold page cache (posix_fadvise(DONTNEED) before each pass), with the
libraries imported beforehand, ``--repeats`` times interleaved (raw, pack, raw, pack, ...: a busy
machine slows both alike). It prints MiB/s of source files for each pass, and the ratio (raw
seconds / pack seconds) of the best passes and the median of the back-to-back pairs.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fit import evict  # benchmarks/fit.py (this folder is on sys.path when run as a script)


def write_files(root: Path, videos: int, shape: tuple[int, ...]) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(videos):
        p = root / f"class{i % 4}" / f"video {i:05d}_i3d.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, rng.standard_normal(shape, dtype=np.float32))
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=400)
    ap.add_argument("--shape", default="32,2048", help="per-file array shape, e.g. 32,2048 or 8,1,7,7,2048")
    ap.add_argument("--dir", help="scratch directory [default: a temporary one]")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved (raw, pack) pairs")
    args = ap.parse_args()
    import h5py  # noqa: F401 (imported before timing: the one-off import is not packing)
    import tqdm  # noqa: F401

    import faster.extract.video  # noqa: F401
    import faster.store.writer  # noqa: F401
    from faster.pack import PackConfig, run_pack

    shape = tuple(int(s) for s in args.shape.split(","))
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="faster-pack-bench-"))
    try:
        src = tmp / "src"
        paths = write_files(src, args.videos, shape)
        mib = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{platform.node()}, {os.cpu_count()} CPUs, numpy {np.__version__}: {args.videos} files of "
              f"{'x'.join(map(str, shape))} float32, {mib:.1f} MiB")
        pairs = []
        for r in range(args.repeats):
            evict(paths)
            t0 = time.perf_counter()
            for p in paths:
                np.load(p, allow_pickle=False).astype(np.float16)
            raw = time.perf_counter() - t0
            evict(paths)
            t0 = time.perf_counter()
            s = run_pack(PackConfig(src=str(src), out=str(tmp / f"feats{r}"), model="i3d", clip_len=64,
                                    gflops_per_clip=108.0, strip_suffix="_i3d", progress=False))
            packed = time.perf_counter() - t0
            assert s["packed"] == args.videos and s["failed"] == 0, s
            shutil.rmtree(tmp / f"feats{r}")
            pairs.append((raw, packed))
            print(f"pass {r + 1}: raw np.load + float16 cast {raw:.2f} s ({mib / raw:.1f} MiB/s); faster pack "
                  f"{packed:.2f} s ({mib / packed:.1f} MiB/s, {s['shards_written']} shards); ratio {raw / packed:.2f}")
        best = min(r for r, _ in pairs) / min(p for _, p in pairs)
        print(f"ratio pack / raw: best {best:.2f}, median pair {statistics.median(r / p for r, p in pairs):.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
