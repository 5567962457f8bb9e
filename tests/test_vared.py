"""VA-RED² on R(2+1)D-50 (faster/extract/models/vared.py): exactly R(2+1)D-50 at full computation,
its cost table against the counted multiply-adds, per-clip options at inference, the gates' gradient
and expected cost in training, loading an R(2+1)D-50 checkpoint, the FLOPs penalty in train-clip, and
the per-clip GFLOPs an extraction stores (gflops/<model>) and FeatureSet.clip_gflops reads back."""
import json

import numpy as np
import pytest
import torch

from faster.extract import models
from faster.extract.models import vared
from faster.macs import count_macs

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = "vared_r2plus1d50_tiny"


def _clip(batch=2, frames=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, size, size, generator=g)


def _randomise_gates(model, seed=0, scale=3.0):
    """Input-dependent gates (the untrained ones are zero: full computation everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.fc2.weight.copy_(torch.randn(gate.fc2.weight.shape, generator=g) * scale)
            gate.fc2.bias.copy_(torch.randn(gate.fc2.bias.shape, generator=g))


def _randomise_norms(model, seed=1):
    """Batch norms that are not the identity, so that the exactness tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if t is m.weight else 0.0))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_at_full_computation_it_is_r2plus1d50_exactly_and_a_checkpoint_of_it_initialises_it(tmp_path):
    base = models.build("r2plus1d50_tiny", seed=3)
    _randomise_norms(base)
    x = _clip()
    with torch.no_grad():
        ref = base(x)
    path = tmp_path / "r2plus1d50_tiny.pt"
    models.save_weights(base, path)
    net = models.build(TINY, weights=str(path), seed=7)  # another seed: the file decides
    assert net.weights_layout == "faster"
    with torch.no_grad():
        assert torch.equal(net(x), ref)  # untrained gates choose option 0 (full)
        assert net.last_options.eq(0).all() and torch.allclose(net.last_cost, torch.full((2,), net.full_cost))
        net.force = 0
        assert torch.equal(net(x), ref)
    # the reduced options' batch norms start as copies of the file's full ones
    block = net.res3[1]
    for option in (1, 2, 3):
        assert torch.equal(block.norms[option - 1].bnm.running_var, block.conv2[1].running_var)
        assert torch.equal(block.norms[option - 1].bn3.weight, block.bn3.weight)
    # a random init at one seed is R(2+1)D-50's at that seed on the shared weights
    with torch.no_grad():
        a, b = models.build("r2plus1d50_tiny", seed=5)(x), models.build(TINY, seed=5)(x)
    assert torch.equal(a, b)


def test_a_trained_checkpoint_round_trips_and_a_wrong_file_is_one_error(tmp_path):
    net = models.build(TINY, seed=1)
    _randomise_gates(net)
    path = tmp_path / "v.pt"
    models.save_weights(net, path)
    again = models.build(TINY, weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    models.save_weights(models.build("r2d26_tiny"), tmp_path / "r2d.pt")
    with pytest.raises(Exception, match="do not fit backbone"):
        models.build(TINY, weights=str(tmp_path / "r2d.pt"))


@pytest.mark.parametrize("option", range(4))
def test_the_cost_table_is_the_counted_multiply_adds_of_each_option(option):
    net = models.build(TINY)
    net.force = option
    x = _clip(batch=1, frames=8, size=40)
    with torch.no_grad():
        macs = count_macs(net, x)
    table = net.cost_table(8, 40)
    want = table["fixed"] + sum(v[option] for v in table["stages"].values())
    assert macs / 1e9 == pytest.approx(want, rel=1e-9)
    assert float(net.last_cost[0]) == pytest.approx(want, rel=1e-6)
    if option == 0:
        # counted on meta tensors (every stage in full): the registry's figure is the full cost
        assert models.clip_gflops(TINY, 8, 40) == pytest.approx(table["full"], rel=1e-9)
        gates = sum(g.macs() for g in net.gates.values()) / 1e9
        assert table["full"] - models.clip_gflops("r2plus1d50_tiny", 8, 40) == pytest.approx(gates, rel=1e-6)
    else:
        assert want < table["full"]


def test_full_size_costs_and_map_shape():
    assert models.feature_shape("vared_r2plus1d50", 8, 224) == (2048, 1, 7, 7)
    from faster.extract.models.cost import build_on_meta

    table = build_on_meta(models.get("vared_r2plus1d50")).cost_table(8, 224)
    assert table["full"] == pytest.approx(29.98, abs=0.01)  # R(2+1)D-50's 29.98 + 0.0004 of gates
    assert table["cheapest"] == pytest.approx(9.89, abs=0.01)
    assert [round(v[0], 2) for v in table["stages"].values()] == [10.48, 8.85, 6.22, 1.76]


def test_each_clip_runs_its_own_option_at_inference():
    net = models.build(TINY, seed=2)
    _randomise_norms(net)
    x = _clip(batch=6, size=32)
    chosen = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 1, 1], [2, 0, 3, 1], [0, 0, 0, 0], [3, 3, 3, 3]])
    for s, name in enumerate(vared.STAGES):  # fixed choices per clip and stage
        logits = torch.nn.functional.one_hot(chosen[:, s], 4).float()
        net.gates[name].forward = lambda inp, lg=logits: lg
    with torch.no_grad():
        y = net(x)
    assert torch.equal(net.last_options, chosen)
    table = net.cost_table(8, 32)
    for b in range(6):
        want = table["fixed"] + sum(table["stages"][n][int(chosen[b, s])] for s, n in enumerate(vared.STAGES))
        assert float(net.last_cost[b]) == pytest.approx(want, rel=1e-6)
    # clip 5 alone through option 3 everywhere, clip 4 through option 0: the same maps
    for b, option in ((4, 0), (5, 3)):
        net.force = option
        with torch.no_grad():
            assert torch.allclose(net(x[b:b + 1])[0], y[b], rtol=1e-4, atol=1e-4)
    assert len(set(net.cost_table(8, 32)["stages"]["res2"])) == 4


