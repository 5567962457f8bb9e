"""torchvision's s3d, MViT and Swin3D as backbones (extract/models/tv.py): each map equals the one
torchvision's own network computes with the same weights (a published-layout file, head included),
GFLOPs equal torchvision's published figures, and the inputs each accepts.

Random weights, on the CPU. torchvision's init of these models takes seconds on a busy 2-core box,
so both networks are built with the init skipped and filled from one seeded state dict.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from faster.cli import cli
from faster.extract import models
from faster.extract.models.cost import _no_random_init, build_on_meta
from faster.extract.models.weights import load_weights

# name -> (weight enum, channels, temporal stride, layer, head key prefix)
TV_VIDEO = {
    "s3d": ("S3D_Weights", 1024, 8, "features", "classifier."),
    "mvit_v1_b": ("MViT_V1_B_Weights", 768, 2, "norm", "head."),
    "mvit_v2_s": ("MViT_V2_S_Weights", 768, 2, "norm", "head."),
    "swin3d_t": ("Swin3D_T_Weights", 768, 2, "norm", "head."),
    "swin3d_s": ("Swin3D_S_Weights", 768, 2, "norm", "head."),
    "swin3d_b": ("Swin3D_B_Weights", 1024, 2, "norm", "head."),
}


@contextlib.contextmanager
def _mvit_for(frames: int, px: int):
    """torchvision's MViT builders made for ``frames`` x ``px`` x ``px`` clips: they fix 16 x 224
    (their ``spatial_size`` / ``temporal_size`` cannot be passed), so their ``_mvit`` gets the
    other size. Everything else, code included, is torchvision's."""
    from torchvision.models.video import mvit

    real = mvit._mvit

    def sized(**kwargs):
        kwargs.update(spatial_size=(px, px), temporal_size=frames)
        return real(**kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mvit, "_mvit", sized)
        yield


class _Stop(Exception):
    """Raised by a hook once torchvision's forward has computed the map (the head is not needed)."""


def _fill(net: nn.Module, seed: int) -> nn.Module:
    """Seeded weights in every floating-point tensor of ``net``'s state dict, norms non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        for m in net.modules():
            for key, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue  # BN's counter, Swin's relative_position_index: computed by the constructor
                if key == "running_var":
                    t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
                elif isinstance(m, norms) and key == "weight":
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                elif t.dim() >= 2:  # fan-in scaled, so the activations keep their scale through the depth
                    t.copy_(torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5))
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return net.eval()


def _torchvision(name: str, seed: int = 5) -> nn.Module:
    """torchvision's own network ``name`` (with its head), init skipped, filled with seeded weights."""
    from torchvision.models import video

    with _no_random_init():
        net = getattr(video, name)(weights=None)
    return _fill(net, seed)


def _ours(name: str, path) -> nn.Module:
    """Our backbone loaded from the published-layout file ``path`` (init skipped: the file sets every weight)."""
    with _no_random_init():
        model = models.get(name)()
    model.name = name
    model.weights = load_weights(model, str(path))
    return model.eval()


def _torchvision_map(net: nn.Module, name: str, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """The map torchvision's forward computes before its pooling and head, read with hooks."""
    got = []
    if name.startswith("mvit"):  # the tokens after the last norm; the head reads the class token only
        def hook(module, inputs, output):
            got.append(output)
            raise _Stop
        handle = net.norm.register_forward_hook(hook)
    else:  # s3d and swin3d pool (B, C, T', H', W'): features' map / the norm's tokens permuted
        def hook(module, inputs):
            got.append(inputs[0])
            raise _Stop
        handle = net.avgpool.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), pytest.raises(_Stop):
            net(x)
    finally:
        handle.remove()
    out = got[0]
    if name.startswith("mvit"):  # (B, 1 + T'H'W', C): the class token left out, the patches on their grid
        B, _, C = out.shape
        out = out[:, 1:].reshape(B, *grid, C).permute(0, 4, 1, 2, 3)
    return out


