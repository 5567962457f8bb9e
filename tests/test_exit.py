"""Early exit ([20], aggregate/exit.py, schedule EarlyExit): the clip orders, the calibration to a
budget, batched == online exits, costs that count only the clips read, and (``-m slow``) the
acceptance task: half the videos show their class in every clip, half in one clip only."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from faster.aggregate import schedule
from faster.aggregate.evaluation import evaluate
from faster.aggregate.exit import exit_steps, geometric_target, quota_thresholds, single_threshold
from faster.aggregate.fit import FitConfig, fit
from faster.aggregate.models import build
from faster.aggregate.synthetic import write_synthetic
from faster.cli import cli

MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}
SHAPE = [16, 1, 2, 2]  # C, T', H', W'

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_coarse_to_fine_visits_every_clip_coarse_levels_first():
    assert schedule.visit_order("coarse-to-fine", 8) == [0, 4, 2, 6, 1, 3, 5, 7]  # FrameExit's order
    assert schedule.visit_order("coarse-to-fine", 6) == [0, 3, 1, 4, 2, 5]
    assert schedule.visit_order("coarse-to-fine", 1) == [0]
    assert schedule.visit_order("temporal", 5) == [0, 1, 2, 3, 4]
    for n in range(1, 40):
        order = schedule.visit_order("coarse-to-fine", n)
        assert sorted(order) == list(range(n)), n
        assert n < 2 or order[1] == n // 2  # the middle second: a video left after two clips is covered
    with pytest.raises(ValueError, match="--order"):
        schedule.visit_order("backwards", 4)
    assert schedule.resolve_order(None, True) == "coarse-to-fine"
    assert schedule.resolve_order(None, False) == "temporal"
    from faster import cli as cli_module

    assert cli_module.ORDERS == schedule.ORDERS and cli_module.EXITS == schedule.EXITS  # spelled twice: --help stays light


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_calibration_reads_the_budget_on_the_videos_it_saw(budget):
    rng = np.random.default_rng(0)
    scores = np.cumsum(rng.exponential(size=(400, 8)), axis=1)  # confidence grows as clips are read
    q = geometric_target(8, budget)
    assert q.sum() == pytest.approx(1) and (q * np.arange(1, 9)).sum() == pytest.approx(8 * budget, rel=1e-6)
    for thresholds in (quota_thresholds(scores, budget), single_threshold(scores, budget)):
        assert thresholds[-1] == -np.inf  # the last clip always ends a video
        read = (exit_steps(scores, thresholds) + 1).mean() / 8
        assert abs(read - budget) <= 0.02, (budget, read)


def _features(pattern, n=8, videos=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = {src: torch.randn(videos, n, 1, 2, 2, 16, generator=g) for src in ("expensive", "cheap")}
    mask = schedule.create(pattern, n, 0.25 if pattern == "adaptive" else None).mask()
    if not mask:  # a policy reads both maps of every clip
        return full, dict(full)
    return full, {"expensive": full["expensive"][:, [k for k in range(n) if mask[k]]],
                  "cheap": full["cheap"][:, [k for k in range(n) if not mask[k]]]}


@pytest.mark.parametrize("pattern,budget,order,mode", [("1:1", None, "coarse-to-fine", "threshold"),
                                                       ("all-e", None, "temporal", "gate"),
                                                       ("adaptive", 0.25, "coarse-to-fine", "threshold"),
                                                       ("adaptive", 0.25, "temporal", "gate")])
def test_the_batched_exit_is_the_online_one(pattern, budget, order, mode):
    """evaluate's forward over whole videos and predict's clip-by-clip steps leave every video after
    the same clip with the same prediction, and the backbones run on the clips read only."""
    _check_batched_equals_online("gru", {}, pattern, budget, order, mode)


@pytest.mark.parametrize("agg,kwargs,mode", [("avg", {}, "threshold"), ("tam", {"dim": 16}, "gate"),
                                             ("fastgru", {}, "gate"), ("netvlad", {"clusters": 4}, "threshold"),
                                             ("lstm", {}, "threshold"), ("concat", {}, "gate")])
def test_every_aggregator_can_exit(agg, kwargs, mode):
    _check_batched_equals_online(agg, kwargs, "1:1", None, "coarse-to-fine", mode)


def _check_batched_equals_online(agg_name, kwargs, pattern, budget, order, mode):
    torch.manual_seed(0)
    sched = schedule.create(pattern, 8, budget, order=order, exit_budget=0.5, exit_mode=mode)
    agg = build(agg_name, num_classes=3, sources={"expensive": SHAPE, "cheap": SHAPE}, dropout=0.0, **kwargs)
    module = sched.wrap(agg).eval()
    full, x = _features(pattern)
    assert sched.calibrate(module, [x], "cpu")
    with torch.no_grad():
        logits, decisions = sched.forward(module, x)
    codes = np.where(decisions.numpy() < -0.5, -1, decisions.numpy() > 0.5)
    seen = (codes >= 0).sum(1)
    assert 1 <= seen.min() and seen.max() <= 8 and len(set(seen)) > 1  # videos are left at different clips
    assert abs(seen.mean() / 8 - 0.5) <= 0.15
    for b in range(len(codes)):
        calls = []

        def features(src, ks, b=b, calls=calls):
            calls.extend((src, k) for k in ks)
            return full[src][b, ks]

        with torch.no_grad():
            steps = list(sched.steps(module, features, batch_size=4))
        visited = [k for k, _, _ in steps]
        assert visited == sched.visits[:len(visited)]  # in the schedule's order, stopped at the exit
        assert sorted(visited) == sorted(np.flatnonzero(codes[b] >= 0).tolist())
        assert [int(s == "expensive") for _, s, _ in steps] == [int(codes[b][k]) for k in visited]
        assert sched.report(codes[b])["exit_clip"] == visited[-1]
        torch.testing.assert_close(steps[-1][2][0], logits[b], atol=1e-4, rtol=1e-4)
        assert {k for _, k in calls} == set(visited)  # no backbone ran past the exit


def test_an_exit_costs_only_the_clips_it_read():
    kwargs = {"num_classes": 4, "sources": {"expensive": SHAPE, "cheap": SHAPE}, "dropout": 0.0}
    per_clip = {"expensive": 30.0, "cheap": 3.0}
    full = schedule.create("1:1", 8, order="coarse-to-fine")
    sched = schedule.create("1:1", 8, exit_budget=0.5)
    assert sched.order == "coarse-to-fine" and sched.visits == [0, 4, 2, 6, 1, 3, 5, 7]
    costs = sched.costs("gru", kwargs, per_clip)
    whole = full.costs("gru", kwargs, per_clip)["per_video"]
    # 1:1 expensive at the even clips: in coarse-to-fine order the first four read are all expensive
    assert sched.expected_counts() == (4, 0)
    assert costs["per_video"] == pytest.approx(4 * 30.0 + costs["aggregator_steps"][3] + 3 * costs["exit_readout"])
    assert sched.video_gflops(costs, per_clip, 8 // 2, 8) == pytest.approx(whole + 7 * costs["exit_readout"])
    one = sched.video_gflops(costs, per_clip, 1, 1)
    assert one == pytest.approx(30.0 + costs["aggregator_steps"][0]) and one < costs["per_video"] < whole
    steps = costs["aggregator_steps"]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    policy = schedule.create("adaptive", 8, 0.25, exit_budget=0.5)
    pc = policy.costs("gru", kwargs, per_clip)
    # 4 clips read: 4 cheap, 1 expensive (the budget's rate), a quarter of the aggregator's gap, half the gate
    assert policy.expected_counts() == (1.0, 4.0)
    agg = pc["aggregator_all_c_steps"][3] + 0.25 * (pc["aggregator_all_e_steps"][3] - pc["aggregator_all_c_steps"][3])
    assert pc["per_video"] == pytest.approx(4 * 3.0 + 30.0 + agg + pc["gate"] / 2 + 3 * pc["exit_readout"])


def test_bad_exit_options_are_refused(tmp_path):
    base = dict(feats=["f"], out=str(tmp_path / "r"), agg="gru", expensive="e", cheap="c", pattern="all-e")
    with pytest.raises(ValueError, match="--exit-budget"):
        FitConfig(**base, early_exit=True).validate()
    with pytest.raises(ValueError, match="is for --early-exit"):
        FitConfig(**base, exit_budget=0.5).validate()
    with pytest.raises(ValueError, match="--exit-budget must be in"):
        FitConfig(**base, early_exit=True, exit_budget=1.5).validate()
    with pytest.raises(ValueError, match="--order"):
        FitConfig(**base, order="backwards").validate()
    cfg = FitConfig(**base, early_exit=True, exit_budget=0.5)
    cfg.validate()
    assert cfg.order == "coarse-to-fine"  # the default with an exit, recorded in the run's config
    with pytest.raises(ValueError, match="order is part of an early-exit run"):
        cfg.schedule(8).with_order("temporal")
    assert schedule.grid_patterns(["all-e", "adaptive"], [0.125], [0.5]) == [
        "all-e", "all-e+exit@0.5", "adaptive@0.125", "adaptive@0.125+exit@0.5"]
    assert schedule.split_label("adaptive@0.125+exit@0.5") == ("adaptive", 0.125)
    assert schedule.split_exit("adaptive@0.125+exit@0.5") == ("adaptive@0.125", 0.5)
    assert [schedule.family(p) for p in ("1:3", "adaptive@0.1", "first+exit@0.5", "adaptive@0.1+exit@0.2",
                                         "oracle@0.1")] == ["fixed", "policy", "exit", "policy + exit", None]


def test_flops_gives_the_expected_cost_of_an_exit_run():
    runner = CliRunner()
    args = ["flops", "--pattern", "all-e", "--clip-len", "8", "--num-clips", "8", "--agg", "gru", "--json"]
    full = json.loads(runner.invoke(cli, args).output)
    res = runner.invoke(cli, args + ["--early-exit", "--exit-budget", "0.5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    e = out["clip_gflops"]["r2plus1d50"]
    assert out["num_expensive"] == 4 and out["clips_read"] == 4 and out["order"] == "coarse-to-fine"
    assert out["video_gflops"] == pytest.approx(4 * e + out["aggregator_gflops"] + out["exit_gflops"])
    assert out["video_gflops"] < 0.55 * full["video_gflops"]
    res = runner.invoke(cli, args[:-1] + ["--exit-budget", "0.5"])
    assert res.exit_code == 2 and "--early-exit" in res.output


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The planted task: 4 classes; half the videos show their class in every clip of both maps, the
    other half in the expensive map of one clip only (a cue in the cheap map there)."""
    return str(write_synthetic(tmp_path_factory.mktemp("mixed"), num_videos=400, num_clips=8, signal="mixed",
                               num_classes=4, amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=0))