def test_training_mixes_one_path_per_clip_and_the_expected_cost_trains_the_gates():
    net = models.build(TINY, seed=0).train()
    x = _clip(batch=4, size=32)
    y = net(x)
    table = net.cost_table(8, 32)
    cost = net.last_cost
    assert y.shape == (4, 64, 1, 1, 1) and cost.shape == (4,) and cost.requires_grad
    # untrained gates: every clip's policy is softmax(FULL_BIAS, 0, 0, 0), its expected cost that policy's
    policy = torch.softmax(torch.tensor([vared.FULL_BIAS, 0.0, 0.0, 0.0]), dim=0).tolist()
    expected = table["fixed"] + sum(float(np.dot(policy, v)) for v in table["stages"].values())
    assert torch.allclose(cost, torch.full((4,), expected), rtol=1e-5)
    (cost.mean() / net.full_cost).backward()
    g = net.gates["res2"].fc2.bias.grad
    assert g is not None and g[0] > 0 > g[3]  # lowering the cost favours the cheap options
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def test_zero_init_final_bn_and_clip_cost_see_every_path():
    from faster.train.model import build_classifier, clip_cost

    clf = build_classifier(TINY, 4, dropout=0.0)
    bb = clf.backbone
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for stage in vared.STAGES for b in getattr(bb, stage))
    assert all(float(n.bn3.weight.detach().abs().sum()) == 0 for stage in vared.STAGES for b in getattr(bb, stage)
               for n in b.norms)
    assert clip_cost(clf) is None  # no forward yet
    clf.eval()
    with torch.no_grad():
        clf(_clip(batch=2))
    cost, full = clip_cost(clf)
    assert cost.shape == (2,) and full == pytest.approx(models.clip_gflops(TINY, 8, 32))
    assert clip_cost(build_classifier("r2d26_tiny", 4)) is None


def test_train_clip_adds_the_flops_penalty_and_reports_the_cost(motion_videos, tmp_path):
    from faster.errors import BadValue
    from faster.train.clip import TrainClipConfig, train_clip

    kw = dict(video_root=str(motion_videos), size=32, clip_len=8, epochs=1, batch_size=4, lr=0.05, val_clips=2,
              val_fraction=0.5, workers=0, threads=1, progress=False)
    r = train_clip(TrainClipConfig(out=str(tmp_path / "run"), model=TINY, flops_target=0.7, **kw))
    assert r["flops_target"] == 0.7 and r["full_gflops_per_clip"] == pytest.approx(models.clip_gflops(TINY, 8, 32))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < row["cost_fraction"] <= 1 and 0 < row["gflops_per_clip"] <= r["full_gflops_per_clip"] + 1e-9
    assert json.loads((tmp_path / "run" / "config.json").read_text())["flops_target"] == 0.7
    with pytest.raises(BadValue, match="costs the same for every clip"):
        train_clip(TrainClipConfig(out=str(tmp_path / "r2d"), model="r2d26_tiny", flops_target=0.5, **kw))
    assert not (tmp_path / "r2d").exists()
    with pytest.raises(BadValue, match="flops-target"):
        train_clip(TrainClipConfig(out=str(tmp_path / "bad"), model=TINY, flops_target=1.5, **kw))


