"""Shard storage options: --compression (zstd and lz4 through hdf5plugin) and --spatial-pool.

"res5-like" features here are ReLU maps with their zeros: max(0, x) of a Gaussian with about half
of the values zero, float16, channels last (a random-init backbone gives ~35-50% zeros; trained
ones more, which only compresses better).
"""
import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import helpers

from faster.store import schema
from faster.store.header import read_header
from faster.store.writer import FeatureSetWriter

pytest.importorskip("hdf5plugin")

N = 4  # clips per video


def relu_maps(rng, shape, zeros=0.5):
    """(N, T', H', W', C) float32 ReLU output with about ``zeros`` of its values exactly 0."""
    from statistics import NormalDist

    shift = NormalDist().inv_cdf(zeros)
    return np.maximum(rng.standard_normal(shape, dtype=np.float32) - shift, 0.0)


def write_set(out, compression, shape, videos=3, seed=0, spatial_pool=None, maps=None, num_clips=N):
    head = helpers.header(["m"], num_clips=num_clips, size=112)
    if spatial_pool:
        head.models["m"] = dataclasses.replace(head.models["m"], spatial_pool=1)
    rng = np.random.default_rng(seed)
    written = {}
    with FeatureSetWriter(out, head, shard_size=videos, compression=compression) as w:
        for i in range(videos):
            x = relu_maps(rng, (num_clips, *shape)) if maps is None else maps[i]
            w.add(id=f"v{i}.mp4", label=i % 2, num_frames=300, fps=30.0, clip_start=np.linspace(0, 292, num_clips),
                  features={"m": x})
            written[f"v{i}.mp4"] = x.astype(np.float16)
    return written


def feature_bytes(out) -> int:
    import h5py

    total = 0
    for p in out.glob(schema.SHARD_GLOB):
        with h5py.File(p, "r") as f:
            total += f["features/m"].id.get_storage_size()
    return total


@pytest.mark.parametrize("compression", ["zstd", "lz4", "lzf", "gzip"])
def test_compressed_shards_round_trip_exactly_and_verify(tmp_path, compression):
    from faster.store.reader import FeatureSet
    from faster.store.verify import verify

    written = write_set(tmp_path, compression, (1, 2, 2, 64))
    sh = read_header(next(tmp_path.glob(schema.SHARD_GLOB)))
    assert sh.models["m"].compression == compression
    fs = FeatureSet([tmp_path])
    ds = fs.dataset({"x": ("m", range(N))})
    for i, vid in enumerate(fs.ids):
        np.testing.assert_array_equal(ds.read(i, 0), written[str(vid)])
    ds.close()
    assert verify([tmp_path])["ok"]
    manifest = json.loads((tmp_path / "manifest-00000.json").read_text())
    assert manifest["compression"] == compression


def test_zstd_and_lz4_shrink_relu_maps(tmp_path):
    """res5-like maps (2048 channels, half zeros): zstd at most 0.8x, lz4 at most 0.95x uncompressed."""
    shape = (1, 4, 4, 2048)  # r2d26's res5 of an 8-frame clip at 112 px after temporal pooling
    size = {}
    for c in ("none", "zstd", "lz4"):
        write_set(tmp_path / c, c, shape, videos=2, seed=1)
        size[c] = feature_bytes(tmp_path / c)
    assert size["zstd"] <= 0.8 * size["none"], size
    assert size["lz4"] <= 0.95 * size["none"], size


_READ_WITHOUT_PLUGIN = textwrap.dedent("""
    import json, sys
    sys.modules["hdf5plugin"] = None  # a machine without hdf5plugin: importing it raises ImportError
    from faster.store.reader import FeatureSet
    from faster.errors import BadFile
    out = {}
    for d in sys.argv[1:]:
        try:
            fs = FeatureSet([d])
            ds = fs.dataset({"x": ("m", [0, 1])})
            ds.read(0, 0)
            out[d] = "ok"
        except BadFile as err:
            out[d] = str(err)
    print(json.dumps(out))
""")


