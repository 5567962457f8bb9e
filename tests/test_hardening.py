"""Hardening, round two ([24]): what a hostile trial found, one test per item.

Each test reproduces the case, asserts the exit code and the one-line message naming the value or
file, and that nothing earlier was lost or trusted wrongly.
"""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import helpers

from faster.cli import cli
from faster.store import integrity, manifest, schema
from faster.store.files import sha256_file
from faster.store.writer import ShardWriter, next_seq

N, SHAPE = 3, (1, 2, 2, 4)  # clips per video; per clip (T', H', W', C)
HEADER = helpers.header(["m"], num_clips=N, gflops=0.5)


def write_shard(out, part, ids, value=1.0, listed=True):
    """One shard of ``ids`` (video k's features are value + k), listed in its part manifest."""
    with ShardWriter(out, part=part, seq=next_seq(out, part), header=HEADER, capacity=len(ids)) as w:
        for k, i in enumerate(ids):
            w.add(id=i, label=k % 2, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                  features={"m": np.full((N, *SHAPE), value + k, np.float32)})
    if listed:
        old = manifest.part_manifests(out).get(part) or {"shards": []}
        old["shards"].append(manifest.shard_entry(w.path, len(ids), w.sha256))
        manifest.write_part_manifest(out, part, old)
    return w.path


