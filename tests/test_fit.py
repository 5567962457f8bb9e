"""faster fit / evaluate on small synthetic shards: training, the planted temporal-order signal,
pattern positions, evaluate == fit's final predictions, the run directory, light imports."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from faster.aggregate import patterns
from faster.aggregate.fit import FitConfig, fit, make_plan
from faster.aggregate.run import Run
from faster.aggregate.synthetic import write_synthetic
from faster.cli import cli
from faster.store.reader import FeatureSet

MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}
RESULT_KEYS = {"top1", "top5", "mean_class_acc", "best", "gflops_per_video", "num_expensive", "num_cheap", "agg",
               "pattern", "num_clips", "clip_len", "expensive", "cheap", "num_train", "num_val", "seconds"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def static_set(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("static"), num_videos=96, num_clips=4, signal="static",
                               amplitude=2.0, num_classes=3, models=MODELS, seed=1, shard_size=40))


@pytest.fixture(scope="module")
def order_set(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("order"), num_videos=320, num_clips=8, signal="order",
                               amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=0))


def _cfg(feats, out, agg, **kw):
    base = dict(feats=[feats], out=str(out), agg=agg, expensive="exp", cheap="chp", pattern="1:1", epochs=3,
                batch_size=16, lr=1e-2, dropout=0.0, workers=0, threads=1, progress=False)
    return FitConfig(**{**base, **kw})


@pytest.mark.parametrize("agg", ["avg", "concat", "fastgru", "gru", "lstm"])
def test_every_aggregator_trains_and_its_loss_falls(static_set, tmp_path, agg):
    result = fit(_cfg(static_set, tmp_path / "run", agg))
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < 0.7 * lines[0]["train_loss"], lines
    assert RESULT_KEYS <= set(result) and result["top1"] >= 0.8  # 3 classes, a planted class direction
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    assert (result["num_expensive"], result["num_cheap"], result["num_clips"]) == (2, 2, 4)
    assert result["num_train"] + result["num_val"] == 96


def test_recurrent_aggregators_learn_temporal_order_and_avg_cannot(order_set, tmp_path):
    """Class = whether pulse a comes before pulse b: the clip-level statistics are the same for both
    classes, so avg pooling stays near chance (<= 0.65) while gru and fastgru reach >= 0.85: a margin
    of at least 0.3 (measured: avg ~0.5, gru/fastgru ~0.97 at seed 0)."""
    top1 = {agg: fit(_cfg(order_set, tmp_path / agg, agg, epochs=8, batch_size=32))["top1"]
            for agg in ("avg", "gru", "fastgru")}
    assert top1["avg"] <= 0.65, top1
    assert top1["gru"] >= 0.85 and top1["fastgru"] >= 0.85, top1
    assert min(top1["gru"], top1["fastgru"]) - top1["avg"] >= 0.3, top1


def test_pattern_positions_match_design(tmp_path):
    """1:x: positions 0, x+1, 2(x+1), ... expensive; --num-clips n uses round(i (N-1)/(n-1))."""
    fs = FeatureSet([write_synthetic(tmp_path / "s", num_videos=2, num_clips=16, models=MODELS, signal="none")])
    plan = make_plan(fs, agg="fastgru", expensive="exp", cheap="chp", pattern="1:3", num_clips=None,
                     num_classes=2, dropout=0.0)
    assert plan.sources["expensive"] == ("exp", [0, 4, 8, 12])  # Table 4: 1:3 at N=16 is 4 E and 12 C
    assert len(plan.sources["cheap"][1]) == 12
    plan = make_plan(fs, agg="gru", expensive="exp", cheap="chp", pattern="1:1", num_clips=4,
                     num_classes=2, dropout=0.0)
    assert plan.positions == [0, 5, 10, 15] == patterns.subset_positions(16, 4)
    assert plan.mask == [True, False, True, False]
    assert plan.sources == {"expensive": ("exp", [0, 10]), "cheap": ("chp", [5, 15])}
    first = make_plan(fs, agg="gru", expensive="exp", cheap="chp", pattern="first", num_clips=8,
                      num_classes=2, dropout=0.0)
    assert first.sources["expensive"] == ("exp", [0]) and first.positions == [0, 2, 4, 6, 9, 11, 13, 15]
    # the cost: #E x 30 + #C x 3.2 (the shards' gflops_per_clip) + the aggregator's counted share
    assert plan.gflops["per_video"] == pytest.approx(2 * 30.0 + 2 * 3.2 + plan.gflops["aggregator"])


def test_invalid_pattern_is_refused_before_any_work(static_set, tmp_path):
    with pytest.raises(ValueError, match="'1:2' needs the number of clips to be a multiple of 3, got 8"):
        fit(_cfg(static_set, tmp_path / "a", "gru", pattern="1:2", num_clips=8))
    with pytest.raises(ValueError, match="'1:2' needs the number of clips to be a multiple of 3, got 4"):
        fit(_cfg(static_set, tmp_path / "b", "gru", pattern="1:2"))  # N = 4 extracted
    with pytest.raises(ValueError, match="unknown pattern '2:1'"):
        fit(_cfg(static_set, tmp_path / "c", "gru", pattern="2:1"))
    with pytest.raises(ValueError, match="unknown aggregator 'transformer'"):
        fit(_cfg(static_set, tmp_path / "d", "transformer"))
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_evaluate_reproduces_fit_and_checkpoint_has_what_predict_needs(static_set, tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(cli, ["fit", static_set, "-o", str(run), "--agg", "fastgru", "--expensive", "exp",
                              "--cheap", "chp", "--pattern", "1:1", "--epochs", "2", "--batch-size", "16",
                              "--workers", "0", "--threads", "1", "--lr", "0.01"])
    assert res.exit_code == 0, res.output
    assert "fastgru 1:1 on 4 clips (2 E + 2 C): top-1" in res.output
    result = json.loads((run / "result.json").read_text())
    res = runner.invoke(cli, ["evaluate", str(run), static_set, "-o", str(tmp_path / "p.jsonl"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    fitted = {r["id"]: r for r in map(json.loads, (run / "val_predictions.jsonl").read_text().splitlines())}
    evaluated = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert len(evaluated) == 96 and len(fitted) == result["num_val"]
    for vid, r in fitted.items():
        e = evaluated[vid]
        assert e["label"] == r["label"] and [c for c, _ in e["top5"]] == [c for c, _ in r["top5"]]
        np.testing.assert_allclose(e["probs"], r["probs"], rtol=1e-5, atol=1e-6)
        assert e["gflops"] == pytest.approx(result["gflops_per_video"])
    val_top1 = np.mean([r["top5"][0][0] == f"class{r['label']:02d}" for r in fitted.values()])
    assert val_top1 == pytest.approx(result["top1"])
    ck = Run.load(run)  # weights_only=True inside
    torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck.config["agg"] == "fastgru" and ck.agg_kwargs["sources"]["cheap"] == [16, 1, 2, 2]
    assert ck.extraction == {"clip_len": 8, "num_clips": 4, "frame_stride": 1, "size": 32}
    assert ck.positions == [0, 1, 2, 3] and ck.mask == [True, False, True, False] and ck.pattern == "1:1"
    assert ck.models["exp"]["shape"] == [1, 2, 2, 16] and ck.models["chp"]["gflops_per_clip"] == 3.2
    assert set(ck.models["exp"]) >= {"weights", "mean", "std", "gflops_per_clip", "compute_dtype", "layer"}
    assert ck.classes == ["class00", "class01", "class02"]
    res = runner.invoke(cli, ["evaluate", str(tmp_path), static_set])
    assert res.exit_code != 0 and "no checkpoint" in res.output


def test_fit_is_deterministic_on_cpu_and_honours_a_val_set(static_set, tmp_path):
    val = str(write_synthetic(tmp_path / "val", num_videos=20, num_clips=4, signal="static", num_classes=3,
                              models=MODELS, seed=7, id_prefix="val"))
    a = fit(_cfg(static_set, tmp_path / "a", "concat", epochs=2, val=[val], optimizer="sgd"))
    b = fit(_cfg(static_set, tmp_path / "b", "concat", epochs=2, val=[val], optimizer="sgd"))
    assert a["num_train"] == 96 and a["num_val"] == 20
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    sa, sb = Run.load(tmp_path / "a").state_dict, Run.load(tmp_path / "b").state_dict
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_fit_never_imports_a_backbone(static_set, tmp_path):
    code = ("import sys, json\nfrom faster.cli import cli\n"
            "try:\n"
            f"    cli(['fit', {static_set!r}, '-o', {str(tmp_path / 'r')!r}, '--agg', 'gru', '--expensive', 'exp',"
            " '--cheap', 'chp', '--pattern', 'first', '--epochs', '1', '--workers', '0', '--threads', '1'], prog_name='faster')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('torchvision', 'decord')"
            " or m.startswith('faster.extract')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "r" / "result.json").exists()


def test_fit_standardises_inputs_with_training_statistics(static_set, tmp_path):
    import h5py

    from faster.store.reader import list_shards

    fit(_cfg(static_set, tmp_path / "std", "fastgru", epochs=1, val=[static_set]))  # train = every video
    agg = Run.load(tmp_path / "std").aggregator()
    for src, model, positions in (("expensive", "exp", [0, 2]), ("cheap", "chp", [1, 3])):  # 1:1 at 4 clips
        maps = []
        for shard in list_shards(static_set):
            with h5py.File(shard, "r") as f:
                maps.append(f[f"features/{model}"][()][:, positions].astype(np.float64))
        x = np.concatenate(maps).reshape(-1, 16)  # (videos * clips * T' * H' * W', C)
        align = agg.align[src]
        np.testing.assert_allclose(align.in_mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(align.in_std.numpy(), x.std(0), rtol=1e-4, atol=1e-5)

    fit(_cfg(static_set, tmp_path / "raw", "fastgru", epochs=1, standardize=False))
    agg = Run.load(tmp_path / "raw").aggregator()
    assert torch.equal(agg.align["expensive"].in_mean, torch.zeros(16))
    assert torch.equal(agg.align["expensive"].in_std, torch.ones(16))


def _damaged_copy(static_set, dst, *, keep_manifests):
    """A copy of the static set with NaN in one video's exp features (video 3 of the first shard)."""
    import shutil

    import h5py

    shutil.copytree(static_set, dst)
    if not keep_manifests:
        for m in dst.glob("manifest*.json"):
            m.unlink()
    shard = sorted(dst.glob("shard-*.h5"))[0]
    with h5py.File(shard, "a") as f:
        f["features/exp"][3, 0, 0, 0, 0, :] = np.nan
        victim = f["videos/id"].asstr()[3]
    return shard, victim


