"""NetVLAD, NeXtVLAD and TAM aggregators: equations, forward == stepping, norms, counted GFLOPs, learning."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from faster import aggregate
from faster.aggregate.fit import FitConfig, fit
from faster.aggregate.flops import aggregator_gflops, count_gflops
from faster.aggregate.models import build
from faster.aggregate.synthetic import write_synthetic

NEW = ["netvlad", "nextvlad", "tam"]
EQUAL = {"expensive": [16, 2, 2, 2], "cheap": [16, 2, 2, 2]}
MIXED = {"expensive": [16, 2, 2, 2], "cheap": [8, 1, 4, 4]}  # other width and grid: aligned
SMALL = {"netvlad": dict(clusters=4, dim=8, hidden=12),  # dim 8 < 16 channels: the reduction is used
         "nextvlad": dict(clusters=4, dim=8, expansion=2, groups=4, hidden=16, reduction=4), "tam": dict(dim=6)}


def _clips(sources, mask, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = {"expensive": sum(mask), "cheap": len(mask) - sum(mask)}
    # (B, n, T', H', W', C): channels last, as stored; ``sources`` give [C, T', H', W']
    return {s: torch.randn((batch, n[s], *shape[1:], shape[0]), generator=g) for s, shape in sources.items() if n[s]}


def _trained(name, sources, mask, x, **kw):
    """A model whose BN statistics and weights moved away from their initial values."""
    torch.manual_seed(0)
    model = build(name, num_classes=5, sources=sources, dropout=0.5, **{**SMALL[name], **kw})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x, mask).logsumexp(-1).sum().backward()
        opt.step()
    return model.eval()


def _prefix(x, mask, t):
    """The batch of the video cut after clip t."""
    n_e = sum(mask[:t + 1])
    cut = {"expensive": x.get("expensive", torch.empty(0))[:, :n_e],
           "cheap": x.get("cheap", torch.empty(0))[:, :t + 1 - n_e]}
    return {s: v for s, v in cut.items() if v.numel()}, mask[:t + 1]


def _bn(bn, z):
    """BatchNorm1d in eval mode, by hand."""
    return (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _random_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            for t in (m.running_mean, m.weight, m.bias):
                t.data.copy_(torch.randn(t.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_registered():
    assert set(NEW) <= set(aggregate.names())
    assert aggregate.get("netvlad").__name__ == "NetVLAD" and aggregate.get("tam").__name__ == "TAM"


CASES = [("netvlad", {}), ("netvlad", {"descriptors": "positions"}), ("netvlad", {"descriptors": "clips"}),
         ("nextvlad", {}), ("nextvlad", {"descriptors": "positions"}), ("tam", {}), ("tam", {"blocks": 3})]


@pytest.mark.parametrize("sources", [EQUAL, MIXED], ids=["equal", "mixed"])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{k.get('descriptors', k.get('blocks', 'default'))}" for n, k in CASES])
def test_every_online_prediction_is_the_forward_of_the_video_cut_there(name, kw, sources):
    """VLAD: the state is the running residual sum; TAM: the unseen future is the end's zero padding.
    Both: the prediction after clip t equals the batched forward of clips 0..t; after the last, of all."""
    mask = [True, False, False, True, False, False, True]  # 7 clips: longer than TAM's 2L + 1 window
    x = _clips(sources, mask)
    model = _trained(name, sources, mask, x, **kw)
    order = {True: iter(x.get("expensive", torch.empty(3, 0)).unbind(1)),
             False: iter(x.get("cheap", torch.empty(3, 0)).unbind(1))}
    with torch.no_grad():
        batched = model(x, mask)
        state = model.init_state(3)
        for t, e in enumerate(mask):  # clip t from its source, in order
            state = model.step(state, next(order[e]), expensive=e)
            torch.testing.assert_close(model.logits(state), model(*_prefix(x, mask, t)), rtol=1e-5, atol=1e-5)
    assert batched.shape == (3, 5)
    torch.testing.assert_close(model.logits(state), batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_vlads_ignore_clip_order_and_tam_does_not(name):
    mask = [True] * 4
    x = _clips({"expensive": [16, 1, 2, 2]}, mask)
    model = _trained(name, {"expensive": [16, 1, 2, 2]}, mask, x)
    with torch.no_grad():
        if name == "tam":
            for block in model.blocks:
                block.tam.conv.weight.normal_()  # away from the identity, which would be order-blind too
        same = torch.allclose(model(x, mask), model({"expensive": x["expensive"][:, [2, 0, 3, 1]]}, mask), atol=1e-5)
    assert same == (name != "tam")  # V is a sum over descriptors; TAM mixes neighbouring clips


def _residuals(name, num_descriptors):
    """(model in eval mode with random BN statistics, descriptors (2, M, 8), its residual sums)."""
    torch.manual_seed(0)
    model = _random_bn(build(name, num_classes=3, sources=EQUAL, **SMALL[name]).eval())
    d = torch.randn(2, num_descriptors, 8)  # (B, M, D)
    with torch.no_grad():
        return model, d, model.residuals(d)


def test_netvlad_residuals_follow_the_equation():
    model, d, V = _residuals("netvlad", 7)
    with torch.no_grad():
        a = _bn(model.assign_bn, d @ model.assign.weight.T).softmax(-1)  # (B, M, K)
        want = torch.stack([sum(a[:, i, k, None] * (d[:, i] - model.centres[k]) for i in range(7))
                            for k in range(4)], dim=1)  # (B, K, D)
    torch.testing.assert_close(V, want, rtol=1e-5, atol=1e-5)


def test_vlad_vectors_are_intra_and_globally_l2_normalised():
    torch.manual_seed(0)
    x = _clips(EQUAL, [True, False, True])
    net = build("netvlad", num_classes=3, sources=EQUAL, **SMALL["netvlad"]).eval()
    nxt = build("nextvlad", num_classes=3, sources=EQUAL, **SMALL["nextvlad"]).eval()
    with torch.no_grad():
        v = net.vlad_vector(net.fold_sequence(net.sequence(x, [True, False, True])))  # (B, K*D)
        w = nxt.vlad_vector(nxt.fold_sequence(nxt.sequence(x, [True, False, True])))  # (B, K*F)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))  # global L2
    # intra-normalised first: each of the K blocks had unit norm, so 1/sqrt(K) after the global L2
    torch.testing.assert_close(v.view(3, 4, 8).norm(dim=-1), torch.full((3, 4), 0.5))
    torch.testing.assert_close(w.view(3, 4, 4).norm(dim=-1), torch.ones(3, 4))  # NeXtVLAD: intra-L2, then BN


def test_nextvlad_groups_attend_and_split_the_expanded_descriptor():
    model, d, V = _residuals("nextvlad", 5)
    with torch.no_grad():
        e = model.expand(d)  # (B, M, 16): G = 4 slices of F = 4
        att = torch.sigmoid(model.attention(e))
        a = _bn(model.assign_bn, e @ model.assign.weight.T).view(2, 5, 4, 4).softmax(-1)  # (B, M, G, K)
        want = torch.zeros(2, 4, 4)
        for i in range(5):
            for g in range(4):
                for k in range(4):
                    want[:, k] += (att[:, i, g] * a[:, i, g, k])[:, None] * (e[:, i, 4 * g:4 * g + 4] - model.centres[k])
    torch.testing.assert_close(V, want, rtol=1e-5, atol=1e-5)


def test_tam_follows_the_equation_with_zero_padding():
    """z_t = ReLU(BN(P mean_T' x_t)); two blocks x -> ReLU(x + BN(W2 ReLU(BN(W1 TAM(x))))), TAM
    y_t = ReLU(w_-1 x_(t-1) + w_0 x_t + w_+1 x_(t+1)) with zero clips beyond both ends; mean; fc."""
    torch.manual_seed(0)
    model = _random_bn(build("tam", num_classes=3, sources={"expensive": [4, 2, 2, 1]}, dropout=0.0, dim=5)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.tam.conv.weight.normal_()
        x = torch.randn(2, 6, 2, 2, 1, 4)  # (B, N, T', H', W', C)
        got = model({"expensive": x}, [True] * 6)
        z = torch.relu(_bn(model.proj_bn, x.mean(dim=2)[:, :, :, 0] @ model.proj.weight.T))  # (B, N, H', D)
        for block in model.blocks:
            w = block.tam.conv.weight[:, 0]  # (D, 3): w_-1, w_0, w_+1
            pad = F.pad(z, (0, 0, 0, 0, 1, 1))  # zero clips before the first and after the last
            y = torch.relu(sum(w[:, j] * pad[:, j:j + 6] for j in range(3)))  # (B, N, H', D)
            y = torch.relu(_bn(block.bn1, y @ block.conv1.weight.T))
            z = torch.relu(z + _bn(block.bn2, y @ block.conv2.weight.T))
        want = model.fc(z.mean(dim=(1, 2)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tam_blocks_start_with_3d_identity_tams():
    C, D, K = 32, 8, 7
    model = build("tam", num_classes=K, sources={"expensive": [C, 1, 2, 2]}, dim=D)
    assert len(model.blocks) == 2
    for block in model.blocks:
        assert sum(p.numel() for p in block.tam.parameters()) == 3 * D
        assert torch.equal(block.tam.conv.weight[:, 0], torch.tensor([[0.0, 1.0, 0.0]]).expand(D, 3))
    per_block = 3 * D + 2 * D * D + 2 * 2 * D  # TAM, W1, W2, two BNs
    assert sum(p.numel() for p in model.parameters()) == C * D + 2 * D + 2 * per_block + D * K + K
    seq = model.sequence({"expensive": torch.randn(2, 3, 1, 2, 2, C)}, [True] * 3)  # (B, N, T', H', W', C) in
    assert model.state_vector(model.fold_sequence(seq)).shape == (2, D)


def _netvlad_macs(N, C, P, D, K, H, Y):
    M = N * P
    return M * C * D * (D < C) + 2 * M * D * K + K * D * H + H * H + H * Y


def _nextvlad_macs(N, C, P, D, K, H, Y, lam=2, G=8, r=8):
    M, E = N * P, lam * D
    return (M * C * D * (D < C) + M * E * D + M * E * G + M * E * G * K + M * K * E + K * (E // G) * H
            + 2 * H * H // r + H * Y)


@pytest.mark.parametrize("descriptors,per_clip", [("positions", 2 * 3 * 3), ("steps", 2), ("clips", 1)])
def test_vlad_gflops_follow_the_formulas(descriptors, per_clip):
    C, grid, N, Y = 64, (2, 3, 3), 6, 10
    kw = dict(num_classes=Y, sources={"expensive": [C, *grid], "cheap": [C, *grid]}, dropout=0.0, descriptors=descriptors)
    mask = [True, False] * 3
    for D in (16, 128):  # reduced 64 -> 16, or used as they are (128 > 64 channels)
        got = count_gflops("netvlad", {**kw, "clusters": 8, "dim": D, "hidden": 32}, mask) * 1e9
        assert got == pytest.approx(_netvlad_macs(N, C, per_clip, min(D, C), 8, 32, Y), rel=1e-12), D
        got = count_gflops("nextvlad", {**kw, "clusters": 8, "dim": D, "hidden": 32}, mask) * 1e9
        assert got == pytest.approx(_nextvlad_macs(N, C, per_clip, min(D, C), 8, 32, Y), rel=1e-12), D


def _tam_macs(N, C, S, D, Y, L=2):
    """S = H'W' positions per clip (the T' mean is no multiply-add)."""
    return N * S * C * D + L * (3 * N * S * D + 2 * N * S * D * D) + D * Y


def test_gflops_at_the_paper_maps():
    """8 clips x 4 x 7 x 7 x 2048 (FASTER32), 400 classes, the defaults (VLADs: one descriptor per T' step)."""
    net = aggregator_gflops("netvlad", 2048, (4, 7, 7), 8)
    assert net == pytest.approx(_netvlad_macs(8, 2048, 4, 256, 32, 1024, 400) / 1e9, rel=1e-12)
    nxt = aggregator_gflops("nextvlad", 2048, (4, 7, 7), 8)
    assert nxt == pytest.approx(_nextvlad_macs(8, 2048, 4, 256, 64, 1024, 400) / 1e9, rel=1e-12)
    tam = aggregator_gflops("tam", 2048, (4, 7, 7), 8)
    assert tam == pytest.approx(_tam_macs(8, 2048, 49, 512, 400) / 1e9, rel=1e-12)
    assert (round(net, 3), round(nxt, 3), round(tam, 3)) == (0.027, 0.035, 0.823)  # docstrings, docs/aggregators.md


def test_tam_gflops_follow_the_formula():
    C, grid, N, Y = 16, (2, 3, 3), 5, 10
    assert aggregator_gflops("tam", C, grid, N, Y) == pytest.approx(_tam_macs(N, C, 9, 512, Y) / 1e9, rel=1e-12)
    kw = {"num_classes": Y, "sources": MIXED, "dropout": 0.0, "dim": 8}
    macs = count_gflops("tam", kw, [True, False, True, False]) * 1e9
    # common grid (1, 2, 2) = 4 positions, width 16; the 2 cheap clips projected 8 -> 16 first
    assert macs == pytest.approx(_tam_macs(4, 16, 4, 8, Y) + 2 * 4 * 8 * 16, rel=1e-12)


def test_init_centres_finds_planted_clusters():
    torch.manual_seed(0)
    model = build("netvlad", num_classes=3, sources={"expensive": [8, 1, 1, 1]}, clusters=3, dim=8)
    dirs = F.normalize(torch.randn(3, 8), dim=1)
    g = torch.Generator().manual_seed(1)
    d = 2.0 * dirs.repeat(100, 1) + 0.05 * torch.randn(300, 8, generator=g)  # (M, D): three tight clusters, norm ~2
    centres = model.init_centres(d, seed=0)
    match = F.normalize(centres, dim=1) @ dirs.T  # (K, 3) cosine similarities
    assert sorted(match.argmax(dim=1).tolist()) == [0, 1, 2] and match.max(dim=1).values.min() > 0.99
    assert centres.norm(dim=1).sub(2.0).abs().max() < 0.05  # scaled back to the descriptors' norm
    torch.testing.assert_close(model.assign.weight, F.normalize(centres, dim=1))
    # descriptors() gives what the clusters see: (B, N*P, D) after alignment and reduction
    x = _clips(EQUAL, [True, False])
    net = build("netvlad", num_classes=3, sources=EQUAL, **SMALL["netvlad"])
    assert net.descriptors(x, [True, False]).shape == (3, 2 * 2, 8)  # 2 clips x T' = 2 steps, D = 8
    with pytest.raises(ValueError, match="at least 4 descriptors"):
        net.init_centres(torch.randn(3, 8))
    with pytest.raises(ValueError, match="width 5"):
        net.init_centres(torch.randn(30, 5))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown descriptors 'pixels'"):
        build("netvlad", num_classes=3, sources=EQUAL, descriptors="pixels")
    with pytest.raises(ValueError, match="clusters must be a positive integer, got 0"):
        build("netvlad", num_classes=3, sources=EQUAL, clusters=0)
    with pytest.raises(ValueError, match="groups must divide"):
        build("nextvlad", num_classes=3, sources=EQUAL, dim=8, groups=3)
    with pytest.raises(ValueError, match="reduction must divide hidden"):
        build("nextvlad", num_classes=3, sources=EQUAL, hidden=30, reduction=8)


def test_kwargs_rebuild_the_same_model():
    model = build("nextvlad", num_classes=3, sources=MIXED, **SMALL["nextvlad"], descriptors="steps")
    again = build("nextvlad", **model.kwargs)
    again.load_state_dict(model.state_dict())
    assert again.kwargs == model.kwargs and again.descriptor_mode == "steps"


@pytest.fixture(scope="module")
def static_set(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("static"), num_videos=160, num_clips=4, signal="static",
                               amplitude=2.0, num_classes=3, models={"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)},
                               seed=1, shard_size=80))


@pytest.mark.parametrize("agg", NEW)
def test_learns_a_planted_class_direction(static_set, tmp_path, agg):
    """3 classes (chance 0.33), a class direction added to every clip, 27 validation videos: top-1
    >= 0.8 at the default sizes (measured: 1.0 for each, seeds 0-2)."""
    cfg = FitConfig(feats=[static_set], out=str(tmp_path / "run"), agg=agg, expensive="exp", cheap="chp",
                    pattern="1:1", epochs=6, batch_size=16, lr=3e-2, dropout=0.0, workers=0, threads=1,
                    progress=False)
    result = fit(cfg)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["val_loss"] < 0.5 * math.log(3), lines  # well below the loss of a uniform guess
    assert result["top1"] >= 0.8, result
    assert result["aggregator_gflops"] > 0 and result["agg"] == agg


def _fit(feats, out, agg, **kw):
    cfg = dict(feats=[feats], out=str(out), agg=agg, expensive="exp", cheap="chp", pattern="all-e", epochs=10,
               batch_size=32, lr=3e-3, dropout=0.0, workers=0, threads=2, progress=False)
    return fit(FitConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def events_set(tmp_path_factory):
    """1,500 videos (about 1,200 train / 300 val), 8 clips of 1 x 2 x 2 x 16 maps, classes balanced."""
    return str(write_synthetic(tmp_path_factory.mktemp("events"), num_videos=1500, num_clips=8, signal="events",
                               amplitude=2.0, seed=0, shard_size=512))


@pytest.mark.slow
@pytest.mark.parametrize("agg", ["netvlad", "nextvlad"])
def test_vlads_learn_which_events_occur_where_avg_cannot(events_set, tmp_path, agg):
    """Exactly one of two +-signed events anywhere in the video (an XOR of presences): avg pooling's
    monotone per-clip scores stay at chance, the VLADs' clusters find them. Measured (1,500 videos,
    10 epochs): avg 0.47-0.53, netvlad 0.98-0.99, nextvlad 0.99-1.0; at 2,000 videos and 20 epochs
    avg 0.47, netvlad 0.98, nextvlad 1.0."""
    avg = _fit(events_set, tmp_path / "avg", "avg", epochs=5)
    assert avg["top1"] <= 0.65, avg
    result = _fit(events_set, tmp_path / agg, agg)
    assert result["top1"] >= 0.8, result


@pytest.fixture(scope="module")
def arrangement_set(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("arrangement"), num_videos=1500, num_clips=8,
                               signal="arrangement", amplitude=2.0, seed=0, shard_size=512))


@pytest.mark.slow
def test_tam_learns_an_arrangement_of_events_where_avg_cannot(arrangement_set, tmp_path):
    """Events a and b in neighbouring clips or >= 3 clips apart: the same clips in either class, so
    avg (and any order-blind aggregator) stays at chance; TAM mixes neighbouring clips."""
    avg = _fit(arrangement_set, tmp_path / "avg", "avg", epochs=5)
    assert avg["top1"] <= 0.65, avg
    result = _fit(arrangement_set, tmp_path / "tam", "tam", agg_options={"dim": 64})
    assert result["top1"] >= 0.85, result
    assert result["agg_options"] == {"dim": 64}


def _digest(directory):
    import glob
    import hashlib

    import h5py
    import numpy as np

    h = hashlib.sha256()
    for f in sorted(glob.glob(f"{directory}/**/*.h5", recursive=True)):
        with h5py.File(f) as fh:
            for key in ("features/exp", "features/chp", "videos/label"):
                h.update(np.asarray(fh[key][()]).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("signal,digest", [("order", "429eaa89dbf9815f"), ("static", "033d2bf391d63009"),
                                           ("spot", "10a33728783a58e3"), ("none", "67e82341f51bfab5")])
def test_the_older_signals_write_what_they_wrote_before(tmp_path, signal, digest):
    """Digests of the features and labels written before the events and arrangement signals came."""
    assert _digest(write_synthetic(tmp_path, num_videos=30, signal=signal, seed=3, num_classes=2)) == digest


@pytest.mark.parametrize("signal", ["events", "arrangement"])
def test_new_signals_are_balanced_and_planted_as_described(tmp_path, signal):
    import numpy as np

    from faster.store.reader import FeatureSet

    fs = FeatureSet([str(write_synthetic(tmp_path, num_videos=400, num_clips=8, signal=signal, noise=(0.0, 0.0),
                                         amplitude=1.0, seed=0))])
    assert 0.4 < (fs.labels == 1).mean() < 0.6
    ds = fs.dataset({"expensive": ("exp", list(range(8)))})
    for i in range(40):
        x = ds[i]["expensive"].float().mean(dim=(1, 2, 3))  # (N, C): noise-free clip vectors
        hit = np.flatnonzero(x.norm(dim=1).numpy() > 0.5)
        if signal == "arrangement":
            assert len(hit) == 2 and ((hit[1] - hit[0] == 1) == (ds[i]["label"] == 0)) and hit[1] - hit[0] != 2
        else:
            assert len(hit) in ((1,) if ds[i]["label"] == 1 else (0, 2))
    ds.close()
