"""faster predict: agrees with evaluate, runs only the backbone the pattern names, samples the run's
clip positions, checks backbone weights against the run's provenance, skips broken videos."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from faster import synthetic
from faster.aggregate import patterns
from faster.aggregate.evaluation import evaluate
from faster.aggregate.fit import FitConfig, fit
from faster.cli import cli
from faster.extract.pipeline import ExtractConfig, extract_videos
from faster.predict import PredictConfig, PredictError, Predictor, check_weights, decoded_videos, list_videos, predict

E, C = "r2plus1d50_tiny", "r2d26_tiny"
N = 4  # clips extracted per video


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six labelled motion videos (64 px, 24 frames), their tiny-model features (N=4 clips of 8 frames
    at 32 px) and a FAST-GRU run on pattern 1:1; runs of other patterns are fitted on demand."""
    base = tmp_path_factory.mktemp("predict")
    videos, feats = base / "videos", base / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right", "up"), per_class=2, frames=24, size=64)
    extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=N, size=32, workers=0,
                              progress=False))
    runs = {}

    def run(pattern="1:1", num_clips=None, agg="fastgru"):
        key = (pattern, num_clips, agg)
        if key not in runs:
            out = base / f"run-{agg}-{pattern.replace(':', '_')}-{num_clips}"
            fit(FitConfig([str(feats)], str(out), agg, E, C, pattern, num_clips=num_clips, epochs=2, batch_size=4,
                          workers=0, progress=False, val_fraction=0.5))
            runs[key] = out
        return runs[key]

    return {"base": base, "videos": videos, "feats": feats, "run": run}


