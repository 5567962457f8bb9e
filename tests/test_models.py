"""Clip backbones: registry, res5 shapes, deterministic init, weights files, torchvision adapters."""
from __future__ import annotations

import hashlib

import pytest
import torch

from faster.extract import models

PAPER = ["r2plus1d50", "r2d26", "r3d50"]
TINY = [n + "_tiny" for n in PAPER]
TV = ["r2plus1d_18", "r3d_18", "mc3_18"]
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def test_registry_lists_every_backbone_and_refuses_duplicates():
    assert set(PAPER + TINY + TV) <= set(models.names())
    assert models.names() == sorted(models.names())
    with pytest.raises(ValueError, match="'r2d26' is already registered"):
        models.register("r2d26", lambda: None)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        models.build("resnet9000")


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_run_for_real(name):
    model = models.build(name)
    assert (model.name, model.layer, model.out_channels) == (name, "res5", 64)
    assert (model.temporal_stride, model.spatial_stride) == (8, 32)
    assert not model.training
    with torch.no_grad():
        y = model(torch.randn(2, 3, 16, 64, 64))  # (B, 3, L, H, W)
    assert y.shape == (2, 64, 2, 2, 2)  # (B, C, L/8, H/32, W/32)
    assert torch.isfinite(y).all() and y.abs().sum() > 0


def published_normalisation(name: str) -> tuple:
    """Each publisher's input statistics: pytorchvideo's and torchvision's MViT (0.45, 0.225); bLVNet-TAM's
    and torchvision's Swin3D ImageNet's; everything else the Kinetics statistics of the VMZ/torchvision ResNets."""
    if name.startswith(("pv_", "mvit_")):
        return (0.45,) * 3, (0.225,) * 3
    if name.startswith(("blvnet_", "swin3d_")):
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return KINETICS_MEAN, KINETICS_STD


@pytest.mark.parametrize("name", models.names())
def test_res5_shape_and_attributes_of_every_backbone(name):
    """Full-size backbones on meta tensors (no real compute), tiny ones for real."""
    if name.startswith("pv_"):
        pytest.importorskip("pytorchvideo.models.hub")
    model = models.build(name)
    if not name.endswith("_tiny"):
        model = model.to("meta")
    x = torch.empty(1, 3, 16, 224, 224, device=next(model.parameters()).device)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, model.out_channels, 16 // model.temporal_stride, 224 // model.spatial_stride,
                       224 // model.spatial_stride)
    assert (model.mean, model.std) == published_normalisation(name)
    assert model.weights == "random-init:seed=0"
    assert models.feature_shape(name, 16, 224) == tuple(y.shape[1:])
    if name in PAPER:  # Table 1: res5 is L/8 x 7 x 7 x 2048 at 224 px
        assert tuple(y.shape[1:]) == (2048, 2, 7, 7) and model.layer == "res5"
    if name in TV:
        assert model.layer == "layer4" and model.out_channels == 512
        assert model.temporal_stride == (1 if name == "mc3_18" else 8) and model.spatial_stride == 16


def test_r2plus1d50_layers_follow_table1():
    """Stem 1x7x7,45 then 3x1x1,64; (2+1)D middle widths 144..1152; strides in 1x3x3/3x1x1/shortcut only."""
    with torch.device("meta"):
        model = models.get("r2plus1d50")()
    stem = [m for m in model.conv1 if isinstance(m, torch.nn.Conv3d)]
    assert [(c.kernel_size, c.stride, c.out_channels) for c in stem] == [
        ((1, 7, 7), (1, 2, 2), 45), ((3, 1, 1), (1, 1, 1), 64)]
    assert (model.pool1.kernel_size, model.pool1.stride) == ((1, 3, 3), (1, 2, 2))
    for stage, depth, inner, mid in zip((model.res2, model.res3, model.res4, model.res5), (3, 4, 6, 3),
                                        (64, 128, 256, 512), (144, 288, 576, 1152)):
        assert len(stage) == depth
        first = stage[0]
        spatial, temporal = first.conv2[0], first.conv2[3]
        assert (spatial.kernel_size, spatial.out_channels) == ((1, 3, 3), mid)
        assert (temporal.kernel_size, temporal.out_channels) == ((3, 1, 1), inner)
        assert first.conv3.out_channels == 4 * inner
        assert first.conv1.stride == first.conv3.stride == (1, 1, 1)  # never stride a 1x1x1
        s = 1 if stage is model.res2 else 2
        assert (spatial.stride, temporal.stride, first.shortcut[0].stride) == ((1, s, s), (s, 1, 1), (s, s, s))


