"""The shard format: writer (temporary name, rename), manifests and failures, verify."""
import dataclasses
import json

import h5py
import numpy as np
import pytest

import helpers

from faster.store import manifest, schema
from faster.store.files import sha256_file
from faster.store.verify import verify
from faster.store.writer import ShardWriter, next_seq

N, SHAPE = 3, (1, 2, 2, 4)  # clips per video; per clip (T', H', W', C)
HEADER = helpers.header(["m"], num_clips=N, gflops=0.5, mean=0.4, std=0.2, software_version="0.1.0")


def write_shard(out, part, ids, value=1.0, split=None):
    with ShardWriter(out, part=part, seq=next_seq(out, part), header=HEADER,
                     capacity=len(ids)) as w:
        for k, i in enumerate(ids):
            w.add(id=i, label=k % 2, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                  features={"m": np.full((N, *SHAPE), value + k, np.float32)}, split=split)
    return w


def test_writer_renames_when_complete_and_stores_the_schema(tmp_path):
    w = write_shard(tmp_path, 3, ["x.mp4", "y.mp4"], split="train")
    assert w.path.name == "shard-00003-000000.h5" and w.path.exists() and not w.tmp_path.exists()
    assert w.sha256 == sha256_file(w.path)
    with h5py.File(w.path) as f:
        assert f.attrs["format"] == schema.FORMAT and f.attrs["format_version"] == schema.FORMAT_VERSION
        assert json.loads(f.attrs["classes"]) == ["a", "b"]
        feats = f["features/m"]
        assert feats.shape == (2, N, *SHAPE) and feats.dtype == np.float16 and feats.chunks[0] == 1
        assert feats.attrs["weights"] == "random-init:seed=0"
        assert [s.decode() for s in f["videos/split"][()]] == ["train", "train"]
        np.testing.assert_array_equal(f["videos/clip_start"][1], [0, 6, 12])
    assert next_seq(tmp_path, 3) == 1 and next_seq(tmp_path, 4) == 0


def test_writer_deletes_its_temporary_file_when_an_exception_escapes(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, part=0, seq=0, header=HEADER, capacity=2) as w:
            w.add(id="x", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                  features={"m": np.zeros((N, *SHAPE))})
            assert w.tmp_path.exists() and not list(tmp_path.glob(schema.SHARD_GLOB))
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_writer_accepts_str_subclasses_as_attributes(tmp_path):
    class Version(str):
        pass

    head = dataclasses.replace(HEADER, torch_version=Version("2.14.1+cu130"))
    with ShardWriter(tmp_path, part=0, seq=0, header=head, capacity=1) as w:
        w.add(id="x", label=0, num_frames=20, fps=30.0, clip_start=[0, 6, 12], features={"m": np.zeros((N, *SHAPE))})
    with h5py.File(w.path) as f:
        assert f.attrs["torch_version"] == "2.14.1+cu130"


def test_failure_log_keeps_the_latest_record_per_video_and_drops_done_ones(tmp_path):
    log = manifest.FailureLog(tmp_path, 0)
    log.append(manifest.failure_record("a.mp4", "open", "bad", ))
    log.append(manifest.failure_record("b.mp4", "timeout", "slow"))
    log.append({**manifest.failure_record("a.mp4", "decode", "worse"), "time": 1e12})
    with open(log.path, "a") as f:
        f.write('{"id": "c.mp4", "sta')  # a line cut short by SIGKILL
    log.compact(done={"b.mp4"})
    records = manifest.read_failures(log.path)
    assert [(r["id"], r["stage"]) for r in records] == [("a.mp4", "decode")]
    with pytest.raises(ValueError, match="stage"):
        manifest.failure_record("x", "exploded", "?")


