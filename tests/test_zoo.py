"""Backbones with real weights: VMZ, pytorchvideo, torchvision-layout R(2+1)D-50, ImageNet-inflated R2D-26.

Each test builds a reference independently from the public definitions (torchvision's video
ResNet classes configured as VMZ configures them; pytorchvideo's own models; torchvision's 2D
ResNet-50), saves its weights in the publisher's format, and checks that the registry's backbone
loaded from that file gives the reference's map.
"""
from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from torch import nn

from faster.extract import models
from faster.extract.models import layouts

VMZ = ["r2plus1d_34", "r2plus1d_152", "ir_csn_152", "ip_csn_152"]
PV = ["pv_r2plus1d_r50", "pv_slow_r50", "pv_x3d_xs", "pv_x3d_s", "pv_x3d_m", "pv_csn_r101"]
PV_HUB = {"pv_r2plus1d_r50": "r2plus1d_r50", "pv_slow_r50": "slow_r50", "pv_x3d_xs": "x3d_xs",
          "pv_x3d_s": "x3d_s", "pv_x3d_m": "x3d_m", "pv_csn_r101": "csn_r101"}


# --- an independent reference: torchvision's VideoResNet configured as VMZ's code does ------------

def _vmz_reference(name: str, depths: tuple[int, ...] | None = None) -> nn.Module:
    """VMZ's network from torchvision.models.video.resnet's classes (VMZ's conv makers and stems)."""
    from torchvision.models.video import resnet as tv

    class Conv2Plus1DOwnWidth(tv.Conv2Plus1D):  # VMZ recomputes the width from this conv's own channels
        def __init__(self, in_planes, out_planes, midplanes, stride=1, padding=1):
            super().__init__(in_planes, out_planes, (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes),
                             stride, padding)

    class Depthwise(nn.Conv3d):
        def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
            super().__init__(in_planes, out_planes, 3, stride, padding, groups=in_planes, bias=False)

        @staticmethod
        def get_downsample_stride(stride):
            return (stride, stride, stride)

    class IPDepthwise(nn.Sequential):
        def __init__(self, in_planes, out_planes, midplanes=None, stride=1, padding=1):
            super().__init__(nn.Conv3d(in_planes, out_planes, 1, bias=False), nn.BatchNorm3d(out_planes),
                             Depthwise(out_planes, out_planes, None, stride))

        get_downsample_stride = Depthwise.get_downsample_stride

    pool = lambda: nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))  # noqa: E731
    config = {  # block, conv maker, depths, stem
        "r2plus1d_34": (tv.BasicBlock, Conv2Plus1DOwnWidth, (3, 4, 6, 3), tv.R2Plus1dStem),
        "r2plus1d_152": (tv.Bottleneck, Conv2Plus1DOwnWidth, (3, 8, 36, 3),
                         lambda: nn.Sequential(*tv.R2Plus1dStem(), pool())),
        "ir_csn_152": (tv.Bottleneck, Depthwise, (3, 8, 36, 3), lambda: nn.Sequential(*tv.BasicStem(), pool())),
        "ip_csn_152": (tv.Bottleneck, IPDepthwise, (3, 8, 36, 3), lambda: nn.Sequential(*tv.BasicStem(), pool())),
    }
    block, conv, layers, stem = config[name]
    net = tv.VideoResNet(block=block, conv_makers=[conv] * 4, layers=list(depths or layers), stem=stem)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.eps = 1e-3  # VMZ: Caffe2's BatchNorm
    return net


def _randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that they must travel with the weights."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def _seeded(fn, seed: int = 11):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _layer4(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = net.stem(x)
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
    return x


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- VMZ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VMZ)
def test_vmz_keys_and_shapes_are_the_published_layout(name):
    """On meta tensors: every key and shape of torchvision's VideoResNet as VMZ builds it (fc aside)."""
    with torch.device("meta"):
        ref = _vmz_reference(name)
        ours = models.get(name)()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    eps = {m.eps for m in ours.modules() if isinstance(m, nn.BatchNorm3d)}
    assert eps == {1e-3}


