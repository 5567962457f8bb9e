"""Batch-norm folding (extract/runner.py ``fold_batchnorm``) finds its pairs with a probe whose
convolutions only return their output's shape: the same pairs as a probe with real convolutions,
and a folded network equal to the unfolded one in fp32, on one member of every backbone family
that has batch norms (resnet, its VA-RED² wrapper, torchvision, VMZ, bLVNet-TAM, pytorchvideo)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from faster.extract import models
from faster.extract.runner import _trace_pairs, batchnorm_pairs, fold_batchnorm

# (name, clip_len, size): the family's smallest member at a small input it accepts
FAMILIES = [
    ("r2plus1d50_tiny", 8, 32),
    ("r2d26_tiny", 8, 32),
    ("r3d50_tiny", 8, 32),
    ("vared_r2plus1d50_tiny", 8, 32),
    ("r2plus1d_18", 8, 16),
    ("mc3_18", 8, 16),
    ("s3d", 8, 32),
    ("r2plus1d_34", 8, 16),
    ("ir_csn_152", 8, 16),
    ("blvnet_tam50", 8, 64),
    ("pv_x3d_xs", 4, 64),
]


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial statistics and affine terms, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def _build(name: str) -> nn.Module:
    if name.startswith("pv_"):
        pytest.importorskip("pytorchvideo")
    torch.manual_seed(0)
    model = models.build(name, weights=None, seed=0).eval()
    _randomise_norms(model)
    return model


@pytest.mark.parametrize("name,clip_len,size", FAMILIES)
def test_folded_network_equals_the_unfolded_one(name, clip_len, size):
    model = _build(name)
    names = {id(m): n for n, m in model.named_modules()}
    fast = [(names[id(c)], names[id(b)]) for c, b in batchnorm_pairs(model, clip_len, size)]
    with torch.no_grad():
        real = [(names[id(c)], names[id(b)]) for c, b in _trace_pairs(model, clip_len, size, None, shapes_only=False)]
    assert fast == real and len(fast) > 0
    x = torch.randn(1, 3, clip_len, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorm(model, clip_len, size) == len(fast)
        got = model(x)
    norms_left = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert not norms_left & {b for _, b in fast}
    rel = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    assert rel < 1e-5, f"{name}: folded output off by {rel:.2e} (relative L2)"


def test_a_model_that_reads_convolution_values_is_probed_for_real():
    class Reads(nn.Module):  # a convolution's values decide the path: the shape probe fails, the real one runs
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)

        def forward(self, x):
            y = self.conv(x)
            if bool((y == 0).all()):
                raise ValueError("all zeros")
            return self.bn(y)

    model = Reads().eval()
    with torch.no_grad():
        model.conv.bias.fill_(1.0)
        assert batchnorm_pairs(model, 4, 8) == [(model.conv, model.bn)]
    assert "forward" not in vars(model.conv) and not model.conv._forward_hooks  # left as it was
    with torch.no_grad():
        model.conv.bias.fill_(0.0)  # neither probe runs through: nothing folds
        assert fold_batchnorm(model, 4, 8) == 0


def test_no_batch_norm_no_probe():
    class Fails(nn.Module):
        def forward(self, x):
            raise AssertionError("probed")

    assert fold_batchnorm(Fails()) == 0