def _check_equal(name: str, x: torch.Tensor, shape: tuple[int, ...], tmp_path) -> None:
    ref = _torchvision(name)
    path = tmp_path / f"{name}.pth"
    state = ref.state_dict()
    head = TV_VIDEO[name][4]
    assert any(k.startswith(head) for k in state)  # the file has torchvision's head, as published
    torch.save(state, path)
    model = _ours(name, path)
    assert not any(k.startswith(head) for k in model.state_dict())
    assert set(model.state_dict()) == {k for k in state if not k.startswith(head)}
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == shape
    want = _torchvision_map(ref, name, x, shape[2:])
    assert torch.isfinite(want).all() and want.abs().amax() > 0
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * float(want.abs().amax()))


def _clip(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name, clip, shape", [
    ("s3d", (1, 3, 8, 64, 64), (1, 1024, 1, 2, 2)),  # any clip of >= 5 frames, >= 17 px
    ("swin3d_t", (1, 3, 4, 64, 64), (1, 768, 2, 2, 2)),  # windows (8, 7, 7) shrunk and padded to the tokens
    ("swin3d_s", (1, 3, 2, 48, 48), (1, 768, 1, 2, 2)),
    ("swin3d_b", (1, 3, 3, 36, 40), (1, 1024, 2, 2, 2)),  # sizes that are not whole patches: padded
])
def test_map_equals_torchvisions_own_network(name, clip, shape, tmp_path):
    _check_equal(name, _clip(*clip), shape, tmp_path)


