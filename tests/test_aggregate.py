"""Aggregators: registry, batched forward == online stepping, alignment of sources, counted GFLOPs."""
import pytest
import torch

from faster import aggregate
from faster.aggregate.flops import aggregator_gflops, count_gflops
from faster.aggregate.models import Aggregator, build

AGGS = ["avg", "concat", "fastgru", "gru", "lstm"]  # the paper's; tests/test_vlad.py covers netvlad, nextvlad, tam
EQUAL = {"expensive": [16, 1, 2, 2], "cheap": [16, 1, 2, 2]}
MIXED = {"expensive": [16, 2, 2, 2], "cheap": [8, 1, 4, 4]}  # other width and grid: aligned


def test_registry_names_and_duplicates():
    assert aggregate.names() == sorted(AGGS + ["netvlad", "nextvlad", "tam"])
    with pytest.raises(ValueError, match="already registered"):
        aggregate.register("fastgru")(Aggregator)
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        aggregate.get("nope")


def _clips(sources, mask, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = {"expensive": sum(mask), "cheap": len(mask) - sum(mask)}
    # (B, n, T', H', W', C): channels last, as stored; ``sources`` give [C, T', H', W']
    return {s: torch.randn((batch, n[s], *shape[1:], shape[0]), generator=g) for s, shape in sources.items() if n[s]}


@pytest.mark.parametrize("sources", [EQUAL, MIXED], ids=["equal", "mixed"])
@pytest.mark.parametrize("name", AGGS)
def test_forward_equals_stepping_clip_by_clip(name, sources):
    torch.manual_seed(0)
    model = build(name, num_classes=5, sources=sources, dropout=0.5)
    mask = [True, False, False, True, False, False]
    x = _clips(sources, mask)
    model.train()
    model(x, mask).sum().backward()  # moves BN statistics away from their initial values
    model.eval()
    with torch.no_grad():
        batched = model(x, mask)
        state, used = model.init_state(3), {"expensive": 0, "cheap": 0}
        for t, e in enumerate(mask):
            src = "expensive" if e else "cheap"
            state = model.step(state, x[src][:, used[src]], expensive=e)
            used[src] += 1
            if t == 0:
                first = model.logits(state)
        stepped = model.logits(state)
        alone = model({"expensive": x["expensive"][:, :1]}, [True])
    assert batched.shape == (3, 5)
    torch.testing.assert_close(stepped, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-5)  # the online prediction after one clip


def test_alignment_projects_and_pools_only_when_sources_differ():
    equal = build("fastgru", num_classes=3, sources=EQUAL)
    assert all(a.proj is None and not a.pool for a in equal.align.values())
    mixed = build("fastgru", num_classes=3, sources=MIXED)
    assert mixed.width == 16 and mixed.grid == (1, 2, 2)  # expensive width, smallest grid
    assert mixed.align["cheap"].proj.weight.shape == (16, 8) and mixed.align["cheap"].pool
    assert mixed.align["expensive"].proj is None and mixed.align["expensive"].pool
    avg = build("avg", num_classes=3, sources=MIXED)  # a classifier per backbone on its own width
    assert avg.classifier["cheap"].in_features == 8 and avg.align["cheap"].proj is None


def test_bad_batches_are_named():
    model = build("gru", num_classes=3, sources=EQUAL)
    x = _clips(EQUAL, [True, False])
    with pytest.raises(ValueError, match="expected \\(B, 2, C"):
        model(x, [True, True, False])
    only_e = build("gru", num_classes=3, sources={"expensive": [16, 1, 2, 2]})
    with pytest.raises(ValueError, match="no cheap source"):
        only_e(x, [True, False])
    with pytest.raises(ValueError, match="no clip"):
        model.logits(model.init_state(2))


def test_fastgru_costs_3_5_c2_per_position_and_step():
    C, grid, N, K = 64, (2, 3, 3), 6, 10
    positions = grid[0] * grid[1] * grid[2]
    want = (3.5 * C * C * positions * (N - 1) + C * K) / 1e9
    assert aggregator_gflops("fastgru", C, grid, N, num_classes=K) == pytest.approx(want, rel=1e-12)
    # Table 4: 32-frame x 8-clip R(2+1)D-50 maps (4 x 7 x 7 x 2048): 979.2 - 8 x 119.9 = 20.0 GFLOPs
    assert aggregator_gflops("fastgru", 2048, (4, 7, 7), 8) == pytest.approx(20.1, abs=0.1)
    # concat: W and U, C^2 each per position and step; gru on pooled vectors: 3 x 2 C^2 per step
    assert aggregator_gflops("concat", C, grid, N, K) == pytest.approx((2 * C * C * positions * (N - 1) + C * K) / 1e9)
    assert aggregator_gflops("gru", C, grid, N, K) == pytest.approx((6 * C * C * (N - 1) + C * K) / 1e9)
    assert aggregator_gflops("avg", C, grid, N, K) == pytest.approx(N * C * K / 1e9)


def test_alignment_projection_is_counted():
    mask = [True, False, True, False]
    macs = count_gflops("fastgru", {"num_classes": 10, "sources": MIXED, "dropout": 0.0}, mask) * 1e9
    # common grid (1, 2, 2) = 4 positions, width 16: 3 FAST-GRU steps, the 2 cheap clips projected 8 -> 16, fc
    assert macs == pytest.approx(3.5 * 16 * 16 * 4 * 3 + 2 * 4 * 8 * 16 + 16 * 10)