def test_a_shard_changed_after_writing_stops_fit_before_training_or_is_skipped(static_set, tmp_path):
    shard, _ = _damaged_copy(static_set, tmp_path / "feats", keep_manifests=True)
    runner = CliRunner()
    args = ["fit", str(tmp_path / "feats"), "--agg", "avg", "--expensive", "exp", "--cheap", "chp", "--pattern", "1:1",
            "--epochs", "1", "--threads", "1"]
    res = runner.invoke(cli, [*args, "-o", str(tmp_path / "run")])
    assert res.exit_code == 1 and str(shard) in res.output and "sha256" in res.output, res.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
    res = runner.invoke(cli, [*args, "-o", str(tmp_path / "run"), "--skip-bad"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["skipped"]["shards"] == [str(shard)]
    assert result["num_train"] + result["num_val"] == 96 - 40  # the shard's 40 videos left out


def test_non_finite_features_name_the_video_or_are_left_out(static_set, tmp_path):
    shard, victim = _damaged_copy(static_set, tmp_path / "feats", keep_manifests=False)
    feats = str(tmp_path / "feats")
    with pytest.raises(ValueError, match=rf"{shard.name}: video '{victim}' has non-finite exp features"):
        fit(_cfg(feats, tmp_path / "a", "avg", epochs=1, val_fraction=0.5))
    assert not (tmp_path / "a").exists()  # the interrupted fit left nothing behind
    result = fit(_cfg(feats, tmp_path / "b", "avg", epochs=1, skip_bad=True))
    assert result["skipped"]["videos"] == [victim] and result["num_train"] + result["num_val"] == 95


def test_fit_refuses_an_existing_run_and_an_interrupted_one_is_resumable(static_set, tmp_path, monkeypatch):
    """Changed in [17]: a fit stopped during training leaves a resumable partial run (it left nothing
    before); evaluate refuses it as incomplete, naming it, and fit asks for --resume or --overwrite."""
    from faster import engine

    fit(_cfg(static_set, tmp_path / "r", "avg", epochs=1))
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run .*--overwrite"):
        fit(_cfg(static_set, tmp_path / "r", "fastgru", epochs=1))
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before  # untouched
    assert fit(_cfg(static_set, tmp_path / "r", "gru", epochs=1, overwrite=True))["agg"] == "gru"

    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    real = engine.Engine.train_epoch
    monkeypatch.setattr(engine.Engine, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(static_set, tmp_path / "ctrl-c", "avg", epochs=3))
    assert (tmp_path / "ctrl-c" / "last.pt").is_file() and not (tmp_path / "ctrl-c" / "result.json").exists()
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "ctrl-c"), static_set])
    assert res.exit_code == 1 and "incomplete run" in res.output and str(tmp_path / "ctrl-c") in res.output
    with pytest.raises(ValueError, match=r"interrupted fit .*--resume .*--overwrite"):
        fit(_cfg(static_set, tmp_path / "ctrl-c", "avg", epochs=3))
    monkeypatch.setattr(engine.Engine, "train_epoch", real)
    assert fit(_cfg(static_set, tmp_path / "ctrl-c", "avg", epochs=3, resume=True))["best"]["epoch"] >= 1
    (tmp_path / "half").mkdir()  # what a SIGKILLed fit leaves: a checkpoint but no result.json
    (tmp_path / "half" / "checkpoint.pt").write_bytes(before)
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "half"), static_set])
    assert res.exit_code == 1 and "incomplete run" in res.output and str(tmp_path / "half") in res.output