def _cfg(feats, out, pattern, budget=None, exit_budget=None, **kw):
    base = dict(feats=[feats], out=str(out), agg="gru", expensive="exp", cheap="chp", pattern=pattern, budget=budget,
                early_exit=exit_budget is not None, exit_budget=exit_budget, epochs=12, batch_size=32, lr=1e-2,
                dropout=0.0, workers=0, threads=1, progress=False)
    return FitConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_an_exit_run_records_what_each_video_read(tmp_path):
    mixed = str(write_synthetic(tmp_path / "small", num_videos=120, num_clips=8, signal="mixed", num_classes=4,
                                amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=1))
    r = fit(_cfg(mixed, tmp_path / "r", "1:1", exit_budget=0.5, epochs=2))
    assert r["exit_budget"] == 0.5 and r["order"] == "coarse-to-fine" and r["exit"] == "threshold"
    assert 1 <= r["clips_seen_mean"] <= 8 and r["clips_read_fraction"] == pytest.approx(r["clips_seen_mean"] / 8)
    val = _rows(tmp_path / "r" / "val_predictions.jsonl")
    assert np.mean([v["gflops"] for v in val]) == pytest.approx(r["gflops_per_video"])
    assert np.mean([v["clips_seen"] for v in val]) == pytest.approx(r["clips_seen_mean"])
    for v in val:
        assert v["num_expensive"] + v["num_cheap"] == v["clips_seen"] and v["exit_clip"] in range(8)
    ev = evaluate(tmp_path / "r", [mixed], str(tmp_path / "ev.jsonl"), workers=0, progress=False)
    assert {"top1", "clips_seen_mean", "gflops_per_video"} <= set(ev) and ev["order"] == "coarse-to-fine"
    rows = {x["id"]: x for x in _rows(tmp_path / "ev.jsonl")}
    for v in val:  # evaluate reproduces fit's validation exits
        assert {k: rows[v["id"]][k] for k in ("clips_seen", "exit_clip", "gflops")} == {
            k: v[k] for k in ("clips_seen", "exit_clip", "gflops")}
    with pytest.raises(ValueError, match="order is part of an early-exit run"):
        evaluate(tmp_path / "r", [mixed], str(tmp_path / "x.jsonl"), workers=0, progress=False, order="temporal")