def test_init_is_deterministic_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = (models.build("r2plus1d50_tiny", seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["res2.0.conv1.weight"], sc["res2.0.conv1.weight"])
    assert (a.weights, c.weights) == ("random-init:seed=3", "random-init:seed=4")


def test_weights_round_trip(tmp_path):
    src = models.build("r3d50_tiny", seed=7)
    for m in src.modules():  # non-trivial BN statistics, so they must travel too
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "w" / "r3d50_tiny.pt"
    digest = models.save_weights(src, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    dst = models.build("r3d50_tiny", weights=str(path), seed=0)
    assert dst.weights == digest
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst(x))


def test_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "r2d26_tiny.pt"
    models.save_weights(models.build("r2d26_tiny"), path)
    with pytest.raises(ValueError, match=r"holds 'r2d26_tiny' weights, not 'r3d50_tiny'"):
        models.build("r3d50_tiny", weights=str(path))


def test_wrong_keys_list_missing_and_unexpected(tmp_path):
    state = models.build("r2d26_tiny").state_dict()
    del state["res5.1.conv3.weight"]
    state["res6.0.conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(400, 64)  # a classifier head is dropped, not an error
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        models.build("r2d26_tiny", weights=str(path))
    msg = str(info.value)
    assert str(path) in msg and "1 missing keys [res5.1.conv3.weight]" in msg
    assert "1 unexpected keys [res6.0.conv1.weight]" in msg and "fc.weight" not in msg


def test_long_key_lists_are_truncated_and_shapes_reported(tmp_path):
    state = {f"k{i}": torch.zeros(1) for i in range(50)}
    state["res2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1, 1)
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        models.build("r2d26_tiny", weights=str(path))
    msg = str(info.value)
    assert "50 unexpected keys" in msg and "(44 more)" in msg and "k49" not in msg
    assert "shape mismatches [res2.0.conv1.weight (3, 3, 1, 1, 1) vs (4, 8, 1, 1, 1)]" in msg
    assert len(msg) < 2000


def test_corrupt_missing_and_non_checkpoint_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint") as info:
        models.build("r2d26_tiny", weights=str(bad))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ValueError, match="holds no state dict"):
        models.build("r2d26_tiny", weights=str(listing))
    with pytest.raises(ValueError, match="does not exist"):
        models.build("r2d26_tiny", weights=str(tmp_path / "nope.pth"))


def test_short_clip_is_a_clear_error():
    with pytest.raises(ValueError, match=r"r2d26_tiny expects \(B, 3, L>=8, H, W\)"):
        models.build("r2d26_tiny")(torch.zeros(1, 3, 4, 32, 32))


@pytest.mark.parametrize("name", TV)
def test_torchvision_adapter_equals_torchvision_layer4(name, tmp_path):
    """A plain torchvision state dict file (fc included, as downloaded) gives torchvision's layer4 exactly."""
    from torchvision.models import video

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        ref = getattr(video, name)(weights=None)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(1, 3, 8, 32, 32)
    ref.eval()
    path = tmp_path / f"{name}-torchvision.pth"
    torch.save(ref.state_dict(), path)
    captured = []
    ref.layer4.register_forward_hook(lambda mod, inp, out: captured.append(out))
    model = models.build(name, weights=str(path))
    with torch.no_grad():
        ref(x)
        y = model(x)
    assert torch.equal(y, captured[0])
    assert model.weights == hashlib.sha256(path.read_bytes()).hexdigest()


def test_dataparallel_prefix_is_stripped(tmp_path):
    src = models.build("r2d26_tiny", seed=5)
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    dst = models.build("r2d26_tiny", weights=str(path))
    assert torch.equal(dst.state_dict()["res5.1.conv3.weight"], src.state_dict()["res5.1.conv3.weight"])


def test_torchvision_enum_errors_need_no_network():
    """Naming a weight enum is for online users; the wrong names are refused before any download."""
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'R2Plus1D_18_Weights.NOPE'; expected "
                                         r"R2Plus1D_18_Weights.KINETICS400_V1"):
        models.build("r2plus1d_18", weights="R2Plus1D_18_Weights.NOPE")
    with pytest.raises(ValueError, match=r"weights file 'R3D_18_Weights.KINETICS400_V1' does not exist \(for "
                                         r"r2plus1d_18 you may also name torchvision's R2Plus1D_18_Weights"):
        models.build("r2plus1d_18", weights="R3D_18_Weights.KINETICS400_V1")


def test_torchvision_enum_loads_through_torch_hub(monkeypatch, tmp_path):
    """The enum path, with torch.hub's download replaced by a local state dict (no network here)."""
    import torchvision.models._api as tv_api
    from torchvision.models import video

    ref = video.mc3_18(weights=None).eval()
    calls = []

    def fake_download(url, *args, **kwargs):
        calls.append(url)
        return ref.state_dict()

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached file: provenance names the enum
    model = models.build("mc3_18", weights="MC3_18_Weights.KINETICS400_V1")
    assert calls == [video.MC3_18_Weights.KINETICS400_V1.url]
    assert model.weights == "torchvision:MC3_18_Weights.KINETICS400_V1"
    assert torch.equal(model.state_dict()["layer4.1.conv2.0.weight"], ref.state_dict()["layer4.1.conv2.0.weight"])


@pytest.mark.parametrize("name, conv1, depths, middle", [
    ("r2d26", ((8, 7, 7), (8, 2, 2), 64), (2, 2, 2, 2), (1, 3, 3)),  # Table 1, R2D-26
    ("r3d50", ((3, 7, 7), (1, 2, 2), 64), (3, 4, 6, 3), (3, 3, 3)),  # Table 6, R3D-50
])
def test_r2d26_and_r3d50_layers(name, conv1, depths, middle):
    with torch.device("meta"):
        model = models.get(name)()
    stem = model.conv1[0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == conv1
    stages = (model.res2, model.res3, model.res4, model.res5)
    assert tuple(len(s) for s in stages) == depths
    for i, (stage, inner) in enumerate(zip(stages, (64, 128, 256, 512))):
        conv = stage[0].conv2[0]
        s = 1 if i == 0 else 2
        t = 1 if name == "r2d26" or i == 0 else 2  # R2D strides time only in conv1
        assert (conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels) == (middle, (t, s, s), inner, inner)
        assert stage[0].conv1.stride == stage[0].conv3.stride == (1, 1, 1)
        assert stage[0].shortcut[0].stride == (t, s, s) and stage[-1].conv3.out_channels == 4 * inner


def test_batch_norm_folds_into_the_convolution_before_it_and_nowhere_else():
    from torch import nn

    from faster.extract.runner import fold_batchnorm

    model = models.build("r2plus1d50_tiny").eval()
    for m in model.modules():  # non-trivial statistics, so that a wrong fold shows
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorm(model, 8, 32) == 70
        got = model(x)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    class TwoReaders(nn.Module):  # the conv's output also feeds a second module: must not be folded
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.other(y)

    two = TwoReaders().eval()
    two.bn.running_mean.fill_(1.0)
    with torch.no_grad():
        want = two(x)
        assert fold_batchnorm(two, 8, 32) == 0
        torch.testing.assert_close(two(x), want)