def test_default_targets_and_a_target_below_the_floor_is_warned_about(caplog):
    from faster.train.clip import TrainClipConfig, _flops_target

    tiny, full = models.build(TINY), models.build("vared_r2plus1d50")
    table = tiny.cost_table(8, 32)
    floor = table["cheapest"] / table["full"]
    assert 0.6 < floor < 0.75  # why the tiny variant's default is not the full network's 0.6
    assert _flops_target(TrainClipConfig(video_root=".", out="x", model=TINY, clip_len=8, size=32), tiny) == 0.75
    assert caplog.records == []
    assert _flops_target(TrainClipConfig(video_root=".", out="x", model="vared_r2plus1d50"), full) == 0.6
    assert caplog.records == []  # 0.6 is reachable by the full-width network
    cfg = TrainClipConfig(video_root=".", out="x", model=TINY, clip_len=8, size=32, flops_target=0.5)
    assert _flops_target(cfg, tiny) == 0.5
    assert any("below what vared_r2plus1d50_tiny can reach" in r.getMessage() and f"{floor:.2f}" in r.getMessage()
               for r in caplog.records)


def test_extraction_stores_each_clips_gflops_and_the_reader_returns_them(motion_videos, tmp_path, monkeypatch):
    import itertools

    import h5py

    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.store.reader import FeatureSet, list_shards

    def gate(self, x):  # a decision that varies with the clip: the stage input's mean, hashed into an option
        option = (x.float().mean(dim=(1, 2, 3, 4)) * 1e4).long() % 4
        return torch.nn.functional.one_hot(option, 4).to(x.dtype)

    table = models.build(TINY).cost_table(8, 32)
    assert models.clip_gflops(TINY, 8, 32) == pytest.approx(table["full"])  # counted (and cached) with the real gates
    monkeypatch.setattr(vared.Gate, "forward", gate)
    out = tmp_path / "feats"
    extract_videos(ExtractConfig(str(motion_videos), str(out), models=(TINY, "r2d26_tiny"), clip_len=8, num_clips=3,
                                 size=32, batch_size=4, workers=0, progress=False, dtype="fp32"))
    fs = FeatureSet([out])
    g = fs.clip_gflops(TINY)
    assert g.shape == (len(fs), 3) == (4, 3) and g.dtype == np.float32
    assert len(np.unique(g)) > 1, g  # the cost depends on the clip
    possible = [table["fixed"] + sum(c) for c in itertools.product(*table["stages"].values())]
    assert all(min(abs(v - p) for p in possible) < 1e-6 for v in g.ravel().tolist())
    assert fs.model(TINY).clip_gflops and not fs.model("r2d26_tiny").clip_gflops
    assert fs.clip_gflops("r2d26_tiny") is None
    assert fs.model(TINY).attrs["gflops_per_clip"] == pytest.approx(table["full"])  # the header: the most a clip costs
    with h5py.File(list_shards(out)[0], "r") as f:
        assert f["gflops"][TINY].shape == (len(f["videos/id"]), 3) and "r2d26_tiny" not in f["gflops"]
    # a shard without the dataset (any older one) reads as before
    plain = tmp_path / "plain"
    extract_videos(ExtractConfig(str(motion_videos), str(plain), models=("r2d26_tiny",), clip_len=8, num_clips=3,
                                 size=32, workers=0, progress=False, dtype="fp32"))
    assert FeatureSet([plain]).clip_gflops("r2d26_tiny") is None


def test_the_shard_writer_refuses_inconsistent_per_clip_gflops(tmp_path):
    from helpers import header

    from faster.errors import BadValue
    from faster.store.writer import ShardWriter

    h = header(["m", "n"], num_clips=2)
    feats = {m: np.zeros((2, 1, 1, 1, 4), np.float16) for m in ("m", "n")}
    with ShardWriter(tmp_path, part=0, seq=0, header=h, capacity=4) as w:
        w.add(id="a", label=0, num_frames=16, fps=30.0, clip_start=[0, 8], features=feats, gflops={"m": [1.0, 2.0]})
        with pytest.raises(BadValue, match="the shard holds them for"):
            w.add(id="b", label=0, num_frames=16, fps=30.0, clip_start=[0, 8], features=feats)
        with pytest.raises(BadValue, match="expected \\(2,\\)"):
            w.add(id="b", label=0, num_frames=16, fps=30.0, clip_start=[0, 8], features=feats, gflops={"m": [1.0]})
        w.add(id="b", label=1, num_frames=16, fps=30.0, clip_start=[0, 8], features=feats, gflops={"m": [3.0, 4.0]})
    from faster.store.reader import FeatureSet

    fs = FeatureSet([tmp_path])
    order = {v: i for i, v in enumerate(fs.ids)}
    g = fs.clip_gflops("m")
    assert g[order["a"]].tolist() == [1.0, 2.0] and g[order["b"]].tolist() == [3.0, 4.0]