@pytest.mark.parametrize("name", ["mvit_v1_b", "mvit_v2_s"])
def test_mvit_map_equals_torchvisions_on_a_small_grid(name, tmp_path):
    """torchvision's MViT built for 4 x 64 x 64 clips (2 x 16 x 16 patches), ours and theirs: the
    same code at a cost a test can pay; the registered backbones take 16 x 224 x 224 only (below, slow)."""
    with _mvit_for(4, 64):
        _check_equal(name, _clip(2, 3, 4, 64, 64), (2, 768, 2, 2, 2), tmp_path)
        with pytest.raises(ValueError, match=rf"{name} takes 4-frame 64 x 64 clips only .* 2 x 16 x 16 patches"):
            build_on_meta(models.get(name))(torch.empty(1, 3, 16, 224, 224, device="meta"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mvit_v1_b", "mvit_v2_s"])
def test_mvit_map_equals_torchvisions_at_its_only_input(name, tmp_path):
    """The registered MViTs at 16 x 224 x 224, the one clip they take (~65-70 GMACs per forward)."""
    _check_equal(name, _clip(1, 3, 16, 224, 224), (1, 768, 8, 7, 7), tmp_path)


def test_build_loads_a_published_file_with_its_head(tmp_path):
    ref = _torchvision("s3d", seed=9)
    path = tmp_path / "s3d-d76dad2f.pth"
    torch.save(ref.state_dict(), path)
    model = models.build("s3d", weights=str(path))
    assert len(model.weights) == 64 and not model.training
    x = _clip(1, 3, 5, 17, 17)  # the smallest clip s3d takes
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1024, 1, 1, 1)
    torch.testing.assert_close(y, ref.features(x), rtol=1e-4, atol=1e-5)
    state = ref.state_dict()
    del state["features.15.branch0.0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"do not fit backbone 's3d': 1 missing keys \[features\.15\.branch0"):
        models.build("s3d", weights=str(path))


@pytest.mark.parametrize("name", list(TV_VIDEO))
def test_attributes_and_published_normalisation(name):
    from torchvision.models import video

    enum, channels, t_stride, layer, head = TV_VIDEO[name]
    model = build_on_meta(models.get(name))
    assert (model.out_channels, model.temporal_stride, model.spatial_stride) == (channels, t_stride, 32)
    assert (model.layer, model.head_prefixes, model.native_input, model.weight_enum) == (layer, (head,), (16, 224),
                                                                                        enum)
    for weights in getattr(video, enum):  # as torchvision's transforms for these weights normalise
        transforms = weights.transforms()
        assert (model.mean, model.std) == (tuple(transforms.mean), tuple(transforms.std))
    assert models.feature_shape(name, 16, 224) == (channels, 16 // t_stride, 7, 7)


@pytest.mark.parametrize("name", list(TV_VIDEO))
def test_gflops_match_torchvisions_published_ops(name):
    """torchvision publishes GFLOPs (multiply-adds) per 16 x 224 x 224 clip; the head is not counted here."""
    from torchvision.models import video

    for weights in getattr(video, TV_VIDEO[name][0]):
        assert models.clip_gflops(name, 16, 224) == pytest.approx(weights.meta["_ops"], rel=0.005)


def test_input_sizes_each_model_takes():
    for name in ("mvit_v1_b", "mvit_v2_s"):
        with pytest.raises(ValueError, match=rf"{name} takes 16-frame 224 x 224 clips only \(torchvision's MViT "
                                             r"fixes .* 8 x 56 x 56 patches\), got 8 x 224 x 224: use --clip-len 16"):
            models.clip_gflops(name, 8, 224)
        with pytest.raises(ValueError, match=r"got 16 x 112 x 112"):
            models.feature_shape(name, 16, 112)
    with pytest.raises(ValueError, match=r"s3d needs clips of at least 5 frames and 17 x 17 px.*got 4 x 224 x 224"):
        models.clip_gflops("s3d", 4, 224)
    with pytest.raises(ValueError, match=r"got 8 x 16 x 16"):
        models.feature_shape("s3d", 8, 16)
    assert models.feature_shape("s3d", 5, 17) == (1024, 1, 1, 1)
    assert models.feature_shape("swin3d_t", 1, 8) == (768, 1, 1, 1)  # Swin3D pads any clip to whole windows
    assert models.feature_shape("swin3d_t", 5, 100) == (768, 3, 4, 4)
    model = build_on_meta(models.get("mvit_v2_s"))
    with pytest.raises(ValueError, match=r"expects \(B, 3, L, H, W\)"):
        model(torch.empty(1, 1, 16, 224, 224, device="meta"))


def test_flops_list_prints_them(monkeypatch):
    monkeypatch.setattr(models, "names", lambda: list(TV_VIDEO))
    result = CliRunner().invoke(cli, ["flops", "--list", "--clip-len", "16", "--size", "224"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert set(rows) == set(TV_VIDEO)
    assert rows["mvit_v2_s"] == ["64.22", "768", "x", "8", "x", "7", "x", "7"]
    assert rows["swin3d_b"][0] == "140.67" and rows["s3d"][0] == "17.98"
    result = CliRunner().invoke(cli, ["flops", "--list"])  # 8 frames: the MViTs say what they take
    assert result.exit_code == 0, result.output
    line = next(v for v in result.output.splitlines() if v.split()[0] == "mvit_v1_b")
    assert line.split()[1] == "-" and "takes 16-frame 224 x 224 clips only" in line


def test_weight_enums_load_through_torch_hub(monkeypatch, tmp_path):
    """The enum path (torch.hub's download replaced by a state dict with torchvision's head), and its errors."""
    import torchvision.models._api as tv_api
    from torchvision.models import video

    ref = _torchvision("s3d", seed=2)
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return ref.state_dict()

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = models.build("s3d", weights="S3D_Weights.KINETICS400_V1")
    assert calls == [video.S3D_Weights.KINETICS400_V1.url]
    assert model.weights == "torchvision:S3D_Weights.KINETICS400_V1"
    assert torch.equal(model.state_dict()["features.15.branch3.1.0.weight"],
                       ref.state_dict()["features.15.branch3.1.0.weight"])
    swin = build_on_meta(models.get("swin3d_b"))
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'Swin3D_B_Weights.NOPE'; expected "
                                         r"Swin3D_B_Weights.KINETICS400_V1 or Swin3D_B_Weights.KINETICS400_IMAGENET22K_V1"):
        swin.enum_state_dict("Swin3D_B_Weights.NOPE")
    with pytest.raises(ValueError, match=r"for swin3d_b you may also name torchvision's Swin3D_B_Weights"):
        swin.enum_state_dict("Swin3D_T_Weights.KINETICS400_V1")
