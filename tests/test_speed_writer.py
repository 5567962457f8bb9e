"""The shard writer's buffered writes (store/writer.py, issue [22]): videos go to the HDF5 file in
blocks of up to BLOCK_BYTES, with the same file content as one video at a time, the atomic rename
kept, and the caller free to reuse its arrays."""
import h5py
import numpy as np
import pytest

import helpers

from faster.errors import BadValue
from faster.store import schema, writer
from faster.store.writer import ShardWriter

N, SHAPE = 3, (1, 2, 2, 4)  # clips per video; per clip (T', H', W', C)
HEADER = helpers.header(["m"], num_clips=N, gflops=0.5, mean=0.4, std=0.2, software_version="0.1.0")
VIDEO_BYTES = 2 * N * int(np.prod(SHAPE))  # float16 maps of one video


def _write(out, block_videos, monkeypatch, count=7):
    """A shard of ``count`` videos written in blocks of ``block_videos``: a split from the 3rd video on,
    per-clip GFLOPs, float32 input cast to float16, one input buffer reused for every video."""
    monkeypatch.setattr(writer, "BLOCK_BYTES", block_videos * VIDEO_BYTES)
    out.mkdir()
    buf = np.empty((N, *SHAPE), np.float32)
    with ShardWriter(out, part=0, seq=0, header=HEADER, capacity=count) as w:
        for k in range(count):
            buf[:] = np.random.default_rng(k).standard_normal(buf.shape) * 100  # reused by the caller
            w.add(id=f"v{k}.mp4", label=k % 2, num_frames=20 + k, fps=30.0 - k, clip_start=[0, k, 2 * k],
                  features={"m": buf}, split=None if k < 2 else ("train", "val")[k % 2],
                  gflops={"m": np.full(N, 0.5 + k)})
            assert len(w) == k + 1
        assert w._block == min(block_videos, count)
    return w.path


def _contents(path):
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()], obj.dtype, obj.shape, obj.chunks, obj.maxshape,
                             {k: np.asarray(v).tolist() for k, v in obj.attrs.items()})
        f.visititems(visit)
        out["/"] = dict(f.attrs)
    return out


@pytest.mark.parametrize("block", [3, 64])
def test_blocks_write_what_one_video_at_a_time_writes(tmp_path, monkeypatch, block):
    one = _contents(_write(tmp_path / "one", 1, monkeypatch))
    got = _contents(_write(tmp_path / "block", block, monkeypatch))
    assert got.keys() == one.keys() and got.pop("/").keys() == one.pop("/").keys()
    for name, (values, *meta) in one.items():
        np.testing.assert_array_equal(got[name][0], values, err_msg=name)
        assert got[name][1:] == tuple(meta), name
    feats = one["features/m"][0]
    want = np.random.default_rng(4).standard_normal((N, *SHAPE)).astype(np.float32) * 100
    np.testing.assert_array_equal(feats[4], want.astype(np.float16))  # not the buffer's last contents
    assert [s.decode() for s in one["videos/split"][0]] == ["", "", "train", "val", "train", "val", "train"]


def test_a_failure_after_written_blocks_leaves_no_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "BLOCK_BYTES", 2 * VIDEO_BYTES)
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(tmp_path, part=0, seq=0, header=HEADER, capacity=8) as w:
            for k in range(5):  # two blocks written, one video buffered
                w.add(id=f"v{k}", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                      features={"m": np.zeros((N, *SHAPE))})
            assert w._written == 4 and w.tmp_path.exists() and not w.path.exists()
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_video_leaves_nothing_behind(tmp_path):
    with ShardWriter(tmp_path, part=0, seq=0, header=HEADER, capacity=4) as w:
        w.add(id="a", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12], features={"m": np.ones((N, *SHAPE))})
        with pytest.raises(BadValue, match="features of shape"):
            w.add(id="b", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                  features={"m": np.ones((N, 1, 2, 2, 5))})
        assert w.ids == ["a"]
    with h5py.File(tmp_path / schema.shard_name(0, 0)) as f:
        assert f["features/m"].shape == (1, N, *SHAPE) and [i.decode() for i in f["videos/id"][()]] == ["a"]


