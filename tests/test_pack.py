"""`faster pack`: other tools' per-video .npy features into shards that verify, fit and evaluate use."""
import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from faster.cli import cli
from faster.errors import BadFile, BadValue
from faster.pack import PackConfig, find_files, read_file, run_pack
from faster.store import manifest

N, C = 8, 16
CLASSES = ("dance", "jump")


def write_video_features(root, *, per_class=20, amplitude=1.5, seed=0, extras=True):
    """video_features-style files: ROOT/<class>/take <i>_i3d.npy holding (N, C) float32, with a class
    direction planted in every clip; plus a corrupt file, a wrong-shape one, a short one and a
    video_features side file (``_fps.npy``) that --strip-suffix _i3d must ignore. Returns id -> array."""
    rng = np.random.default_rng(seed)
    dirs = np.random.default_rng(123).standard_normal((len(CLASSES), C))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    arrays = {}
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = (rng.standard_normal((N, C)) + amplitude * dirs[k]).astype(np.float32)
            np.save(root / name / f"take {i}_i3d.npy", x)
            arrays[f"{name}/take {i}"] = x
    if extras:
        (root / "dance" / "broken_i3d.npy").write_bytes(b"\x93NUMPY\x01\x00garbage, not a header")
        np.save(root / "jump" / "wide_i3d.npy", np.zeros((N, C + 1), np.float32))  # another C
        np.save(root / "jump" / "short_i3d.npy", np.zeros((N - 3, C), np.float32))  # another N
        np.save(root / "dance" / "take 0_fps.npy", np.array([30.0]))  # not a feature file
    return arrays


def pack_args(src, out, *extra):
    return ["pack", str(src), "-o", str(out), "--model", "i3d", "--clip-len", "16", "--strip-suffix", "_i3d",
            "--gflops-per-clip", "27.9", "--no-progress", *extra]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(src, out, arrays, CLI output) of one pack of write_video_features' files."""
    root = tmp_path_factory.mktemp("pack")
    src, out = root / "i3d features", root / "feats"
    arrays = write_video_features(src)
    res = CliRunner().invoke(cli, pack_args(src, out, "--shard-size", "16"))
    assert res.exit_code == 0, res.output
    return src, out, arrays, res.output


