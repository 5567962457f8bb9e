"""The learned E/C schedule (pattern adaptive, aggregate/policy.py): it learns where to spend the
expensive backbone, holds its budget, costs what it ran, and predict follows evaluate's decisions."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from faster.aggregate.evaluation import evaluate
from faster.aggregate.fit import FitConfig, fit
from faster.aggregate.synthetic import write_synthetic
from faster.cli import cli

MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def spot_set(tmp_path_factory):
    """The planted task: the class (4) shows only in the expensive map of one clip per video, at a
    random position of 8; the cheap map has a class-agnostic cue at that clip."""
    return str(write_synthetic(tmp_path_factory.mktemp("spot"), num_videos=400, num_clips=8, signal="spot",
                               num_classes=4, amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=0))


def _cfg(feats, out, pattern, budget=None, agg="gru", **kw):
    base = dict(feats=[feats], out=str(out), agg=agg, expensive="exp", cheap="chp", pattern=pattern, budget=budget,
                epochs=12, batch_size=32, lr=1e-2, dropout=0.0, workers=0, threads=1, progress=False)
    return FitConfig(**{**base, **kw})


def test_a_policy_trains_on_per_video_draws(spot_set, tmp_path):
    result = fit(_cfg(spot_set, tmp_path / "j", "adaptive", 0.25, epochs=1, num_clips=4, train_clips="jitter"))
    row = json.loads((tmp_path / "j" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["num_cheap"] == 4 and row["train_positions_distinct"] > 8  # of 2^4 possible draws: per video
    assert np.isfinite(row["train_loss"])


def test_the_policy_spends_the_expensive_clip_where_the_class_is(spot_set, tmp_path):
    policy = fit(_cfg(spot_set, tmp_path / "policy", "adaptive", 0.125))
    fixed = fit(_cfg(spot_set, tmp_path / "fixed", "1:3"))
    # measured here: the policy 1.00 top-1 with 1.00 expensive clips per video; 1:3 0.42 with 2
    assert policy["top1"] >= 0.85 and policy["num_expensive_mean"] <= 1.5, policy
    assert fixed["top1"] <= 0.55 and fixed["num_expensive"] == 2, fixed
    assert policy["num_cheap"] == 8 and policy["budget"] == 0.125
    # its cost is what it ran: 8 cheap + the mean expensive clips + aggregator + gate, per video
    rows = [json.loads(x) for x in (tmp_path / "policy" / "val_predictions.jsonl").read_text().splitlines()]
    assert np.mean([r["gflops"] for r in rows]) == pytest.approx(policy["gflops_per_video"])
    one = next(r for r in rows if r["num_expensive"] == 1)
    assert one["gflops"] == pytest.approx(8 * 3.2 + 30.0 + policy["aggregator_gflops"], rel=0.05)
    assert fixed["gflops_per_video"] > policy["gflops_per_video"]


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_the_budget_penalty_holds_the_rate_near_b(tmp_path, budget):
    """On content that does not vary (the class in every clip) the gate has no reason to choose: the
    penalty alone sets the rate. Tolerance: 0.1 of the clips."""
    feats = write_synthetic(tmp_path / "f", num_videos=160, num_clips=8, signal="static", num_classes=3,
                            amplitude=2.0, models=MODELS, seed=1)
    r = fit(_cfg(str(feats), tmp_path / "r", "adaptive", budget, epochs=6))
    assert abs(r["num_expensive_mean"] / 8 - budget) <= 0.1, r["num_expensive_mean"]


def test_bad_combinations_are_refused(spot_set, tmp_path):
    with pytest.raises(ValueError, match="needs --budget"):
        fit(_cfg(spot_set, tmp_path / "a", "adaptive"))
    with pytest.raises(ValueError, match="--budget 0.5 is for --pattern adaptive"):
        fit(_cfg(spot_set, tmp_path / "b", "1:1", 0.5))
    with pytest.raises(ValueError, match="step state"):
        fit(_cfg(spot_set, tmp_path / "c", "adaptive", 0.25, agg="avg"))
    res = CliRunner().invoke(cli, ["fit", spot_set, "-o", str(tmp_path / "d"), "--agg", "gru", "--expensive", "exp",
                                   "--cheap", "chp", "--pattern", "adaptive", "--budget", "1.5"])
    assert res.exit_code == 2 and "--budget" in res.output


def test_flops_prints_the_expected_cost_at_the_budget():
    res = CliRunner().invoke(cli, ["flops", "--pattern", "adaptive", "--budget", "0.125", "--clip-len", "8",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    e, c = out["clip_gflops"]["r2plus1d50"], out["clip_gflops"]["r2d26"]
    assert out["num_expensive"] == 4 and out["num_cheap"] == 32  # 1/8 of 32 clips
    assert out["video_gflops"] == pytest.approx(4 * e + 32 * c + out["aggregator_gflops"] + out["gate_gflops"])
    assert 0 < out["gate_gflops"] < 0.01


@pytest.mark.slow
def test_predict_runs_the_expensive_backbone_exactly_where_evaluate_decided(tmp_path):
    from faster import synthetic
    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.predict import Predictor, decoded_videos, list_videos

    E, C = "r2plus1d50_tiny", "r2d26_tiny"
    videos, feats = tmp_path / "videos", tmp_path / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right", "up"), per_class=3, frames=24, size=64)
    extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=8, size=32, workers=0,
                              progress=False))
    run = tmp_path / "run"
    fit(FitConfig([str(feats)], str(run), "gru", E, C, "adaptive", budget=0.25, epochs=3, batch_size=4, workers=0,
                  progress=False, val_fraction=0.5, threads=1))
    evaluate(run, [str(feats)], str(tmp_path / "eval.jsonl"), workers=0, progress=False)
    ev = {r["id"]: r for r in map(json.loads, (tmp_path / "eval.jsonl").read_text().splitlines())}
    predictor = Predictor(run, device="cpu", batch_size=4)
    items = list_videos([str(videos)], predictor.run.classes)
    total = 0
    for item, decoded in decoded_videos(items, predictor.run, workers=0):
        before = predictor.calls[E]
        rec = predictor.classify(decoded.frames, video_id=item.id)
        assert predictor.calls[E] - before == rec["num_expensive"] == len(rec["expensive_clips"])
        assert rec["expensive_clips"] == ev[item.id]["expensive_clips"], item.id
        assert rec["num_cheap"] == ev[item.id]["num_cheap"] == 8
        np.testing.assert_allclose(rec["probs"], ev[item.id]["probs"], atol=1e-2)
        assert rec["gflops"] == pytest.approx(ev[item.id]["gflops"])
        total += rec["num_expensive"]
    assert predictor.calls[C] == 8 * len(items) and predictor.calls[E] == total


@pytest.mark.slow
def test_ablate_puts_budgets_beside_fixed_patterns_with_random_and_oracle_references(spot_set, tmp_path):
    import csv

    grid = tmp_path / "grid"
    res = CliRunner().invoke(cli, ["ablate", spot_set, "-o", str(grid), "--agg", "gru", "--pattern", "1:3,adaptive",
                                   "--budget", "0.125", "--epochs", "12", "--lr", "0.01", "--dropout", "0",
                                   "--batch-size", "32"])
    assert res.exit_code == 0, res.output
    rows = {r["pattern"]: r for r in csv.DictReader(open(grid / "results.csv"))}
    assert set(rows) == {"1:3", "adaptive@0.125", "oracle@0.125", "random@0.125"}
    top1 = {p: float(r["top1"]) for p, r in rows.items()}
    # measured: policy 1.00, oracle 1.00, random ~0.35, 1:3 ~0.42
    assert top1["adaptive@0.125"] >= 0.85 and top1["oracle@0.125"] >= top1["random@0.125"] + 0.3
    assert top1["1:3"] <= 0.55 and float(rows["adaptive@0.125"]["budget"]) == 0.125
    md = (grid / "results.md").read_text()
    assert "Policy B=0.125" in md and "Oracle B=0.125" in md and "Random B=0.125" in md