def test_vmz_widths_follow_the_published_formula():
    with torch.device("meta"):
        r34, r152 = models.get("r2plus1d_34")(), models.get("r2plus1d_152")()
    assert r34.layer1[0].conv1[0][0].out_channels == 144
    assert [r34.layer2[0].conv1[0][0].out_channels, r34.layer2[0].conv2[0][0].out_channels] == [230, 288]
    assert [r152.layer1[0].conv2[0][0].out_channels, r152.layer4[0].conv2[0][0].out_channels] == [144, 1152]
    assert r34.layer2[0].conv1[0][3].stride == (2, 1, 1) and r34.layer2[0].conv1[0][0].stride == (1, 2, 2)
    assert r34.layer2[0].downsample[0].stride == (2, 2, 2)


@pytest.mark.parametrize("name", VMZ)
def test_vmz_shallow_variants_give_the_reference_map(name, tmp_path):
    """Each VMZ block / middle conv / stem at full widths and depths (1, 1, 2, 1): a torchvision-layout file
    gives the reference's layer4 map (the full-depth networks: the slow test below)."""
    from faster.extract.models import vmz

    depths = (1, 1, 2, 1)
    ref = _seeded(lambda: _randomise_bn(_vmz_reference(name, depths=depths)))
    model = vmz._vmz(name, depths=depths)
    model.name = name
    path = tmp_path / f"{name}_shallow.pth"
    torch.save(ref.state_dict(), path)
    from faster.extract.models.weights import load_weights

    assert load_weights(model, str(path)) == _sha(path)
    x = _seeded(lambda: torch.randn(1, 3, 8, 32, 32))  # (B, 3, L, H, W)
    with torch.no_grad():
        y = model.eval()(x)
    torch.testing.assert_close(y, _layer4(ref, x), rtol=1e-4, atol=1e-5)
    # a file of another depth is one error listing what is missing and what is left over
    state = ref.state_dict()
    del state["layer4.0.conv1.1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_weights(vmz._vmz(name, depths=(1, 1, 1, 1)), str(path))
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert "1 missing keys [layer4.0.conv1.1.weight]" in msg and "unexpected keys [layer3.1." in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", VMZ)
def test_vmz_published_file_gives_the_reference_map(name, tmp_path):
    """A .pth as published (plain state dict in torchvision's layout, fc included, no num_batches_tracked
    as ig65m-pytorch's converted files) gives the reference's layer4 map."""
    ref = _seeded(lambda: _randomise_bn(_vmz_reference(name)))
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    model = models.build(name, weights=str(path))
    x = _seeded(lambda: torch.randn(1, 3, 8, 32, 32))  # (B, 3, L, H, W)
    with torch.no_grad():
        y = model(x)
    want = _layer4(ref, x)
    assert y.shape == want.shape == (1, model.out_channels, 1, 32 // model.spatial_stride, 32 // model.spatial_stride)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert y.abs().sum() > 0
    assert (model.weights, model.weights_layout) == (_sha(path), "torchvision-videoresnet")
    assert (model.layer, model.temporal_stride) == ("layer4", 8)
    assert model.mean == (0.43216, 0.394666, 0.37645) and model.std == (0.22803, 0.22145, 0.216989)


def test_vmz_gflops_and_parameters_against_the_model_zoo():
    """Parameters match VMZ's zoo (63.6 / 118.0 / 29.6 / 32.8 M with a 400-class fc) within 1%; GFLOPs are
    multiply-adds of the convolutions (VMZ's zoo reports ~1.3x these: 49.8 / 96.7 / 108.8, another counter)."""
    published = {"r2plus1d_34": 63.6, "r2plus1d_152": 118.0, "ir_csn_152": 29.6, "ip_csn_152": 32.8}
    for name, millions in published.items():
        with torch.device("meta"):
            m = models.get(name)()
        params = sum(p.numel() for p in m.parameters()) + m.out_channels * 400 + 400
        assert abs(params / 1e6 - millions) / millions < 0.01, (name, params)
    assert models.clip_gflops("r2plus1d_34", 8, 112) == pytest.approx(38.09, abs=0.01)
    assert models.clip_gflops("ir_csn_152", 32, 224) == pytest.approx(74.05, abs=0.01)
    assert models.clip_gflops("ip_csn_152", 32, 224) == pytest.approx(83.29, abs=0.01)
    assert models.clip_gflops("r2plus1d_152", 32, 112) == pytest.approx(64.66, abs=0.01)
    assert models.feature_shape("r2plus1d_34", 8, 112) == (512, 1, 7, 7)
    assert models.feature_shape("r2plus1d_152", 32, 112) == (2048, 4, 4, 4)


# --- our R(2+1)D-50 from a torchvision-layout file ------------------------------------------------

def test_r2plus1d50_loads_vmz_code_at_depths_3_4_6_3(tmp_path):
    """VMZ's R(2+1)D code at depths [3,4,6,3] (pool1, Bottleneck) saves the paper's R(2+1)D-50."""
    ref = _seeded(lambda: _randomise_bn(_vmz_reference("r2plus1d_152", depths=(3, 4, 6, 3))))
    path = tmp_path / "r2plus1d_50_vmz.pth"
    torch.save(ref.state_dict(), path)
    model = models.build("r2plus1d50", weights=str(path))
    x = _seeded(lambda: torch.randn(1, 3, 8, 32, 32))
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, _layer4(ref, x), rtol=1e-4, atol=1e-5)
    assert (model.weights, model.weights_layout) == (_sha(path), "torchvision-videoresnet")
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm3d)} == {1e-3}  # VMZ's BatchNorm