def test_verify_passes_a_good_directory_and_writes_merged_views(tmp_path):
    a = write_shard(tmp_path, 0, ["a.mp4", "b.mp4"])
    b = write_shard(tmp_path, 1, ["c.mp4"])
    for part, w in ((0, a), (1, b)):
        manifest.write_part_manifest(tmp_path, part, {"shards": [manifest.shard_entry(w.path, len(w.ids), w.sha256)]})
    manifest.FailureLog(tmp_path, 1).append(manifest.failure_record("d.mp4", "missing", "not found"))
    manifest.FailureLog(tmp_path, 0).append(manifest.failure_record("a.mp4", "open", "fixed since"))  # a.mp4 is in a shard
    report = verify([tmp_path])
    assert report["ok"], report["problems"]
    assert report["videos"] == 3 and report["failed"] == 1
    merged = json.loads((tmp_path / manifest.MANIFEST).read_text())
    assert [s["name"] for s in merged["shards"]] == [a.path.name, b.path.name]
    assert merged["shards"][0]["sha256"] == a.sha256
    assert [json.loads(x)["id"] for x in (tmp_path / manifest.FAILURES).read_text().splitlines()] == ["d.mp4"]


@pytest.mark.parametrize("damage", ["nan", "changed", "duplicate", "not-hdf5", "other-config"])
def test_verify_reports_problems(tmp_path, damage):
    w = write_shard(tmp_path, 0, ["a.mp4", "b.mp4"])
    manifest.write_part_manifest(tmp_path, 0, {"shards": [manifest.shard_entry(w.path, 2, w.sha256)]})
    if damage == "nan":
        with h5py.File(w.path, "a") as f:
            f["features/m"][1, 0, 0, 0, 0, 0] = np.nan
        expect = "non-finite"
    elif damage == "changed":
        with h5py.File(w.path, "a") as f:
            f["videos/fps"][0] = 25.0
        expect = "sha256"
    elif damage == "duplicate":
        write_shard(tmp_path, 1, ["b.mp4"])
        expect = "in both"
    elif damage == "not-hdf5":
        (tmp_path / "shard-00002-000000.h5").write_text("junk")
        expect = "cannot be opened"
    else:
        with ShardWriter(tmp_path, part=5, seq=0, header=dataclasses.replace(HEADER, clip_len=16),
                         capacity=1) as w2:
            w2.add(id="z", label=0, num_frames=20, fps=30.0, clip_start=[0, 2, 4],
                   features={"m": np.zeros((N, *SHAPE))})
        expect = "clip_len"
    report = verify([tmp_path])
    assert not report["ok"]
    assert any(expect in p for p in report["problems"]), report["problems"]


def test_verify_cli_exit_codes(tmp_path):
    from click.testing import CliRunner

    from faster.cli import cli

    write_shard(tmp_path, 0, ["a.mp4"])
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 shard, 1 video, 0 failed" in result.output  # [8]: singular for one
    with h5py.File(next(tmp_path.glob(schema.SHARD_GLOB)), "a") as f:
        f["features/m"][0, 0, 0, 0, 0, 0] = np.inf
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "non-finite" in result.output


def test_feature_set_writer_output_verifies_and_trains(tmp_path):
    """The store's public writer, used as another tool would (docs/format.md): rollover, failures,
    resume, then `faster verify` passes and `faster fit` learns the planted class."""
    from click.testing import CliRunner

    from faster.cli import cli
    from faster.store.writer import FeatureSetWriter

    head = helpers.header(["m"], num_clips=N, gflops=0.5)
    rng = np.random.default_rng(0)
    direction = rng.standard_normal((2, SHAPE[-1])).astype(np.float32)

    def videos(ids):
        for i in ids:
            label = i % 2
            x = rng.standard_normal((N, *SHAPE)).astype(np.float32) * 0.3 + 2.0 * direction[label]
            yield dict(id=f"v{i:03d}.mp4", label=label, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                       features={"m": x})

    with FeatureSetWriter(tmp_path, head, shard_size=16) as w:
        for v in videos(range(40)):
            w.add(**v)
        w.fail("broken.mp4", "open", "moov atom not found")
    assert w.shards_written == 3 and len(list(tmp_path.glob(schema.SHARD_GLOB))) == 3
    with FeatureSetWriter(tmp_path, head, shard_size=16) as again:  # resume: only what is missing
        assert len(again.done) == 40
        for v in videos(range(40, 48)):
            again.add(**v)
    with pytest.raises(ValueError, match="another configuration"):
        FeatureSetWriter(tmp_path, dataclasses.replace(head, clip_len=16))
    merged = json.loads((tmp_path / manifest.MANIFEST).read_text())
    assert merged["num_videos"] == 48 and merged["num_failed"] == 1 and len(merged["shards"]) == 4

    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "4 shards, 48 videos, 1 failed (open 1)" in res.output
    res = runner.invoke(cli, ["fit", str(tmp_path), "-o", str(tmp_path.parent / "run"), "--agg", "avg",
                              "--expensive", "m", "--cheap", "m", "--pattern", "all-e", "--epochs", "5",
                              "--lr", "0.05", "--val-fraction", "0.3"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path.parent / "run" / "result.json").read_text())
    assert result["top1"] >= 0.9 and result["num_train"] + result["num_val"] == 48