@pytest.mark.slow
def test_acceptance_exits_read_half_the_clips_at_the_accuracy_of_all_of_them(mixed, tmp_path):
    """--exit-budget 0.5: the accuracy of all-e (within 0.03) at <= 0.55 of its GFLOPs, the held-out
    fraction read within 0.05 of 0.5; with the learned policy (B = 0.125) too: <= 0.25 of all-e's GFLOPs."""
    full = fit(_cfg(mixed, tmp_path / "all-e", "all-e"))
    exit_ = fit(_cfg(mixed, tmp_path / "exit", "all-e", exit_budget=0.5))
    both = fit(_cfg(mixed, tmp_path / "both", "adaptive", 0.125, exit_budget=0.5))
    gate = fit(_cfg(mixed, tmp_path / "gate", "all-e", exit_budget=0.5, exit_mode="gate"))
    temporal = fit(_cfg(mixed, tmp_path / "temporal", "all-e", exit_budget=0.5, order="temporal"))
    # measured (85 held-out videos): all-e 1.000 at 240.0 GFLOPs; exit 0.988 at 116.1 (3.87 clips);
    # policy + exit 0.953 at 31.9 (3.92 clips, 0.65 E); gate 0.965 at 119.6 (3.99 clips)
    assert full["clips_seen_mean"] == 8 and full["top1"] >= 0.95
    assert exit_["top1"] >= full["top1"] - 0.03 and exit_["gflops_per_video"] <= 0.55 * full["gflops_per_video"]
    for r in (exit_, both, gate, temporal):
        assert abs(r["clips_seen_mean"] / 8 - 0.5) <= 0.05, r
    assert both["gflops_per_video"] <= 0.25 * full["gflops_per_video"] and both["top1"] >= 0.85
    assert gate["top1"] >= full["top1"] - 0.05