def _lines(path):
    return {r["id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def _predict(world, run, out, **kw):
    cfg = PredictConfig(videos=[str(world["videos"])], run=str(run), out=str(out), workers=0, **kw)
    return predict(cfg), _lines(out)


@pytest.mark.slow
@pytest.mark.parametrize("pattern,num_clips", [("1:1", None), ("first", 2)])
def test_predict_agrees_with_evaluate(world, tmp_path, pattern, num_clips):
    run = world["run"](pattern, num_clips)
    evaluate(run, [str(world["feats"])], str(tmp_path / "eval.jsonl"), workers=0, progress=False)
    summary, pred = _predict(world, run, tmp_path / "pred.jsonl")
    ev = _lines(tmp_path / "eval.jsonl")
    assert summary.predicted == len(ev) == 6 and summary.failed == 0
    assert set(pred) == set(ev)
    for vid, e in ev.items():
        p = pred[vid]
        # float16 rounding of the stored maps is reproduced, so the gap is far below 1e-2
        np.testing.assert_allclose(p["probs"], e["probs"], atol=1e-3, err_msg=vid)
        assert p["label"] == e["label"] >= 0
        assert p["gflops"] == pytest.approx(e["gflops"], rel=1e-9)
        assert [c for c, _ in p["top5"]] == [c for c, _ in e["top5"]] or max(abs(np.diff(e["probs"]))) < 1e-3
        assert p["seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["first", "1:1", "all-c", "all-e"])
def test_only_the_backbone_the_pattern_names_runs(world, pattern):
    run = world["run"](pattern)
    predictor = Predictor(run, device="cpu", batch_size=3)
    seen = []  # (model, clips) per backbone call
    for name, module in predictor.backbones.items():
        forward = module.forward

        def counting(x, _name=name, _forward=forward):
            seen.append((_name, x.shape[0]))
            return _forward(x)

        module.forward = counting
    mask = patterns.expensive_mask(pattern, N)
    n_e = sum(mask)
    # all-c never builds the expensive backbone, all-e never the cheap one
    assert set(predictor.backbones) == {m for m, used in ((E, n_e > 0), (C, n_e < N)) if used}
    clips = torch.randint(0, 255, (N, 8, 32, 32, 3), dtype=torch.uint8)
    record = predictor.classify(clips, video_id="v", online=True)
    calls = {m: sum(b for name, b in seen if name == m) for m in (E, C)}
    assert calls == {E: n_e, C: N - n_e}
    assert predictor.calls == {m: calls[m] for m in predictor.backbones}
    assert [s["model"] for s in record["online"]] == [E if m else C for m in mask]
    assert (record["num_expensive"], record["num_cheap"]) == (n_e, N - n_e)
    spec = predictor.run
    per_clip = {m: spec.models[m]["gflops_per_clip"] for m in spec.models}
    assert record["gflops"] == pytest.approx(n_e * per_clip[E] + (N - n_e) * per_clip[C] + spec.agg_gflops)
    # the prediction after the last clip is the video's prediction
    assert record["online"][-1]["probs"] == record["probs"]
    assert len(record["online"]) == N


@pytest.mark.slow
def test_chunking_does_not_change_the_prediction(world):
    run = world["run"]("first")
    clips = torch.randint(0, 255, (N, 8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = Predictor(run, device="cpu", batch_size=1).classify(clips, online=True)
    many = Predictor(run, device="cpu", batch_size=8).classify(clips, online=True)
    for a, b in zip(one["online"], many["online"]):
        assert a["model"] == b["model"]
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-4)
    assert len(set(tuple(np.round(s["probs"], 4)) for s in one["online"])) > 1  # the running prediction moves
    from_numpy = Predictor(run, device="cpu").classify(clips.numpy())  # what decode_clips returns: numpy uint8
    np.testing.assert_allclose(from_numpy["probs"], one["probs"], atol=1e-4)
    with pytest.raises(PredictError, match="uint8"):
        Predictor(run, device="cpu").classify(clips.float())


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_agrees_with_evaluate(world, tmp_path):
    run = world["run"]("1:1")
    evaluate(run, [str(world["feats"])], str(tmp_path / "eval.jsonl"), workers=0, progress=False, device="cpu")
    summary, pred = _predict(world, run, tmp_path / "pred.jsonl", device="cuda")
    ev = _lines(tmp_path / "eval.jsonl")
    assert summary.predicted == len(ev)
    for vid, e in ev.items():  # CPU-extracted features (float32), TF32 convolutions on the GPU
        np.testing.assert_allclose(pred[vid]["probs"], e["probs"], atol=1e-2, err_msg=vid)


@pytest.mark.slow
def test_num_clips_subset_decodes_the_runs_positions(world):
    run = world["run"]("1:1", 2)
    predictor = Predictor(run, device="cpu")
    assert predictor.run.positions == patterns.subset_positions(N, 2) == [0, 3]
    items = list_videos([str(world["videos"])], predictor.run.classes)[:2]
    full = dataclasses.replace(predictor.run, positions=list(range(N)), mask=[True] * N)
    subset = {it.id: d.frames for it, d in decoded_videos(items, predictor.run, workers=0)}
    whole = {it.id: d.frames for it, d in decoded_videos(items, full, workers=0)}
    for vid in subset:
        assert subset[vid].shape == (2, 8, 32, 32, 3)
        assert torch.equal(subset[vid], whole[vid][[0, 3]])
        assert not torch.equal(subset[vid], whole[vid][[0, 1]])  # the clips do differ: the test can fail


def test_check_weights_decisions(tmp_path):
    good = tmp_path / "w.pt"
    good.write_bytes(b"weights")
    import hashlib

    sha = hashlib.sha256(b"weights").hexdigest()
    assert check_weights("m", "random-init:seed=7", None) == (None, 7)
    assert check_weights("m", sha, str(good)) == (str(good), 0)
    with pytest.raises(PredictError, match=r"m: --weights .*missing.pt.* is no such file or directory, .*" + sha):
        check_weights("m", sha, str(tmp_path / "missing.pt"))
    # [24] item 15: say what the path is
    with pytest.raises(PredictError, match=r"m: --weights .* is a directory, not a weights file"):
        check_weights("m", sha, str(tmp_path))
    os.mkfifo(tmp_path / "pipe.mp4")
    with pytest.raises(PredictError, match=r"video .*pipe.mp4.*: a FIFO \(named pipe\), not a video file"):
        list_videos([str(tmp_path / "pipe.mp4")], ["a"])
    with pytest.raises(PredictError, match=r"pass --weights m=PATH"):
        check_weights("m", sha, None)
    with pytest.raises(PredictError, match=r"random initialisation \(random-init:seed=7\).*--weights m="):
        check_weights("m", "random-init:seed=7", str(good))
    other = tmp_path / "other.pt"
    other.write_bytes(b"other")
    with pytest.raises(PredictError, match=rf"m: weights file .*other.pt.* has sha256 [0-9a-f]{{64}}, .*with {sha}"):
        check_weights("m", sha, str(other))
    # a name that is no file (a torchvision weight enum) is built, then its provenance compared
    assert check_weights("m", sha, "R2Plus1D_18_Weights.KINETICS400_V1") == ("R2Plus1D_18_Weights.KINETICS400_V1", 0)


@pytest.mark.slow
def test_weights_provenance_end_to_end(world, tmp_path):
    """A run whose expensive features came from a weights file: the same file rebuilds it; a missing or
    different file is one clear CLI error naming the model, the expected and the given."""
    from faster.aggregate import run as rundir
    from faster.extract import models

    src = world["run"]("1:1")
    dst = tmp_path / "run"
    dst.mkdir()
    weights = tmp_path / "e.pt"
    sha = models.save_weights(models.build(E, seed=3), weights)
    ck = rundir.Run.load(src)
    ck.models[E] = {**ck.models[E], "weights": sha}
    ck.save(dst)
    shutil.copy(src / rundir.RESULT, dst / rundir.RESULT)

    predictor = Predictor(dst, {E: str(weights)}, device="cpu")
    assert predictor.backbones[E].weights == sha
    assert predictor.backbones[C].weights == "random-init:seed=0"  # rebuilt from the recorded seed

    video = sorted(world["videos"].rglob("*.mp4"))[0]
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", str(video), "--run", str(dst)])
    assert res.exit_code == 1 and f"{E}:" in res.output and sha in res.output and "--weights" in res.output
    res = runner.invoke(cli, ["predict", str(video), "--run", str(dst), "--weights", f"{E}={tmp_path / 'no.pt'}"])
    assert res.exit_code == 1 and "no.pt" in res.output and "no such file" in res.output and sha in res.output
    other = tmp_path / "other.pt"
    other_sha = models.save_weights(models.build(E, seed=4), other)
    res = runner.invoke(cli, ["predict", str(video), "--run", str(dst), "--weights", f"{E}={other}"])
    assert res.exit_code == 1, res.output
    assert all(s in res.output for s in (E, sha, other_sha, "other.pt")), res.output
    res = runner.invoke(cli, ["predict", str(video), "--run", str(dst), "--weights", f"{E}=NotAWeightName"])
    assert res.exit_code == 1 and E in res.output and "NotAWeightName" in res.output and sha in res.output
    res = runner.invoke(cli, ["predict", str(video), "--run", str(dst), "--weights", f"nosuch={other}"])
    assert res.exit_code == 1 and "nosuch" in res.output


@pytest.mark.slow
def test_cli_skips_a_broken_video_and_goes_on(world, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted(world["videos"].rglob("*.mp4"))[0]
    (mixed / "good.mp4").write_bytes(good.read_bytes())
    (mixed / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    (mixed / "notes.txt").write_text("ignored: not a video")
    out = tmp_path / "pred.jsonl"
    run = world["run"]("1:1")
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", str(mixed), "--run", str(run), "-o", str(out), "--online", "--workers", "1"])
    assert res.exit_code == 0, res.output
    lines = _lines(out)
    assert set(lines) == {"good.mp4", "broken.mp4"}
    assert lines["broken.mp4"]["stage"] in ("open", "decode") and lines["broken.mp4"]["error"]
    ok = lines["good.mp4"]
    assert len(ok["probs"]) == 3 and len(ok["top5"]) == 3 and ok["top5"][0][0] in ("left", "right", "up")
    assert len(ok["online"]) == N and ok["online"][-1]["probs"] == ok["probs"]
    assert "predicted 1 videos, failed 1" in res.output
    res = runner.invoke(cli, ["predict", str(mixed), "--run", str(run), "-o", str(out), "--strict", "--workers", "0"])
    assert res.exit_code == 1 and "1 of 2 videos failed" in res.output


def _fit_and_compare(videos, feats, tmp_path, agg):
    """Fit ``agg`` 1:1 on ``feats``, then assert predict on ``videos`` == evaluate on ``feats``."""
    run = tmp_path / "run"
    fit(FitConfig([str(feats)], str(run), agg, E, C, "1:1", epochs=2, batch_size=4, workers=0, progress=False,
                  val_fraction=0.5))
    evaluate(run, [str(feats)], str(tmp_path / "eval.jsonl"), workers=0, progress=False)
    _, pred = _predict({"videos": videos}, run, tmp_path / "pred.jsonl")
    ev = _lines(tmp_path / "eval.jsonl")
    assert set(pred) == set(ev)
    for vid, e in ev.items():
        np.testing.assert_allclose(pred[vid]["probs"], e["probs"], atol=1e-2, err_msg=vid)


@pytest.mark.slow
def test_predict_on_spatially_pooled_features_agrees_with_evaluate(tmp_path):
    """A run fitted on --spatial-pool features: predict pools the maps as extraction stored them."""
    videos, feats = tmp_path / "videos", tmp_path / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right"), per_class=2, frames=24, size=64)
    extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=N, size=32, workers=0,
                              progress=False, spatial_pool=True))
    _fit_and_compare(videos, feats, tmp_path, "gru")


@pytest.mark.slow
def test_a_big_little_extraction_fits_evaluates_and_predicts(tmp_path):
    """bLVNet's big-little: the expensive model at a low resolution, the cheap one at a high one, from
    one decode; the shard records each model's size and cost; predict == evaluate."""
    import h5py

    from faster.extract import models

    videos, feats = tmp_path / "videos", tmp_path / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right"), per_class=2, frames=24, size=128)
    extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=N, size=64, sizes={C: 128},
                              workers=0, progress=False))
    with h5py.File(next(feats.glob("shard-*.h5"))) as f:
        assert f.attrs["size"] == 128 and f.attrs["format_version"] == 3  # decoded once, at the larger crop
        e, c = f[f"features/{E}"], f[f"features/{C}"]
        assert (e.attrs["size"], c.attrs["size"]) == (64, 128)
        assert e.shape[2:5] == (1, 2, 2) and c.shape[2:5] == (1, 4, 4)
        assert c.attrs["gflops_per_clip"] == pytest.approx(models.clip_gflops(C, 8, 128))
        assert e.attrs["gflops_per_clip"] == pytest.approx(models.clip_gflops(E, 8, 64))
    _fit_and_compare(videos, feats, tmp_path, "fastgru")
    # a resume with another size for one model is refused
    with pytest.raises(ValueError, match="size"):
        extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=N, size=64, workers=0,
                                  progress=False))