def test_part_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import time

    from faster.store.lock import LockHeld, PartLock

    with PartLock(tmp_path, 3) as held:
        with pytest.raises(LockHeld, match=rf"part 3 is being written by pid {os.getpid()} on "):
            PartLock(tmp_path, 3).acquire()
        assert held.path.exists()
    assert not held.path.exists()  # released
    dead = tmp_path / ".lock-00003"
    dead.write_text(json.dumps({"host": PartLock(tmp_path, 3).me["host"], "pid": 2 ** 22 + 7, "since": "x"}))
    with PartLock(tmp_path, 3):  # a dead pid on this host: taken over
        assert json.loads(dead.read_text())["pid"] == os.getpid()
    other = {"host": "some-other-node", "pid": 1, "since": "x"}
    dead.write_text(json.dumps(other))
    with pytest.raises(LockHeld, match="some-other-node"):  # another host's lock, touched just now: alive
        PartLock(tmp_path, 3).acquire()
    old = time.time() - 3600
    os.utime(dead, (old, old))
    with PartLock(tmp_path, 3, stale_after=600):  # silent for an hour: taken over
        pass


def test_verify_repair_keeps_one_copy_of_each_video_and_never_an_only_copy(tmp_path):
    from click.testing import CliRunner

    from faster.cli import cli

    first = write_shard(tmp_path, 0, ["a.mp4", "b.mp4"])
    write_shard(tmp_path, 0, ["b.mp4"], value=5.0)  # every video also in the first: removed
    write_shard(tmp_path, 1, ["b.mp4", "c.mp4"], value=9.0)  # c.mp4 only here: rewritten without b
    for part in (0, 1):
        manifest.write_part_manifest(tmp_path, part, {"shards": [manifest.shard_entry(p, 1) for p in
                                                           sorted(tmp_path.glob(f"shard-0000{part}-*.h5"))]})
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and "is in both" in res.output and "--repair" in res.output
    res = runner.invoke(cli, ["verify", "--repair", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "removed shard-00000-000001.h5" in res.output and "rewrote shard-00001-000000.h5" in res.output
    held = helpers.held_values(tmp_path, index=0)
    assert held == {"a.mp4": 1.0, "b.mp4": 2.0, "c.mp4": 10.0}  # the first copy of b, c's own values
    assert first.path.exists()
    listed = {s["name"] for m in manifest.part_manifests(tmp_path).values() for s in m["shards"]}
    assert listed == {p.name for p in tmp_path.glob(schema.SHARD_GLOB)}


def test_verify_names_both_shards_and_counts_every_readable_video(tmp_path):
    write_shard(tmp_path, 0, ["a.mp4", "b.mp4"])
    with ShardWriter(tmp_path, part=5, seq=0, header=dataclasses.replace(HEADER, num_clips=2), capacity=1) as w:
        w.add(id="z", label=0, num_frames=20, fps=30.0, clip_start=[0, 2], features={"m": np.zeros((2, *SHAPE))})
    report = verify([tmp_path])
    problem = next(p for p in report["problems"] if "configuration differs" in p)
    assert "num_clips 2 in shard-00005-000000.h5, 3 in shard-00000-000000.h5" in problem
    assert report["videos"] == 3  # the other configuration's video is still counted
