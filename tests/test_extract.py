"""`faster extract` end to end on small generated videos with the tiny backbones.

One reference extraction (module fixture) of 6 motion videos, a video shorter than one clip and
four broken files; the other tests resume, kill, distribute and refuse against it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from faster import sampling
from faster.cli import cli
from faster.store import schema

av = pytest.importorskip("av")
from faster import synthetic  # noqa: E402  (needs av)

MODELS = ["--model", "r2plus1d50_tiny", "--model", "r2d26_tiny"]
OPTS = MODELS + ["--clip-len", "8", "--num-clips", "3", "--size", "32", "--shard-size", "2", "--no-progress",
                 "--dtype", "fp32"]  # compared with fp32 references; bf16 has its own test
BROKEN = {"left/empty.mp4": "open", "left/truncated.mp4": "open", "right/text.mp4": "open",
          "right/audio.mp4": "open"}
GOOD = [f"{c}/{c}_{i:03d}.mp4" for c in ("left", "right") for i in range(3)] + ["right/short.mp4"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # end to end: real extractions
DRIVER = [sys.executable, str(Path(__file__).resolve().parent / "extract_driver.py")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("videos")
    synthetic.make_motion_dataset(r, classes=("left", "right"), per_class=3, frames=16, size=32)
    synthetic.write_video(r / "right" / "short.mp4", synthetic.motion_frames("right", frames=5, size=32))
    (r / "left" / "empty.mp4").write_bytes(b"")
    (r / "left" / "truncated.mp4").write_bytes((r / "left" / "left_000.mp4").read_bytes()[:400])
    (r / "right" / "text.mp4").write_text("not a video\n" * 40)
    synthetic.write_audio_only(r / "right" / "audio.mp4")
    (r / "left" / "README.txt").write_text("ignored: not a video extension")
    return r


def invoke(*args):
    return CliRunner().invoke(cli, ["extract", *map(str, args)], catch_exceptions=False)


def with_fault(monkeypatch, spec):
    """`faster extract` in this process decodes with a fault injected (tests/helpers.py)."""
    import helpers

    helpers.inject_decode_fault(monkeypatch, spec)


def read_features(out):
    """{id: {model: features}} over every complete shard, asserting each id appears once."""
    feats = {}
    for path in sorted(Path(out).glob(schema.SHARD_GLOB)):
        with h5py.File(path) as f:
            for k, i in enumerate(f["videos/id"][()]):
                i = i.decode()
                assert i not in feats, f"{i} is in two shards"
                feats[i] = {m: f[f"features/{m}"][k] for m in f["features"]}
    return feats


def failures(out, name="failures.jsonl"):
    return {r["id"]: r["stage"] for r in map(json.loads, (Path(out) / name).read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("feats") / "ref"
    result = invoke(root, "-o", out, *OPTS, "--workers", "2")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_extracts_good_videos_and_records_broken_ones(root, reference):
    out, output = reference
    assert "extracted 7, skipped 0 (done before), failed 4" in output and "1 shorter than one clip" in output
    feats = read_features(out)
    assert sorted(feats) == sorted(GOOD)
    assert failures(out) == BROKEN  # README.txt is ignored, not a failure
    assert len(list(out.glob(schema.SHARD_GLOB))) == 4 and not list(out.glob(".*.tmp"))
    part = json.loads((out / "manifest-00000.json").read_text())
    assert part["short"] == ["right/short.mp4"]
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["num_videos"] == 7 and merged["failed_by_stage"] == {"open": 4}
    with h5py.File(sorted(out.glob(schema.SHARD_GLOB))[0]) as f:
        assert json.loads(f.attrs["classes"]) == ["left", "right"]
        assert [i.decode() for i in f["videos/id"][()]] and f.attrs["num_clips"] == 3
        for i, start, n, label in zip(f["videos/id"][()], f["videos/clip_start"][()], f["videos/num_frames"][()],
                                      f["videos/label"][()]):
            assert list(start) == sampling.clip_starts(int(n), 3, 8)
            assert label == (0 if i.decode().startswith("left") else 1)
        ds = f["features/r2d26_tiny"]
        assert ds.dtype == np.float16 and ds.chunks[0] == 1
        assert ds.attrs["weights"] == "random-init:seed=0" and ds.attrs["compute_dtype"] == "float32"
        assert ds.attrs["gflops_per_clip"] > 0


def test_features_equal_the_backbone_on_the_decoded_clips(root, reference):
    import torch

    from faster.extract import models
    from faster.extract.video import decode_clips, normalise_clips
    from faster.sampling import Sampling

    feats = read_features(reference[0])["left/left_001.mp4"]
    clips = decode_clips(root / "left" / "left_001.mp4", Sampling(num_clips=3, clip_len=8, size=32)).frames
    for name in ("r2plus1d50_tiny", "r2d26_tiny"):
        model = models.build(name, seed=0)
        with torch.inference_mode():
            want = model(normalise_clips(torch.from_numpy(clips), model.mean, model.std)).permute(0, 2, 3, 4, 1)
        np.testing.assert_allclose(feats[name].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_skips_done_retries_failed_and_strict_exits_nonzero(root, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    result = invoke(root, "-o", out, *OPTS, "--workers", "0", "--strict")
    assert result.exit_code == 1, result.output
    assert "extracted 0, skipped 7 (done before), failed 4" in result.output and "--strict" in result.output
    assert sorted(read_features(out)) == sorted(GOOD) and failures(out) == BROKEN


def test_configuration_change_into_the_same_directory_is_refused(root, reference):
    out = reference[0]
    before = sorted(p.name for p in out.iterdir())
    for change in (["--clip-len", "16"], ["--num-clips", "2"], ["--size", "40"]):
        opts = OPTS + change
        result = invoke(root, "-o", out, *opts)
        assert result.exit_code != 0
        assert "another configuration" in result.output and change[0][2:].replace("-", "_") in result.output
    result = invoke(root, "-o", out, "--model", "r2d26_tiny", *OPTS[4:])
    assert result.exit_code != 0 and "models" in result.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_kill_mid_shard_then_rerun_gives_every_video_once_with_the_same_features(root, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [*DRIVER, "--kill-after-shards", "1", "--", str(root), "-o", str(out), *OPTS, "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list(out.glob(schema.SHARD_GLOB))) == 1 and len(list(out.glob(".shard-*.tmp"))) == 1
    result = invoke(root, "-o", out, *OPTS, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "skipped 2 (done before)" in result.output
    assert not list(out.glob(".shard-*.tmp"))
    assert [p.name for p in sorted(out.glob(schema.SHARD_GLOB))][1] == "shard-00000-000002.h5"  # 1 never reused
    got, want = read_features(out), read_features(reference[0])
    assert sorted(got) == sorted(want)
    for i in want:
        for m in want[i]:
            np.testing.assert_allclose(got[i][m].astype(np.float32), want[i][m].astype(np.float32),
                                       rtol=1e-3, atol=1e-3)
    assert failures(out) == BROKEN


def test_decoder_timeout_and_crash_are_recorded_and_the_run_goes_on(root, tmp_path, monkeypatch):
    out = tmp_path / "faulty"
    with_fault(monkeypatch, "left_001:sleep=60")
    result = invoke(root, "-o", out, *OPTS, "--workers", "2", "--timeout", "2")
    assert result.exit_code == 0, result.output
    assert failures(out) == {**BROKEN, "left/left_001.mp4": "timeout"}
    record = next(r for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())
                  if r["id"] == "left/left_001.mp4")
    assert set(record["errors"]) == {"decord", "pyav"}  # auto tried the other decoder before giving up
    assert all("longer than 2 s" in e for e in record["errors"].values())
    assert sorted(read_features(out)) == sorted(set(GOOD) - {"left/left_001.mp4"})
    out2 = tmp_path / "crashy"
    with_fault(monkeypatch, "right_002:exit")
    result = invoke(root, "-o", out2, *OPTS, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert failures(out2) == {**BROKEN, "right/right_002.mp4": "crash"}
    assert len(read_features(out2)) == len(GOOD) - 1


@pytest.mark.parametrize("fault", ["left_001:sleep=60@auto", "left_001:exit@auto"], ids=["hang", "crash"])
def test_a_video_whose_decoder_hangs_or_dies_is_read_with_the_other_one(root, tmp_path, monkeypatch, fault):
    """decord can hang holding the GIL, or crash, on a file PyAV reads (docs/pitfalls.md): with
    --decoder auto the video is decoded again with the other decoder, not recorded as failed."""
    out = tmp_path / "retried"
    with_fault(monkeypatch, fault)  # only the first try (--decoder auto) hangs or dies; the retry names its decoder
    result = invoke(root, "-o", out, *OPTS, "--workers", "1", "--timeout", "2")
    assert result.exit_code == 0, result.output
    assert failures(out) == BROKEN and sorted(read_features(out)) == sorted(GOOD)
    runs = [json.loads(p.read_text())["runs"][-1] for p in out.glob("manifest-*.json")]
    assert sum(r["decoders"].get("pyav", 0) for r in runs) == 1  # left_001, read by PyAV on the retry


def test_kinetics_annotations_store_split_and_record_missing(root, tmp_path):
    videos = tmp_path / "kin"
    (videos / "train").mkdir(parents=True)
    for yt, label in (("aaa", "left"), ("bbb", "right")):
        shutil.copy(root / label / f"{label}_000.mp4", videos / "train" / f"{yt}_000001_000011.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "left,aaa,1,11,train\nright,bbb,1,11,val\nright,ccc,1,11,val\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("left\nright\nup\n")
    out = tmp_path / "kfeats"
    result = invoke(videos, "-o", out, *OPTS, "--workers", "0", "--annotations", csv, "--classes", classes)
    assert result.exit_code == 0, result.output
    assert failures(out) == {"ccc_000001_000011": "missing"}
    with h5py.File(next(out.glob(schema.SHARD_GLOB))) as f:
        assert json.loads(f.attrs["classes"]) == ["left", "right", "up"]
        rows = {i.decode(): (int(lab), s.decode()) for i, lab, s in
                zip(f["videos/id"][()], f["videos/label"][()], f["videos/split"][()])}
    assert rows == {"train/aaa_000001_000011.mp4": (0, "train"), "train/bbb_000001_000011.mp4": (1, "val")}


def test_not_enough_disk_space_is_refused(root, tmp_path, monkeypatch):
    from faster.extract import pipeline

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    result = invoke(root, "-o", tmp_path / "full", *OPTS, "--workers", "0")
    assert result.exit_code != 0 and "not enough disk space" in result.output
    assert not list((tmp_path / "full").glob("shard-*"))


def test_slurm_array_parts_partition_the_videos(root, reference, tmp_path):
    out = tmp_path / "array"
    for index in (0, 1, 2):
        result = invoke(root, "-o", out, *OPTS, "--workers", "0", "--num-shards", "3", "--shard-index", index)
        assert result.exit_code == 0, result.output
    assert {p.name.split("-")[1] for p in out.glob(schema.SHARD_GLOB)} == {"00000", "00001", "00002"}
    assert not (out / "manifest.json").exists()  # only a single process or verify merges
    assert sorted(read_features(out)) == sorted(GOOD)
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
    assert failures(out) == BROKEN


def test_torchrun_two_processes_give_the_same_videos_as_one(root, reference, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "faster",
           "extract", str(root), "-o", str(out), *OPTS, "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.glob("manifest-*.json")} == {"manifest-00000.json", "manifest-00001.json"}
    assert sorted(read_features(out)) == sorted(read_features(reference[0]))
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0
    assert failures(out) == BROKEN


def test_sigterm_closes_the_open_shard_and_stops_then_resume_completes(root, reference, tmp_path):
    import signal
    import time

    out = tmp_path / "term"
    # One worker decodes in id order and hangs on right_000; a batch is one video's 3 clips, so by then
    # left_000 and left_001 fill shard 0 and left_002 sits in the open shard 1.
    cmd = [*DRIVER, "--fault", "right_000:sleep=60", "--", str(root), "-o", str(out), *OPTS, "--workers", "1",
           "--batch-size", "3", "--timeout", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / ".shard-00000-000001.h5.tmp").exists():  # shard 0 done, left_002 in shard 1
            assert proc.poll() is None and time.monotonic() < deadline, "no open second shard"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    assert not list(out.glob(".shard-*.tmp"))
    assert sorted(read_features(out)) == ["left/left_000.mp4", "left/left_001.mp4", "left/left_002.mp4"]
    result = invoke(root, "-o", out, *OPTS, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert sorted(read_features(out)) == sorted(GOOD) and failures(out) == BROKEN


def test_two_extractions_into_one_directory_never_write_a_part_twice(root, reference, tmp_path):
    """A resubmitted job while the first still runs: refused at once naming the holder, or (--wait)
    it waits and finds nothing left; every video is in one shard only."""
    import time

    out, release = tmp_path / "twice", tmp_path / "release"
    # the first extraction holds its part (its decoder waits on left_000) until the test creates `release`
    first = subprocess.Popen([*DRIVER, "--fault", f"left_000:wait={release}", "--", str(root), "-o", str(out), *OPTS,
                              "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = None
    try:
        deadline = time.monotonic() + 60
        while not (out / ".lock-00000").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first extraction took no lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "faster", "extract", str(root), "-o", str(out), *OPTS,
                                 "--workers", "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"part 0 is being written by pid {first.pid}" in second.stderr and "--wait" in second.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "faster", "extract", str(root), "-o", str(out), *OPTS,
                                    "--workers", "0", "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(2)  # it reaches the held lock (either way the first completes before it writes anything)
        release.touch()
        assert first.wait(timeout=60) == 0, first.stderr.read()[-2000:]
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        release.touch()
        for proc in (first, waiting):
            if proc is not None:
                proc.kill()
    assert waiting.returncode == 0, stderr[-2000:]
    assert "extracted 0, skipped 7 (done before)" in stdout
    assert sorted(read_features(out)) == sorted(GOOD)  # read_features asserts each id is in one shard
    assert not list(out.glob(".lock-*"))


def test_no_videos_is_an_error_unless_allowed_and_a_failed_start_writes_nothing(root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a video")
    result = invoke(empty, "-o", tmp_path / "o", *OPTS)
    assert result.exit_code == 1 and f"no videos in {empty}" in result.output and ".mp4" in result.output
    assert not (tmp_path / "o").exists()
    result = invoke(empty, "-o", tmp_path / "o", *OPTS, "--allow-empty")
    assert result.exit_code == 0, result.output
    result = invoke(root, "-o", tmp_path / "w", *OPTS, "--weights", "r2d26_tiny=/nonexistent.pt")
    assert result.exit_code == 1 and "/nonexistent.pt" in result.output
    assert not (tmp_path / "w").exists()


def test_random_init_is_warned_once_and_only_when_there_is_work(motion_videos, tmp_path, caplog):
    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.runtime import _warned

    _warned.clear()
    cfg = dict(models=("r2d26_tiny",), clip_len=8, num_clips=2, size=32, workers=0, progress=False)
    with caplog.at_level("WARNING"):
        for out in ("a", "b", "a"):  # two extractions with work (as the demo does), then one without
            extract_videos(ExtractConfig(str(motion_videos), str(tmp_path / out), **cfg))
    warned = [r for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert len(warned) == 1
    _warned.clear()
    caplog.clear()
    with caplog.at_level("WARNING"):
        summary = extract_videos(ExtractConfig(str(motion_videos), str(tmp_path / "a"), **cfg))
    assert summary["extracted"] == 0 and not [r for r in caplog.records if "randomly" in r.getMessage()]


def test_nothing_left_to_do_starts_no_worker_and_builds_no_backbone(motion_videos, tmp_path, monkeypatch):
    from faster.extract import decoders, pipeline

    out = tmp_path / "done"
    assert invoke(motion_videos, "-o", out, *OPTS, "--workers", "0").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob(schema.SHARD_GLOB)}

    def refuse(*args, **kw):
        raise AssertionError("started although nothing was left to extract")

    monkeypatch.setattr(decoders, "warm_up_workers", refuse)  # the forkserver, which the pool starts
    monkeypatch.setattr(pipeline, "DecodePool", refuse)
    monkeypatch.setattr(pipeline.ClipModels, "load", refuse)
    result = invoke(motion_videos, "-o", out, *OPTS, "--workers", "2", "--strict")
    assert result.exit_code == 0 and "extracted 0, skipped 4 (done before), failed 0" in result.output, result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob(schema.SHARD_GLOB)} == before


def test_dtype_auto_resumes_an_fp32_directory_and_bf16_stays_close_to_fp32(root, reference, tmp_path, monkeypatch):
    from faster import runtime
    from faster.extract.pipeline import BF16_TOLERANCE

    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)  # auto would pick bf16 on this machine
    auto = [o for o in OPTS if o not in ("--dtype", "fp32")]
    result = invoke(root, "-o", out, *auto, "--workers", "0")
    assert result.exit_code == 0 and "skipped 7 (done before)" in result.output, result.output
    result = invoke(root, "-o", tmp_path / "bf16", *auto, "--workers", "0")  # a new directory: bf16
    assert result.exit_code == 0, result.output
    got, want = read_features(tmp_path / "bf16"), read_features(reference[0])
    for video_id in want:
        for m in want[video_id]:
            a, b = got[video_id][m].astype(np.float32), want[video_id][m].astype(np.float32)
            assert np.linalg.norm(a - b) <= BF16_TOLERANCE * np.linalg.norm(b), (video_id, m)
    with h5py.File(next((tmp_path / "bf16").glob(schema.SHARD_GLOB))) as f:
        assert f["features/r2d26_tiny"].attrs["compute_dtype"] == "bfloat16"