def feature_set(out, videos=8, shard_size=4):
    """A feature set of ``videos`` videos in shards of ``shard_size``, verified (merged manifest written)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"v{i:02d}.mp4" for i in range(videos)]
    paths = [write_shard(out, 0, ids[k:k + shard_size], value=float(k)) for k in range(0, videos, shard_size)]
    res = CliRunner().invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    return paths


def edit(path, value=7.0):
    with h5py.File(path, "a") as f:
        f["features/m"][0, 0, 0, 0, 0, 0] = value


def fit_args(feats, run):
    return ["fit", *map(str, feats), "-o", str(run), "--agg", "avg", "--expensive", "m", "--cheap", "m",
            "--pattern", "all-e", "--epochs", "1", "--val-fraction", "0.3", "--workers", "0"]


# -- 1: verify never launders an edited shard ---------------------------------------------------

def test_verify_never_records_the_checksum_of_a_changed_shard_and_accept_does(tmp_path):
    feats = tmp_path / "feats"
    first, _ = feature_set(feats)
    listed = sha256_file(first)
    edit(first)
    runner = CliRunner()
    for _ in range(2):  # a second verify must not trust what the first reported
        res = runner.invoke(cli, ["verify", str(feats)])
        assert res.exit_code == 1
        assert f"{first.name}: sha256 differs" in res.output and "--accept" in res.output
        merged = json.loads((feats / manifest.MANIFEST).read_text())
        assert {s["name"]: s["sha256"] for s in merged["shards"]}[first.name] == listed
    with pytest.raises(ValueError, match=f"{first.name}: changed after it was written"):
        integrity.check([feats])
    res = runner.invoke(cli, fit_args([feats], tmp_path / "run"))
    assert res.exit_code == 1 and first.name in res.output and not (tmp_path / "run" / "result.json").exists()

    res = runner.invoke(cli, ["verify", "--accept", str(first), str(feats)])
    assert res.exit_code == 0, res.output
    assert f"accepted {first.name} as it is now" in res.output
    assert integrity.check([feats]).problems == []
    part = manifest.part_manifests(feats)[0]
    assert {s["name"]: s["sha256"] for s in part["shards"]}[first.name] == sha256_file(first)


def test_verify_accept_refuses_a_shard_that_fails_the_checks(tmp_path):
    feats = tmp_path / "feats"
    first, _ = feature_set(feats)
    edit(first, np.nan)
    res = CliRunner().invoke(cli, ["verify", "--accept", first.name, str(feats)])
    assert res.exit_code == 1 and "refused, it fails the checks" in res.output and "non-finite" in res.output
    res = CliRunner().invoke(cli, ["verify", "--accept", "shard-00000-000099.h5", str(feats)])
    assert res.exit_code == 1 and "shard-00000-000099.h5" in res.output and "no such shard" in res.output
    with pytest.raises(ValueError, match="changed after it was written"):
        integrity.check([feats])


def test_a_laundered_merged_manifest_does_not_override_the_part_manifest(tmp_path):
    """Directories that an older verify laundered: the merged manifest lists the edited digest, the part
    manifest the written one: the shard is still refused."""
    feats = tmp_path / "feats"
    first, _ = feature_set(feats)
    edit(first)
    merged = json.loads((feats / manifest.MANIFEST).read_text())
    for s in merged["shards"]:
        if s["name"] == first.name:
            s["sha256"], s["bytes"] = sha256_file(first), first.stat().st_size
    (feats / manifest.MANIFEST).write_text(json.dumps(merged))
    with pytest.raises(ValueError, match=f"{first.name}: changed after it was written.*manifest-00000.json"):
        integrity.check([feats])


# -- 3: repair keeps the copy that passes the checks ----------------------------------------------

def test_repair_keeps_the_intact_copy_not_the_damaged_one(tmp_path):
    damaged = write_shard(tmp_path, 0, ["a.mp4", "b.mp4"], value=1.0)
    intact = write_shard(tmp_path, 1, ["b.mp4"], value=5.0)
    with h5py.File(damaged, "a") as f:  # b's first copy NaN-damaged (then accepted: its sha256 matches)
        f["features/m"][1, 0, 0, 0, 0, 0] = np.nan
    manifest.write_part_manifest(tmp_path, 0, {"shards": [manifest.shard_entry(damaged, 2)]})
    res = CliRunner().invoke(cli, ["verify", "--repair", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "video 'b.mp4': kept the copy in shard-00001-000000.h5" in res.output and "non-finite" in res.output
    held = helpers.held_values(tmp_path, index=-1)
    assert held == {"a.mp4": 1.0, "b.mp4": 5.0} and intact.exists()


def test_repair_keeps_every_copy_when_none_passes_and_says_so(tmp_path):
    one = write_shard(tmp_path, 0, ["a.mp4", "b.mp4"])
    two = write_shard(tmp_path, 1, ["b.mp4"])
    for path in (one, two):
        with h5py.File(path, "a") as f:
            f["features/m"][-1, 0, 0, 0, 0, 0] = np.inf
    manifest.write_part_manifest(tmp_path, 0, {"shards": [manifest.shard_entry(one, 2)]})
    manifest.write_part_manifest(tmp_path, 1, {"shards": [manifest.shard_entry(two, 1)]})
    res = CliRunner().invoke(cli, ["verify", "--repair", str(tmp_path)])
    assert res.exit_code == 1  # verify still reports the damage and the duplicate
    assert "video 'b.mp4': no copy passes the checks" in res.output and "kept every copy" in res.output
    assert one.exists() and two.exists()


def test_repair_never_rewrites_a_changed_shard(tmp_path):
    """Rewriting a changed shard would record its edited values under a fresh sha256."""
    first = write_shard(tmp_path, 0, ["a.mp4"])
    changed = write_shard(tmp_path, 1, ["a.mp4", "c.mp4"], value=9.0)
    edit(changed)
    res = CliRunner().invoke(cli, ["verify", "--repair", str(tmp_path)])
    assert res.exit_code == 1
    assert f"left {changed.name} as it is" in res.output and "sha256 differs" in res.output
    assert changed.exists() and first.exists()
    with pytest.raises(ValueError, match=changed.name):
        integrity.check([tmp_path])


# -- 4: a listed shard that is missing; an unreadable manifest ------------------------------------

def test_a_missing_listed_shard_is_an_error_naming_it_and_skip_bad_leaves_it_out(tmp_path, caplog):
    feats = tmp_path / "feats"
    _, second = feature_set(feats)
    runner = CliRunner()
    res = runner.invoke(cli, fit_args([feats], tmp_path / "run"))
    assert res.exit_code == 0, res.output
    second.unlink()
    res = runner.invoke(cli, fit_args([feats], tmp_path / "run2"))
    assert res.exit_code == 1 and f"{second.name}: listed in manifest" in res.output and "missing" in res.output
    assert not (tmp_path / "run2" / "result.json").exists()
    res = runner.invoke(cli, ["evaluate", str(tmp_path / "run"), str(feats), "-o", str(tmp_path / "pred.jsonl")])
    assert res.exit_code == 1 and f"{second.name}: listed in manifest" in res.output
    assert not (tmp_path / "pred.jsonl").exists()
    res = runner.invoke(cli, ["ablate", str(feats), "-o", str(tmp_path / "grid"), "--agg", "avg", "--expensive", "m",
                              "--cheap", "m", "--pattern", "all-e", "--epochs", "1", "--workers", "0"])
    assert res.exit_code == 1 and f"{second.name}: listed in manifest" in res.output, res.output
    res = runner.invoke(cli, ["verify", str(feats)])
    assert res.exit_code == 1 and f"{second.name}: listed in" in res.output
    with caplog.at_level("WARNING"):
        found = integrity.check([feats], skip_bad=True)
    assert any(second.name in p for p in found.problems) and second.name in caplog.text
    res = runner.invoke(cli, ["verify", "--accept", second.name, str(feats)])  # forget it, explicitly
    assert res.exit_code == 0, res.output
    assert f"forgot {second.name}" in res.output
    assert integrity.check([feats]).problems == []


def test_a_deleted_shard_extracted_again_is_not_missing(tmp_path):
    """The writer drops a deleted shard from its part manifest when the part is extracted again: only
    the merged manifest still lists it, until the next merge; that is not a missing shard."""
    from faster.store.writer import FeatureSetWriter

    feats, ids = tmp_path / "feats", [f"v{i}.mp4" for i in range(8)]

    def extract(todo):
        with FeatureSetWriter(feats, HEADER, part=0, num_parts=2, shard_size=4) as w:  # no merge at the end
            for k, i in enumerate(todo):
                if i not in w.done:
                    w.add(id=i, label=k % 2, num_frames=20, fps=30.0, clip_start=[0, 6, 12],
                          features={"m": np.full((N, *SHAPE), k, np.float32)})

    extract(ids)
    assert CliRunner().invoke(cli, ["verify", str(feats)]).exit_code == 0
    gone = sorted(feats.glob(schema.SHARD_GLOB))[1]
    gone.unlink()
    with pytest.raises(ValueError, match=f"{gone.name}: listed in manifest-00000.json, manifest.json but missing"):
        integrity.check([feats])
    extract(ids)
    assert integrity.check([feats]).problems == []
    res = CliRunner().invoke(cli, ["verify", str(feats)])
    assert res.exit_code == 0, res.output
    assert "8 videos" in res.output


@pytest.mark.parametrize("which", ["manifest-00000.json", "manifest.json"])
def test_an_unreadable_manifest_does_not_switch_the_checks_off(tmp_path, which):
    feats = tmp_path / "feats"
    first, _ = feature_set(feats)
    edit(first)
    (feats / which).write_text("{not json")
    with pytest.raises(ValueError, match=f"{which}: cannot be read"):
        integrity.check([feats])
    found = integrity.check([feats], skip_bad=True)
    assert any(which in p for p in found.problems)
    assert str(first) in found.bad_shards  # still left out: changed, or its manifest unreadable
    res = CliRunner().invoke(cli, ["verify", str(feats)])
    assert res.exit_code == 1 and which in res.output


def test_a_manifest_whose_shards_lack_their_digest_is_reported_not_a_crash(tmp_path):
    feats = tmp_path / "feats"
    feature_set(feats)
    m = json.loads((feats / "manifest-00000.json").read_text())
    del m["shards"][0]["sha256"]
    (feats / "manifest-00000.json").write_text(json.dumps(m))
    res = CliRunner().invoke(cli, ["verify", str(feats)])
    assert res.exit_code == 1 and "manifest-00000.json" in res.output and "Traceback" not in res.output
    assert not isinstance(res.exception, KeyError), res.exception


# -- 13: reader buffers capped at the number of videos --------------------------------------------

def test_an_absurd_batch_size_allocates_for_the_videos_only(tmp_path):
    from faster.aggregate.synthetic import write_synthetic
    from faster.store.reader import FeatureSet, ThreadedLoader

    write_synthetic(tmp_path / "feats", num_videos=16, num_clips=4, shard_size=8)
    ds = FeatureSet([tmp_path / "feats"]).dataset({"expensive": ("exp", [0, 1, 2, 3])})
    loader = ThreadedLoader(ds, 100_000_000)
    assert [len(b["label"]) for b in loader] == [16]
    assert {len(t) for ring in loader._buffers for t in ring.values()} == {16}
    res = CliRunner().invoke(cli, ["fit", str(tmp_path / "feats"), "-o", str(tmp_path / "run"), "--agg", "avg",
                                   "--expensive", "exp", "--cheap", "chp", "--pattern", "1:1", "--epochs", "1",
                                   "--batch-size", "100000000", "--workers", "0", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "result.json").read_text())["num_train"] > 0


# -- 14: the cost of a long video is arithmetic on per-clip figures -------------------------------

TINY = ["--expensive", "r2plus1d50_tiny", "--cheap", "r2d26_tiny", "--size", "32", "--json"]


def test_flops_of_100000_clips_is_arithmetic_on_per_clip_figures():
    import time

    runner = CliRunner()

    def figures(*args):
        res = runner.invoke(cli, ["flops", *TINY, *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    short, longer = figures("--num-clips", "64"), figures("--num-clips", "128")  # counted (64) / from steps
    t0 = time.perf_counter()
    huge = figures("--num-clips", "100000")
    assert time.perf_counter() - t0 < 10
    step = (longer["aggregator_gflops"] - short["aggregator_gflops"]) / 64  # all-e: one kind of step
    assert huge["aggregator_gflops"] == pytest.approx(short["aggregator_gflops"] + (100000 - 64) * step, rel=1e-9)
    assert huge["video_gflops"] == pytest.approx(100000 * huge["clip_gflops"]["r2plus1d50_tiny"]
                                                 + huge["aggregator_gflops"], rel=1e-9)
    t0 = time.perf_counter()  # its first 32 steps are counted here (a cold cache): bounded whatever N
    exit_ = figures("--num-clips", "100000", "--pattern", "1:3", "--early-exit", "--exit-budget", "0.5")
    assert time.perf_counter() - t0 < 60 and exit_["clips_read"] == 50000


@pytest.mark.parametrize("agg", ["fastgru", "concat", "tam", "netvlad"])
def test_the_per_clip_steps_reproduce_the_exact_count(agg):
    from faster.aggregate import flops

    kwargs = {"num_classes": 5, "sources": {"expensive": [16, 1, 2, 2], "cheap": [8, 1, 2, 2]}, "dropout": 0.0}
    mask = [k % 3 == 0 for k in range(2 * flops.EXACT_CLIPS + 9)]
    assert flops.count_gflops(agg, kwargs, mask) == pytest.approx(flops._exact(agg, kwargs, mask), rel=1e-9)
    steps = flops.step_gflops(agg, kwargs, mask)
    assert steps[-1] == pytest.approx(flops._exact(agg, kwargs, mask), rel=1e-9)
    assert steps[-3] == pytest.approx(flops._exact(agg, kwargs, mask[:-2]), rel=1e-9)


# -- 15: flops names: --size NAME=PX of an unknown NAME, hf:PATH ----------------------------------

def test_flops_rejects_a_size_for_an_unknown_name_and_takes_hf_paths(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["flops", "--size", "nosuch=64"])
    assert res.exit_code == 2 and "nosuch=64" in res.output and "'nosuch' is neither --expensive" in res.output
    res = runner.invoke(cli, ["flops", "--list", "--size", "nosuch=64"])
    assert res.exit_code == 2 and "nosuch=64" in res.output
    missing = tmp_path / "no-model"
    res = runner.invoke(cli, ["flops", "--expensive", f"hf:{missing}", *TINY[2:]])
    assert res.exit_code == 2 and "unknown backbone" not in res.output and str(missing) in res.output
    assert "--expensive" in res.output


# -- 5, 9, 12: link loops, names that are not UTF-8, FIFOs: extract and pack ----------------------

def hostile_tree(root, video_bytes, suffix=".mp4"):
    """ROOT/c/good<suffix> (real), c/loopdir -> .. (a loop), c/alias<suffix> -> good (a second name),
    c/caf\\xe9<suffix> (a name that is not UTF-8), c/fifo<suffix> (a FIFO); returns the non-UTF-8 path."""
    import os

    (root / "c").mkdir(parents=True)
    (root / "c" / f"good{suffix}").write_bytes(video_bytes)
    os.symlink("..", root / "c" / "loopdir")
    os.symlink(f"good{suffix}", root / "c" / f"alias{suffix}")
    bad = root / "c" / os.fsdecode(b"caf\xe9" + suffix.encode())
    bad.write_bytes(video_bytes)
    os.mkfifo(root / "c" / f"fifo{suffix}")
    return bad


def test_discovery_reads_each_real_folder_and_file_once_and_refuses_what_cannot_be_decoded(tmp_path, caplog):
    from faster.extract import video

    hostile_tree(tmp_path / "sl", b"not decoded here")
    with caplog.at_level("WARNING"):
        found = video.discover(tmp_path / "sl")
    usable = [it.id for it in found.items if it.path is not None]
    refused = {it.id: (it.stage, it.error) for it in found.items if it.path is None}
    assert usable == ["c/good.mp4"]
    assert refused["c/caf\\xe9.mp4"][0] == "open" and "not valid UTF-8" in refused["c/caf\\xe9.mp4"][1]
    assert refused["c/fifo.mp4"][0] == "open" and "not a regular file (a FIFO)" in refused["c/fifo.mp4"][1]
    assert "'c/loopdir' skipped: a link to a folder read already" in caplog.text
    assert "'c/alias.mp4' is 'c/good.mp4'" in caplog.text


def test_extract_goes_on_past_a_loop_a_bad_name_and_a_fifo(tmp_path, motion_videos):
    import subprocess
    import sys

    video_file = sorted(motion_videos.rglob("*.mp4"))[0]
    hostile_tree(tmp_path / "sl", video_file.read_bytes())
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "faster", "extract", str(tmp_path / "sl"), "-o", str(out), "--model", "r2d26_tiny",
           "--clip-len", "8", "--num-clips", "2", "--size", "32", "--workers", "0", "--no-progress", "--dtype", "fp32"]
    for run in range(2):  # the rerun goes on past the same files too
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert ("extracted 1," if run == 0 else "skipped 1 (done before)") in proc.stdout, proc.stdout
    failures = {r["id"]: r for r in map(json.loads, (out / manifest.FAILURES).read_text().splitlines())}
    assert sorted(failures) == ["c/caf\\xe9.mp4", "c/fifo.mp4"]
    assert {r["stage"] for r in failures.values()} == {"open"}
    ids = [i for p in out.glob(schema.SHARD_GLOB) for i in h5py.File(p)["videos/id"].asstr()[()]]
    assert ids == ["c/good.mp4"]
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0


def test_pack_goes_on_past_a_loop_a_bad_name_and_a_fifo(tmp_path):
    import io

    from faster.pack import PackConfig, run_pack

    buf = io.BytesIO()
    np.save(buf, np.ones((2, 4), np.float32))
    hostile_tree(tmp_path / "src", buf.getvalue(), suffix=".npy")
    summary = run_pack(PackConfig(src=str(tmp_path / "src"), out=str(tmp_path / "feats"), model="x", clip_len=8,
                                  progress=False))
    assert (summary["packed"], summary["refused"]) == (1, 2)
    failures = {r["id"]: r for r in map(json.loads, (tmp_path / "feats" / manifest.FAILURES).read_text().splitlines())}
    assert sorted(failures) == ["c/caf\\xe9", "c/fifo"]
    assert "not valid UTF-8" in failures["c/caf\\xe9"]["error"] and "FIFO" in failures["c/fifo"]["error"]


# -- 11: a read-only directory: one line, not an OSError traceback --------------------------------

@pytest.fixture
def read_only(tmp_path):
    """make(path): the folder at ``path`` (its content written first) made read-only: by its mode, or,
    for root (whom modes do not stop), as a read-only tmpfs mount; skipped where neither works."""
    import os
    import shutil
    import subprocess

    mounts = []

    def make(path):
        if os.geteuid() != 0:
            for p in [path, *path.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
            return path
        staged = path.with_name(path.name + ".staged")
        path.rename(staged)
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("running as root without mount: no read-only folder to test with")
        mounts.append(path)
        shutil.copytree(staged, path, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)
    for p in tmp_path.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755)


def test_verify_and_extract_on_a_read_only_directory_say_so_in_one_line(tmp_path, read_only, motion_videos):
    feats = tmp_path / "feats"
    feature_set(feats)
    (feats / manifest.MANIFEST).unlink()
    read_only(feats)
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(feats)])
    assert res.exit_code == 0, res.output  # the checks stand; the merged views could not be written
    assert f"{feats}: the merged manifest.json and failures.jsonl were not written" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    res = runner.invoke(cli, ["verify", "--accept", "shard-00000-000000.h5", str(feats)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and str(feats) in res.output
    assert not isinstance(res.exception, OSError)
    args = ["--model", "r2d26_tiny", "--num-clips", "2", "--size", "32", "--workers", "0", "--no-progress"]
    (tmp_path / "empty").mkdir()
    empty = read_only(tmp_path / "empty")
    for out in (empty, empty / "new"):  # a read-only directory, and a new one inside it
        res = runner.invoke(cli, ["extract", str(motion_videos), "-o", str(out), *args])
        assert res.exit_code == 1 and not isinstance(res.exception, OSError), res.output
        assert res.output.strip().splitlines()[-1].startswith(f"Error: {out}: cannot")