def test_a_reader_without_hdf5plugin_reads_none_and_lzf_and_names_the_fix_for_zstd(tmp_path):
    dirs = {c: tmp_path / c for c in ("none", "lzf", "zstd")}
    for c, d in dirs.items():
        write_set(d, c, (1, 2, 2, 8), videos=1)
    res = subprocess.run([sys.executable, "-c", _READ_WITHOUT_PLUGIN, *map(str, dirs.values())],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got[str(dirs["none"])] == "ok" and got[str(dirs["lzf"])] == "ok"
    assert "pip install hdf5plugin" in got[str(dirs["zstd"])]


def test_reading_lzf_shards_does_not_import_hdf5plugin(tmp_path):
    write_set(tmp_path, "lzf", (1, 2, 2, 8), videos=1)
    code = ("import sys; from faster.store.reader import FeatureSet; fs = FeatureSet([sys.argv[1]]); "
            "fs.dataset({'x': ('m', [0])}).read(0, 0); print('hdf5plugin' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("size", [112, 224])
def test_spatially_pooled_shards_take_at_most_a_tenth(tmp_path, size):
    from faster.extract import models

    C, T, H, W = models.feature_shape("r2d26", 8, size)
    n = 32  # the default 256 // 8 clips: the video table and HDF5's own metadata are a fixed cost per shard
    rng = np.random.default_rng(0)
    full = [relu_maps(rng, (n, T, H, W, C)) for _ in range(2)]
    pooled = [m.astype(np.float16).astype(np.float32).mean(axis=(2, 3), keepdims=True) for m in full]
    write_set(tmp_path / "full", "none", (T, H, W, C), videos=2, maps=full, num_clips=n)
    write_set(tmp_path / "pooled", "none", (T, 1, 1, C), videos=2, maps=pooled, spatial_pool=True, num_clips=n)
    sizes = {k: sum(p.stat().st_size for p in (tmp_path / k).glob(schema.SHARD_GLOB)) for k in ("full", "pooled")}
    assert sizes["pooled"] <= sizes["full"] / 10, sizes
    sh = read_header(next((tmp_path / "pooled").glob(schema.SHARD_GLOB)))
    assert sh.models["m"].shape == (T, 1, 1, C) and sh.models["m"].attrs["spatial_pool"] == 1


def test_spatial_pool_is_part_of_the_configuration(tmp_path):
    """A resume with another --spatial-pool is refused: it changes what the maps are."""
    from faster.errors import Incompatible
    from faster.store.verify import verify

    write_set(tmp_path, "none", (1, 1, 1, 8), videos=1, spatial_pool=True)
    head = helpers.header(["m"], num_clips=N, size=112)
    with pytest.raises(Incompatible, match="spatial_pool"):
        FeatureSetWriter(tmp_path, head)
    assert verify([tmp_path])["ok"]


def test_unknown_compression_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'brotli'"):
        FeatureSetWriter(tmp_path, helpers.header(["m"], num_clips=N), compression="brotli")


@pytest.mark.slow
def test_spatial_pool_extraction_is_the_mean_of_the_full_maps_and_fits_avg(motion_videos, tmp_path, one_thread):
    """`faster extract --spatial-pool --compression zstd` stores the spatial mean of what a full extraction
    stores, `faster verify` passes, and `faster fit --agg avg` trains on it."""
    import h5py
    from click.testing import CliRunner

    from faster.cli import cli

    runner = CliRunner()
    common = [str(motion_videos), "--model", "r2d26_tiny", "--num-clips", "2", "--size", "64", "--workers", "0",
              "--device", "cpu", "--no-progress"]
    res = runner.invoke(cli, ["extract", *common, "-o", str(tmp_path / "full")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["extract", *common, "-o", str(tmp_path / "pooled"), "--spatial-pool",
                              "--compression", "zstd"])
    assert res.exit_code == 0, res.output
    assert "spatially pooled" in res.output and "1x1 grid" in res.output

    def maps(d):
        out = {}
        for p in (tmp_path / d).glob(schema.SHARD_GLOB):
            with h5py.File(p) as f:
                out.update(zip(f["videos/id"].asstr()[()], f["features/r2d26_tiny"][()]))
        return out

    full, pooled = maps("full"), maps("pooled")
    assert sorted(full) == sorted(pooled) and len(full) == 4
    for vid, x in full.items():
        assert x.shape[2:4] != (1, 1) and pooled[vid].shape == (*x.shape[:2], 1, 1, x.shape[-1])  # (N, T', H', W', C)
        want = x.astype(np.float32).mean(axis=(2, 3), keepdims=True).astype(np.float16)
        np.testing.assert_allclose(pooled[vid].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-4)
    res = runner.invoke(cli, ["extract", *common, "-o", str(tmp_path / "pooled")])  # resume without the flag
    assert res.exit_code != 0 and "spatial_pool" in res.output
    res = runner.invoke(cli, ["verify", str(tmp_path / "pooled")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["fit", str(tmp_path / "pooled"), "-o", str(tmp_path / "run"), "--agg", "avg",
                              "--expensive", "r2d26_tiny", "--cheap", "r2d26_tiny", "--pattern", "all-e",
                              "--epochs", "2", "--val-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["num_train"] + result["num_val"] == 4