def test_agg_options_are_checked_recorded_and_init_centres_runs(order_set, tmp_path):
    with pytest.raises(ValueError, match="--agg-option 'k' is not an option of netvlad; it accepts: clusters, dim, hidden, descriptors"):
        fit(_cfg(order_set, tmp_path / "bad", "netvlad", agg_options={"k": 8}))
    with pytest.raises(ValueError, match="--init-centres is for aggregators with cluster centres"):
        fit(_cfg(order_set, tmp_path / "bad", "gru", init_centres=True))
    out = tmp_path / "nv"
    res = CliRunner().invoke(cli, ["fit", order_set, "-o", str(out), "--agg", "netvlad", "--expensive", "exp",
                                   "--cheap", "chp", "--pattern", "1:1", "--epochs", "1", "--agg-option", "clusters=5",
                                   "--agg-option", "descriptors=positions", "--init-centres"])
    assert res.exit_code == 0, res.output
    r = Run.load(out)
    assert (r.agg_kwargs["clusters"], r.agg_kwargs["descriptors"]) == (5, "positions")
    assert json.loads((out / "config.json").read_text())["agg_options"] == {"clusters": 5, "descriptors": "positions"}
    assert r.state_dict["centres"].shape[0] == 5
    res = CliRunner().invoke(cli, ["fit", order_set, "-o", str(tmp_path / "x"), "--agg", "tam", "--expensive", "exp",
                                   "--cheap", "chp", "--pattern", "1:1", "--agg-option", "width"])
    assert res.exit_code != 0 and "expected KEY=VALUE" in res.output


def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(static_set, tmp_path):
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint\n" * 20)
    (tmp_path / "result.json").write_text("{}")
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path), static_set])
    assert res.exit_code == 1 and "not a PyTorch checkpoint" in res.output
    assert str(tmp_path / "checkpoint.pt") in res.output and len(res.output.strip().splitlines()) == 1