def _add(w, k):
    w.add(id=f"v{k}", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12], features={"m": np.full((N, *SHAPE), k)})


def test_a_full_shard_commits_in_the_background_and_is_listed_in_order(tmp_path, monkeypatch):
    # the commit of shard 0 (fsync, rename, sha256) is held until shard 1 is being written: the
    # writer went on meanwhile, and shard 0 is listed (with its digest) once it is done
    from threading import Event

    from faster.store import manifest

    started, release = Event(), Event()
    commit = ShardWriter.commit

    def slow_commit(self):
        started.set()
        assert release.wait(10)
        commit(self)

    monkeypatch.setattr(ShardWriter, "commit", slow_commit)
    with writer.FeatureSetWriter(tmp_path, HEADER, shard_size=2) as w:
        _add(w, 0), _add(w, 1)  # full: shard 0 goes to the commit thread
        assert started.wait(10)
        _add(w, 2)  # shard 1 is written while shard 0 is committing
        assert w.shards_written == 0 and not (tmp_path / schema.shard_name(0, 0)).exists()
        release.set()
        _add(w, 3)  # full: shard 0 is listed before shard 1 is committed
        assert w.shards_written == 1
    part = manifest.part_manifests(tmp_path)[0]
    assert [s["name"] for s in part["shards"]] == [schema.shard_name(0, 0), schema.shard_name(0, 1)]
    assert all(len(s["sha256"]) == 64 for s in part["shards"])
    assert w.done == {"v0", "v1", "v2", "v3"} and not list(tmp_path.glob("*.tmp"))


def test_an_error_while_committing_in_the_background_is_raised_and_loses_nothing_listed(tmp_path, monkeypatch):
    from faster.store import manifest

    commit = ShardWriter.commit

    def full_disk(self):
        if self.path.name == schema.shard_name(0, 1):
            self.tmp_path.unlink()
            raise OSError(28, "No space left on device")
        commit(self)

    monkeypatch.setattr(ShardWriter, "commit", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with writer.FeatureSetWriter(tmp_path, HEADER, shard_size=2) as w:
            for k in range(6):
                _add(w, k)  # shard 1's failed commit is raised when shard 2 closes
    part = manifest.part_manifests(tmp_path)[0]
    assert [s["name"] for s in part["shards"]] == [schema.shard_name(0, 0)]  # shard 2 was never committed
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == [schema.shard_name(0, 0)]


def test_an_interruption_keeps_the_shard_that_was_committing(tmp_path):
    from faster.store import manifest

    with pytest.raises(KeyboardInterrupt):
        with writer.FeatureSetWriter(tmp_path, HEADER, shard_size=2) as w:
            _add(w, 0), _add(w, 1), _add(w, 2)  # shard 0 full (committing), shard 1 open
            raise KeyboardInterrupt
    part = manifest.part_manifests(tmp_path)[0]
    assert [s["name"] for s in part["shards"]] == [schema.shard_name(0, 0)]
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == [schema.shard_name(0, 0)]
    with writer.FeatureSetWriter(tmp_path, HEADER, shard_size=2) as again:
        assert again.done == {"v0", "v1"}


def test_a_failed_last_close_still_lists_the_shard_committing_before_it(tmp_path, monkeypatch):
    from faster.store import manifest

    close = ShardWriter.close

    def failing_close(self, keep=True):
        if self.path.name == schema.shard_name(0, 1):
            self._file.close()
            self.tmp_path.unlink()
            raise OSError(28, "No space left on device")
        return close(self, keep)

    monkeypatch.setattr(ShardWriter, "close", failing_close)
    with pytest.raises(OSError, match="No space left"):
        with writer.FeatureSetWriter(tmp_path, HEADER, shard_size=2) as w:
            _add(w, 0), _add(w, 1), _add(w, 2)  # shard 0 committing; shard 1's close at the end fails
    part = manifest.part_manifests(tmp_path)[0]
    assert [s["name"] for s in part["shards"]] == [schema.shard_name(0, 0)]
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == [schema.shard_name(0, 0)]