def test_videoresnet_to_faster_maps_every_kind_of_key():
    m = {"stem.0.weight": "conv1.0.weight", "stem.4.running_var": "conv1.4.running_var",
         "layer1.0.conv1.0.weight": "res2.0.conv1.weight", "layer1.0.conv1.1.bias": "res2.0.bn1.bias",
         "layer2.1.conv2.0.0.weight": "res3.1.conv2.0.weight", "layer2.1.conv2.0.1.weight": "res3.1.conv2.1.weight",
         "layer2.1.conv2.0.3.weight": "res3.1.conv2.3.weight", "layer4.2.conv2.1.running_mean": "res5.2.bn2.running_mean",
         "layer3.0.conv3.0.weight": "res4.0.conv3.weight", "layer3.0.conv3.1.weight": "res4.0.bn3.weight",
         "layer3.0.downsample.0.weight": "res4.0.shortcut.0.weight", "layer3.0.downsample.1.bias": "res4.0.shortcut.1.bias",
         "layer1.0.conv2.0.weight": "res2.0.conv2.0.weight"}  # a single 3D middle conv (R3D)
    out = layouts.videoresnet_to_faster({k: torch.zeros(1) for k in m}, nn.Sequential(nn.BatchNorm3d(2)))
    assert sorted(out) == sorted(m.values()) and all(m[k] in out for k in m)


# --- R2D-26 inflated from an ImageNet ResNet-50 ---------------------------------------------------

def test_r2d26_inflated_from_resnet50_equals_the_2d_network_on_a_static_clip(tmp_path):
    from torchvision.models import resnet50

    ref = _seeded(lambda: _randomise_bn(resnet50(weights=None)))
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(ref.state_dict(), path)
    model = models.build("r2d26", weights=str(path))
    assert (model.weights, model.weights_layout) == (_sha(path), "resnet2d")
    frame = _seeded(lambda: torch.randn(1, 3, 64, 64))
    clip = frame.unsqueeze(2).expand(1, 3, 8, 64, 64).contiguous()  # (B, 3, L, H, W): 8 identical frames
    with torch.no_grad():
        y = model(clip)  # (1, 2048, 1, 2, 2)
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(frame))))
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            x = layer[:2](x)  # R2D-26: the first two bottlenecks of each stage
    assert y.shape == (1, 2048, 1, 2, 2)
    torch.testing.assert_close(y[:, :, 0], x, rtol=1e-4, atol=1e-4)
    w = model.state_dict()["conv1.0.weight"]
    assert w.shape == (64, 3, 8, 7, 7) and torch.allclose(w.sum(2), ref.conv1.weight, atol=1e-6)


def test_a_2d_resnet_is_refused_by_backbones_that_cannot_inflate_it(tmp_path):
    path = tmp_path / "resnet2d.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(4, 8, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"are a resnet2d state dict, which backbone 'r2plus1d_18' "
                                         r"\(torchvision-videoresnet layout\) cannot load"):
        models.build("r2plus1d_18", weights=str(path))
    with pytest.raises(ValueError, match=r"read as a resnet2d state dict\) do not fit backbone 'r2d26_tiny'"):
        models.build("r2d26_tiny", weights=str(path))