@pytest.mark.slow
def test_predict_leaves_each_video_where_evaluate_did(tmp_path):
    """Real (tiny) videos and backbones: predict decodes and runs the backbones only on the clips read,
    and agrees with evaluate on every video's exit clip, class and cost; also under a policy."""
    from faster import synthetic
    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.predict import PredictConfig, Predictor, iter_predict

    E, C = "r2plus1d50_tiny", "r2d26_tiny"
    ev_exit = {}
    videos, feats = tmp_path / "videos", tmp_path / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right", "up"), per_class=3, frames=24, size=64)
    extract_videos(ExtractConfig(str(videos), str(feats), (E, C), clip_len=8, num_clips=8, size=32, workers=0,
                                 progress=False))
    for name, pattern, budget in (("exit", "1:1", None), ("both", "adaptive", 0.25)):
        run = tmp_path / name
        fit(FitConfig([str(feats)], str(run), "gru", E, C, pattern, budget=budget, early_exit=True, exit_budget=0.5,
                      epochs=3, batch_size=4, workers=0, progress=False, val_fraction=0.5, threads=1))
        evaluate(run, [str(feats)], str(tmp_path / f"{name}.jsonl"), workers=0, progress=False)
        ev = {r["id"]: r for r in _rows(tmp_path / f"{name}.jsonl")}
        ev_exit = ev if name == "exit" else ev_exit
        predictor = Predictor(run, device="cpu", batch_size=4)
        before = dict(predictor.calls)
        pred = list(iter_predict(PredictConfig(videos=[str(videos)], run=str(run), workers=0), predictor))
        assert len(pred) == len(ev) == 9 and not [p for p in pred if "error" in p]
        assert len({p["clips_seen"] for p in pred}) > 1 or name == "both"
        for p in pred:
            e = ev[p["id"]]
            for key in ("clips_seen", "exit_clip", "num_expensive", "num_cheap"):
                assert p[key] == e[key], (name, p["id"], key)
            assert p.get("expensive_clips") == e.get("expensive_clips")
            assert np.argmax(p["probs"]) == np.argmax(e["probs"])
            np.testing.assert_allclose(p["probs"], e["probs"], atol=1e-2)
            assert p["gflops"] == pytest.approx(e["gflops"])
            assert p["clips_decoded"] == p["clips_seen"]  # decoding stopped at the exit too
        ran = {m: predictor.calls[m] - before.get(m, 0) for m in predictor.calls}
        assert ran.get(E, 0) == sum(p["num_expensive"] for p in pred)
        assert ran.get(C, 0) == sum(p["num_cheap"] for p in pred)
        online = predictor.classify(predictor_clips(predictor, videos), online=True)
        assert len(online["online"]) == online["clips_seen"] and online["online"][-1]["clip"] == online["exit_clip"]
    res = CliRunner().invoke(cli, ["predict", str(videos), "--run", str(tmp_path / "exit"), "--workers", "0",
                                   "--device", "cpu", "--online"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert {x["id"]: x["exit_clip"] for x in lines} == {i: r["exit_clip"] for i, r in ev_exit.items()}
    for x in lines:  # the running prediction as it comes, then where the video was left
        assert f"{x['id']}: clip {x['exit_clip']} (position" in res.stderr
        assert f"{x['id']}: left after {x['clips_seen']} of 8 clips" in res.stderr or x["clips_seen"] == 8


def predictor_clips(predictor, videos):
    """The run's clips of the first video, fully decoded (classify on a decoded tensor)."""
    from faster.predict import decoded_videos, list_videos

    items = list_videos([str(videos)], predictor.run.classes)[:1]
    return next(d.frames for _, d in decoded_videos(items, predictor.run, workers=0))


@pytest.mark.slow
def test_ablate_puts_exit_cells_beside_patterns_and_policies(mixed, tmp_path):
    grid = tmp_path / "grid"
    res = CliRunner().invoke(cli, ["ablate", mixed, "-o", str(grid), "--agg", "gru", "--pattern", "all-e,adaptive",
                                   "--budget", "0.125", "--exit-budget", "0.25,0.5", "--epochs", "12", "--lr", "0.01",
                                   "--dropout", "0", "--batch-size", "32"])
    assert res.exit_code == 0, res.output
    rows = {r["pattern"]: r for r in csv.DictReader(open(grid / "results.csv"))}
    assert {"all-e", "all-e+exit@0.25", "all-e+exit@0.5", "adaptive@0.125", "adaptive@0.125+exit@0.25",
            "adaptive@0.125+exit@0.5", "oracle@0.125", "random@0.125"} == set(rows)
    assert float(rows["all-e+exit@0.5"]["clips_seen_mean"]) == pytest.approx(4, abs=0.4)
    assert rows["all-e+exit@0.5"]["order"] == "coarse-to-fine" and rows["all-e"]["order"] == "temporal"
    assert float(rows["all-e+exit@0.25"]["gflops_per_video"]) < float(rows["all-e+exit@0.5"]["gflops_per_video"])
    front = [p for p, r in rows.items() if r["pareto"] == "True"]
    assert "adaptive@0.125+exit@0.25" in front or "adaptive@0.125+exit@0.5" in front, front  # the cheapest
    md = (grid / "results.md").read_text()
    assert "All E + exit F=0.5" in md and "Policy B=0.125 + exit F=0.25" in md and "★" in md
    assert (grid / "accuracy_vs_gflops.png").stat().st_size > 0