def test_batch_norm_folding_leaves_every_option_exact():
    """extract's runner folds batch norms into convolutions; a reduced option shares the convolution's
    weights with its own norms, so only what always runs in full (stem, shortcuts) may be folded."""
    from faster.extract.runner import fold_batchnorm

    net = models.build(TINY, seed=2).eval()
    _randomise_norms(net)
    x = _clip()
    with torch.no_grad():
        ref = []
        for option in range(4):
            net.force = option
            ref.append(net(x))
        folded = fold_batchnorm(net, 8, 32)
        assert folded > 0
        for option in range(4):
            net.force = option
            torch.testing.assert_close(net(x), ref[option], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fit_evaluate_and_predict_count_each_clips_own_gflops(tmp_path, monkeypatch):
    """A VA-RED² expensive model with clip-dependent gates: evaluate counts each expensive clip at its
    stored GFLOPs (not the header's full cost), fit reports the mean, and predict, running the
    backbones itself, counts the same figures."""
    from faster import synthetic
    from faster.aggregate import patterns
    from faster.aggregate.evaluation import evaluate
    from faster.aggregate.fit import FitConfig, fit
    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.predict import PredictConfig, predict
    from faster.store.reader import FeatureSet

    def gate(self, x):  # a decision that varies with the clip, the same in extraction and predict
        option = (x.float().mean(dim=(1, 2, 3, 4)) * 1e4).long() % 4
        return torch.nn.functional.one_hot(option, 4).to(x.dtype)

    monkeypatch.setattr(vared.Gate, "forward", gate)
    videos, feats, run = tmp_path / "videos", tmp_path / "feats", tmp_path / "run"
    synthetic.make_motion_dataset(videos, classes=("left", "right"), per_class=2, frames=24, size=48)
    extract_videos(ExtractConfig(str(videos), str(feats), (TINY, "r2d26_tiny"), clip_len=8, num_clips=4, size=32,
                                 workers=0, progress=False, dtype="fp32"))
    result = fit(FitConfig([str(feats)], str(run), "avg", TINY, "r2d26_tiny", "1:1", epochs=1, batch_size=4,
                           workers=0, progress=False, val_fraction=0.5))
    ev_path = tmp_path / "eval.jsonl"
    ev_result = evaluate(run, [str(feats)], str(ev_path), workers=0, progress=False)
    ev = {r["id"]: r for r in map(json.loads, ev_path.read_text().splitlines())}

    fs = FeatureSet([feats])
    g = fs.clip_gflops(TINY).astype(np.float64)
    full = fs.model(TINY).attrs["gflops_per_clip"]
    cheap = fs.model("r2d26_tiny").attrs["gflops_per_clip"]
    mask = patterns.expensive_mask("1:1", 4)
    agg = json.loads((run / "result.json").read_text())["aggregator_gflops"]
    want = {}
    for i, vid in enumerate(fs.ids):
        want[vid] = sum(g[i, k] if m else cheap for k, m in enumerate(mask)) + agg
        assert ev[vid]["gflops"] == pytest.approx(want[vid], rel=1e-6)
    assert any(w < 2 * full + 2 * cheap + agg - 1e-9 for w in want.values())  # below the header's full count
    assert ev_result["gflops_per_video"] == pytest.approx(np.mean(list(want.values())), rel=1e-6)
    assert ev_result["clip_gflops_mean"][TINY] == pytest.approx(g[:, [k for k, m in enumerate(mask) if m]].mean())
    assert result["clip_gflops_mean"][TINY] < full + 1e-9

    pred_path = tmp_path / "pred.jsonl"
    predict(PredictConfig(videos=[str(videos)], run=str(run), out=str(pred_path), workers=0, dtype="fp32"))
    pred = {r["id"]: r for r in map(json.loads, pred_path.read_text().splitlines())}
    assert set(pred) == set(ev)
    for vid, e in ev.items():
        assert pred[vid]["gflops"] == pytest.approx(e["gflops"], rel=1e-5), vid