def test_layouts_are_detected_from_keys():
    t4, t5 = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1)
    assert layouts.layout_of({"blocks.0.conv.weight": t5}) == "pytorchvideo"
    assert layouts.layout_of({"stem.0.weight": t5, "layer1.0.conv1.0.weight": t5}) == "torchvision-videoresnet"
    assert layouts.layout_of({"conv1.weight": t4, "layer1.0.conv1.weight": t4}) == "resnet2d"
    assert layouts.layout_of({"conv1.0.weight": t5, "res2.0.conv1.weight": t5}) == "faster"
    assert layouts.unwrap_pytorchvideo({"model_state": {"a": t4}, "epoch": 3}) == {"a": t4}
    for name in ("r2plus1d50_tiny", "r2plus1d_18"):
        with torch.device("meta"):
            m = models.get(name)()
        assert layouts.layout_of(m.state_dict()) == ("faster" if name.endswith("tiny") else "torchvision-videoresnet")


# --- pytorchvideo ---------------------------------------------------------------------------------

def _pv_reference(name: str) -> nn.Module:
    hub = pytest.importorskip("pytorchvideo.models.hub")
    return _seeded(lambda: _randomise_bn(getattr(hub, PV_HUB[name])(pretrained=False)))


@pytest.mark.parametrize("name", PV)
def test_pytorchvideo_zoo_file_gives_pytorchvideos_own_map(name, tmp_path):
    """A zoo .pyth ({"model_state": ..., "epoch", "cfg"} as PySlowFast saves) gives blocks[:-1] of pytorchvideo's model."""
    ref = _pv_reference(name)
    path = tmp_path / f"{name}.pyth"
    torch.save({"epoch": 196, "model_state": ref.state_dict(), "cfg": "TRAIN:\n  ENABLE: true\n"}, path)
    model = models.build(name, weights=str(path))
    x = _seeded(lambda: torch.randn(1, 3, 8, 32, 32))
    with torch.no_grad():
        y = model(x)
        want = x
        for block in ref.blocks[:-1]:
            want = block(want)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    assert y.shape == (1, model.out_channels, 8 // model.temporal_stride, 1, 1)
    assert (model.weights, model.weights_layout) == (_sha(path), "pytorchvideo")
    assert (model.mean, model.std, model.layer) == ((0.45,) * 3, (0.225,) * 3, "res5")
    assert models.feature_shape(name, *model.native_input)[0] == model.out_channels


def test_pytorchvideo_plain_state_dict_and_wrong_files(tmp_path):
    ref = _pv_reference("pv_x3d_xs")
    plain = tmp_path / "x3d_xs_plain.pth"
    torch.save(ref.state_dict(), plain)
    model = models.build("pv_x3d_xs", weights=str(plain))
    assert torch.equal(model.state_dict()["blocks.4.res_blocks.6.branch2.conv_c.weight"],
                       ref.state_dict()["blocks.4.res_blocks.6.branch2.conv_c.weight"])
    with pytest.raises(ValueError, match="missing keys") as info:  # X3D-XS weights are not Slow-R50's
        models.build("pv_slow_r50", weights=str(plain))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"are a pytorchvideo state dict, which backbone 'r2d26_tiny' \(faster "
                                         r"layout\) cannot load; it takes faster or torchvision-videoresnet "
                                         r"or resnet2d files"):
        models.build("r2d26_tiny", weights=str(plain))


def test_pytorchvideo_gflops_at_native_sizes():
    """Slow-R50 8x256 matches the zoo's 54.52; X3D is below the zoo's figure by its head's conv5 (not a backbone)."""
    pytest.importorskip("pytorchvideo.models.hub")
    assert models.clip_gflops("pv_slow_r50", 8, 256) == pytest.approx(54.52, abs=0.01)
    for name, zoo in (("pv_x3d_xs", 0.91), ("pv_x3d_s", 2.96), ("pv_x3d_m", 6.72), ("pv_r2plus1d_r50", 76.45),
                      ("pv_csn_r101", 75.62)):
        with torch.device("meta"):
            frames, size = models.get(name)().native_input
        assert 0.85 * zoo < models.clip_gflops(name, frames, size) < zoo, name


def test_pytorchvideo_transforms_are_never_imported():
    pytest.importorskip("pytorchvideo.models.hub")
    before = "pytorchvideo.transforms" in sys.modules
    with torch.device("meta"):
        models.get("pv_x3d_xs")()
    assert ("pytorchvideo.transforms" in sys.modules) == before


def test_without_pytorchvideo_naming_one_is_a_one_line_error(monkeypatch):
    for mod in ("pytorchvideo", "pytorchvideo.models", "pytorchvideo.models.hub"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"backbone 'pv_slow_r50' needs pytorchvideo .*pip install -e \"\.\[zoo\]\"") \
            as info:
        models.build("pv_slow_r50")
    assert "\n" not in str(info.value)