def read_shards(out, model="i3d"):
    """id -> (label, num_frames, clip_start, features) over every shard of ``out``."""
    rows = {}
    for path in sorted(out.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            v = f["videos"]
            for r, video_id in enumerate(v["id"].asstr()[()]):
                rows[video_id] = (int(v["label"][r]), int(v["num_frames"][r]), v["clip_start"][r], f["features"][model][r])
    return rows


def test_shards_hold_the_files_values_labels_and_unknowns(packed):
    src, out, arrays, output = packed
    assert f"packed 40, skipped 0 (done before), failed 3 (see {out / 'failures-00000.jsonl'})" in output
    assert "8 clips of 1 x 1 x 1 x 16 (T' x H' x W' x C), 2 classes [folders]" in output
    rows = read_shards(out)
    assert sorted(rows) == sorted(arrays)  # ids keep their spaces, lose _i3d.npy; the _fps file is ignored
    for video_id, x in arrays.items():
        label, num_frames, starts, feats = rows[video_id]
        assert label == CLASSES.index(video_id.split("/")[0])
        assert num_frames == -1 and starts.tolist() == [-1] * N
        assert feats.dtype == np.float16 and feats.shape == (N, 1, 1, 1, C)
        np.testing.assert_array_equal(feats[:, 0, 0, 0], x.astype(np.float16))
    with h5py.File(next(out.glob("shard-*.h5")), "r") as f:
        a = dict(f["features/i3d"].attrs)
        assert a["weights"] == f"packed:{src.resolve()}" and a["layer"] == "packed"
        assert a["gflops_per_clip"] == pytest.approx(27.9) and a["compute_dtype"] == "unknown"
        assert json.loads(f.attrs["classes"]) == list(CLASSES) and f.attrs["clip_len"] == 16
        assert f.attrs["num_clips"] == N and f.attrs["size"] == -1 and f.attrs["frame_stride"] == -1


def test_bad_files_are_listed_with_their_reason(packed):
    _, out, _, _ = packed
    failures = {r["id"]: r for r in manifest.read_failures(out / "failures.jsonl")}
    assert sorted(failures) == ["dance/broken", "jump/short", "jump/wide"]
    assert {r["stage"] for r in failures.values()} == {"pack"}
    assert "not a readable .npy array" in failures["dance/broken"]["error"]
    assert failures["jump/short"]["error"] == f"{N - 3} clips; the others have {N} (fixed by dance/take 0_i3d.npy)"
    assert failures["jump/wide"]["error"].startswith(f"clips of shape (1, 1, 1, {C + 1})")
    assert failures["jump/wide"]["file"] == "jump/wide_i3d.npy"


def test_verify_passes_on_a_packed_set(packed):
    _, out, _, _ = packed
    res = CliRunner().invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 shards, 40 videos, 3 failed (pack 3), models i3d: ok" in res.output


def test_fit_learns_the_planted_signal_and_predict_refuses_the_run(packed, tmp_path):
    from faster.aggregate.run import Run
    from faster.predict import PredictError, Predictor, check_weights

    src, out, _, _ = packed
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(out), "-o", str(run), "--agg", "avg", "--expensive", "i3d",
                                   "--cheap", "i3d", "--pattern", "all-e", "--epochs", "15", "--batch-size", "8",
                                   "--lr", "0.01", "--threads", "1"])
    assert res.exit_code == 0, res.output
    result = json.loads((run / "result.json").read_text())
    assert result["top1"] >= 0.9, result  # chance is 0.5
    assert result["gflops_per_video"] == pytest.approx(8 * 27.9 + result["aggregator_gflops"])
    recorded = Run.load(run).models["i3d"]["weights"]
    msg = (f"i3d: the run's features were packed from {src.resolve()} by `faster pack`; there is no backbone "
           f"to rebuild, so `faster predict` cannot run it (evaluate works on packed features)")
    with pytest.raises(PredictError) as err:
        check_weights("i3d", recorded, None)
    assert str(err.value) == msg
    with pytest.raises(PredictError, match="there is no backbone to rebuild"):
        Predictor(run, device="cpu")
    res = CliRunner().invoke(cli, ["evaluate", str(run), str(out), "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0, res.output


def test_resume_packs_only_what_is_missing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "feats"
    arrays = write_video_features(src, per_class=3)
    runner = CliRunner()
    res = runner.invoke(cli, pack_args(src, out, "--shard-size", "2"))
    assert res.exit_code == 0 and "packed 6, skipped 0 (done before), failed 3" in res.output, res.output
    shards = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    x = np.ones((N, C), np.float32)
    np.save(src / "jump" / "late_i3d.npy", x)  # a new video, and a bad file fixed
    np.save(src / "jump" / "short_i3d.npy", -x)
    res = runner.invoke(cli, pack_args(src, out, "--shard-size", "2"))
    assert res.exit_code == 0 and "packed 2, skipped 6 (done before), failed 2" in res.output, res.output
    assert all(p.stat().st_mtime_ns == shards[p.name] for p in out.glob("shard-*.h5") if p.name in shards)
    rows = read_shards(out)
    assert len(rows) == 8 and set(arrays) < set(rows)
    np.testing.assert_array_equal(rows["jump/short"][3][:, 0, 0, 0], -x.astype(np.float16))
    failures = {r["id"] for r in manifest.read_failures(out / "failures.jsonl")}
    assert failures == {"dance/broken", "jump/wide"}  # the fixed file's old failure is gone
    res = runner.invoke(cli, pack_args(src, out, "--shard-size", "2"))
    assert "packed 0, skipped 8 (done before), failed 2" in res.output, res.output
    assert runner.invoke(cli, ["verify", str(out)]).exit_code == 0


def test_strict_exits_1_when_a_file_failed(tmp_path):
    src = tmp_path / "src"
    write_video_features(src, per_class=2)
    res = CliRunner().invoke(cli, pack_args(src, tmp_path / "feats", "--strict"))
    assert res.exit_code == 1
    assert "packed 4, skipped 0 (done before), failed 3" in res.output
    assert "Error: 3 files could not be packed (--strict)" in res.output
    clean = tmp_path / "clean"
    write_video_features(clean, per_class=2, extras=False)
    res = CliRunner().invoke(cli, pack_args(clean, tmp_path / "feats2", "--strict"))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("channels_first", [False, True])
def test_maps_round_trip(tmp_path, channels_first):
    rng = np.random.default_rng(1)
    src = tmp_path / "maps"
    (src / "a").mkdir(parents=True)
    arrays = {}
    for i in range(3):
        x = rng.standard_normal((4, 2, 3, 3, 5)).astype(np.float32)  # (N, T', H', W', C)
        np.save(src / "a" / f"v{i}.npy", x.transpose(0, 4, 1, 2, 3) if channels_first else x)  # (N, C, T', H', W')
        arrays[f"a/v{i}"] = x
    out = tmp_path / "feats"
    args = ["pack", str(src), "-o", str(out), "--model", "m", "--clip-len", "8", "--no-progress"]
    res = CliRunner().invoke(cli, args + (["--channels-first"] if channels_first else []))
    assert res.exit_code == 0, res.output
    assert "packed 3, skipped 0 (done before), failed 0; 4 clips of 2 x 3 x 3 x 5" in res.output
    rows = read_shards(out, "m")
    for video_id, x in arrays.items():
        np.testing.assert_array_equal(rows[video_id][3], x.astype(np.float16))
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0


def test_annotations_and_classes_give_labels_by_id(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for video_id in ("clip one", "clip two", "clip three"):
        np.save(src / f"{video_id}_r21d.npy", np.zeros((2, 4), np.float32))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\nclip one.mp4,b,train\nclip two,a,val\nclip four,a,val\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("b\na\n")
    cfg = PackConfig(src=str(src), out=str(tmp_path / "feats"), model="r21d", clip_len=8, strip_suffix="_r21d",
                     annotations=str(csv), classes_file=str(classes), progress=False)
    summary = run_pack(cfg)
    assert (summary["packed"], summary["failed"], summary["missing"], summary["layout"]) == (2, 1, 1, "csv")
    rows = read_shards(tmp_path / "feats", "r21d")
    assert {k: v[0] for k, v in rows.items()} == {"clip one": 0, "clip two": 1}  # "clip three" is not listed
    with h5py.File(next((tmp_path / "feats").glob("shard-*.h5")), "r") as f:
        assert f["videos/split"].asstr()[()].tolist() == ["train", "val"]
    (failure,) = manifest.read_failures(tmp_path / "feats" / "failures.jsonl")
    assert failure["id"] == "clip four" and failure["stage"] == "missing"


def test_gflops_not_given_is_zero_with_a_warning(tmp_path, caplog):
    src = tmp_path / "src"
    write_video_features(src, per_class=1, extras=False)
    cfg = PackConfig(src=str(src), out=str(tmp_path / "feats"), model="i3d", clip_len=16, progress=False)
    with caplog.at_level("WARNING", logger="faster.pack"):
        summary = run_pack(cfg)
    assert "no --gflops-per-clip given: recorded as 0" in caplog.text
    assert summary["packed"] == 2 and summary["classes"] == 2
    with h5py.File(next((tmp_path / "feats").glob("shard-*.h5")), "r") as f:
        assert f["features/i3d"].attrs["gflops_per_clip"] == 0.0
        assert sorted(f["videos/id"].asstr()[()]) == ["dance/take 0_i3d", "jump/take 0_i3d"]  # nothing stripped


def test_links_that_leave_src_are_refused(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    write_video_features(src, per_class=1, extras=False)
    (outside / "more").mkdir(parents=True)
    np.save(outside / "secret.npy", np.zeros((N, C), np.float32))
    np.save(outside / "more" / "x.npy", np.zeros((N, C), np.float32))
    os.symlink(outside / "secret.npy", src / "dance" / "linked.npy")
    os.symlink(outside / "more", src / "jump" / "more")
    os.symlink(src / "dance" / "take 0_i3d.npy", src / "jump" / "alias.npy")  # inside: one file, read once ([24])
    os.symlink(src, src / "jump" / "loop")  # a cycle: read once
    found = find_files(src)
    assert sorted(found.files) == ["dance/take 0_i3d", "jump/take 0_i3d"]
    assert any("'jump/alias.npy' is 'dance/take 0_i3d.npy'" in n for n in found.notes)
    assert "a link to outside SRC" in found.refused["dance/linked"]
    assert any("'jump/more' skipped: a link to outside SRC" in n for n in found.notes)
    summary = run_pack(PackConfig(src=str(src), out=str(tmp_path / "feats"), model="i3d", clip_len=16,
                                  progress=False))
    assert (summary["packed"], summary["failed"], summary["refused"]) == (2, 1, 1)


@pytest.mark.parametrize("content, reason", [
    (b"just text", "not a .npy array (no NUMPY magic"),
    (np.array([{"a": 1}], dtype=object), "not a readable .npy array"),  # never unpickled
    (np.zeros((2, 3, 4)), "shape (2, 3, 4) has rank 3; expected (N, C) or (N, T', H', W', C)"),
    (np.zeros((0, 4)), "shape (0, 1, 1, 1, 4) is empty"),
    (np.array([[1.0, np.nan], [np.inf, 2.0]]), "1 NaN and 1 inf values"),
    (np.array([[1e6, 1.0]]), "values up to 1e+06 overflow float16"),
    (np.array([["a", "b"]]), "dtype <U1; expected real numbers"),
])
def test_unusable_files_name_their_reason(tmp_path, content, reason):
    path = tmp_path / "x.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(BadFile) as err:
        read_file(path)
    assert reason in str(err.value)


def test_npz_and_truncated_files_are_refused(tmp_path):
    np.savez(tmp_path / "z.npz", a=np.ones((2, 2)))
    os.replace(tmp_path / "z.npz", tmp_path / "z.npy")
    with pytest.raises(BadFile, match="not a .npy array"):  # a zip starts with PK, not the NUMPY magic
        read_file(tmp_path / "z.npy")
    np.save(tmp_path / "t.npy", np.ones((100, 4)))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-40])
    with pytest.raises(BadFile, match="not a readable .npy array"):
        read_file(tmp_path / "t.npy")
    np.save(tmp_path / "i.npy", np.arange(8, dtype=np.int32).reshape(2, 4))  # integers are fine
    assert read_file(tmp_path / "i.npy").shape == (2, 1, 1, 1, 4)


@pytest.mark.parametrize("field, value, match", [
    ("model", "a/b", "model name 'a/b'"),
    ("model", "", "model name ''"),
    ("clip_len", 0, "clip_len must be >= 1, got 0"),
    ("shard_size", 0, "shard_size must be >= 1, got 0"),
    ("gflops_per_clip", -1.0, "gflops_per_clip must be a finite number >= 0, got -1.0"),
    ("gflops_per_clip", float("nan"), "got nan"),
    ("strip_suffix", "x/_i3d", "strip_suffix 'x/_i3d' contains a path separator"),
    ("strip_suffix", "_i3d.npy", "give the text before .npy, e.g. '_i3d'"),
])
def test_config_names_the_bad_value(tmp_path, field, value, match):
    kw = dict(src=str(tmp_path), out=str(tmp_path / "o"), model="m", clip_len=8)
    with pytest.raises(BadValue, match=match):
        PackConfig(**{**kw, field: value})


def test_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["pack", str(empty), "-o", str(tmp_path / "o"), "--model", "m", "--clip-len", "8"])
    assert res.exit_code == 1 and f"Error: no .npy files in {str(empty)!r}" in res.output
    (empty / "bad.npy").write_bytes(b"nope")
    res = CliRunner().invoke(cli, ["pack", str(empty), "-o", str(tmp_path / "o"), "--model", "m", "--clip-len", "8"])
    assert res.exit_code == 1 and "none of the 1 .npy files" in res.output and "bad: not a .npy array" in res.output
    src = tmp_path / "src"
    write_video_features(src, per_class=1, extras=False)
    out = tmp_path / "feats"
    assert CliRunner().invoke(cli, pack_args(src, out)).exit_code == 0
    res = CliRunner().invoke(cli, pack_args(src, out)[:-1] + ["--clip-len", "8", "--no-progress"])
    assert res.exit_code == 1 and "holds features of another configuration" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("channels_first", [False, True])
def test_every_stored_layout_packs_as_np_load_and_a_float16_cast(tmp_path, channels_first):
    """pack reads each file with one read call, no memory map (issue [22]): the values stored are
    np.load's cast to float16, whatever the file's dtype, byte order or memory order."""
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    base = rng.standard_normal((3, 2, 1, 2, 4)) * 300  # (N, T', H', W', C)
    stored = {"f32": base.astype(np.float32), "f64": base, "big": base.astype(">f4"),
              "fortran": np.asfortranarray(base.astype(np.float32)), "int": np.round(base).astype(np.int16),
              "f16": base.astype(np.float16)}
    for name, x in stored.items():
        np.save(src / "a" / f"{name}.npy", x.transpose(0, 4, 1, 2, 3) if channels_first else x)
    out = tmp_path / "feats"
    s = run_pack(PackConfig(src=str(src), out=str(out), model="m", clip_len=8, shard_size=4,
                            channels_first=channels_first, progress=False))
    assert (s["packed"], s["failed"]) == (len(stored), 0)
    rows = read_shards(out, "m")
    for name in stored:
        want = read_file(src / "a" / f"{name}.npy", channels_first).astype(np.float16)
        np.testing.assert_array_equal(rows[f"a/{name}"][3], want, err_msg=name)
        np.testing.assert_array_equal(want, stored[name].astype(np.float16), err_msg=name)
