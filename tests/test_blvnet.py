"""bLVNet-TAM as a clip backbone (blvnet_tam50, blvnet_tam101) against an independent reference.

The reference below is a second, compact implementation that follows the module structure and
parameter names of the public code (IBM/bLVNet-TAM, core/models/blvnet_tam_backbone.py and
blvnet_tam.py): frames batched as (N * T, 3, H, W), every fused map copied into both slots of its
pair and the big / little frames gathered by index lists, TAM as shifted, stacked and summed
depthwise convolutions, the backbone under ``baseline_model`` and the classifier ``new_fc``. Its
state dict is saved in the published layout and loaded into ours through the normal weights path.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from faster.errors import BadValue
from faster.extract import models
from faster.extract.models import layouts

DEPTHS = {"blvnet_tam50": (3, 4, 6, 3), "blvnet_tam101": (4, 8, 18, 3)}
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # full-width networks on tiny inputs: weight-bound


# --- the reference, in the public code's structure and names --------------------------------------

class RefTAM(nn.Module):
    def __init__(self, duration: int, channels: int) -> None:
        super().__init__()
        self.prev = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.next = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.curr = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.duration = duration

    def forward(self, x):
        shape = (-1, self.duration) + tuple(x.shape[1:])
        prev_x, curr_x, next_x = self.prev(x).view(shape), self.curr(x).view(shape), self.next(x).view(shape)
        prev_x = F.pad(prev_x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
        next_x = F.pad(next_x, (0, 0, 0, 0, 0, 0, 0, 1))[:, 1:]
        out = torch.relu(torch.stack([prev_x, curr_x, next_x], dim=0).sum(dim=0))
        return out.view((-1,) + tuple(out.shape[2:]))


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None, last_relu=True, tam_frames=0):
        super().__init__()
        width = planes // 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.last_relu = last_relu
        self.tam = RefTAM(tam_frames, inplanes) if tam_frames else None

    def forward(self, x):
        residual = x
        if self.tam is not None:
            x = self.tam(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return torch.relu(out) if self.last_relu else out


def ref_make_layer(inplanes, planes, blocks, stride=1, last_relu=True, tam_frames=0):
    downsample = []
    if stride != 1:
        downsample.append(nn.AvgPool2d(3, stride=2, padding=1))
    if inplanes != planes:
        downsample += [nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)]
    downsample = nn.Sequential(*downsample) if downsample else None
    if blocks == 1:
        return nn.Sequential(RefBottleneck(inplanes, planes, stride, downsample, tam_frames=tam_frames))
    layers = [RefBottleneck(inplanes, planes, stride, downsample, tam_frames=tam_frames)]
    for i in range(1, blocks):
        layers.append(RefBottleneck(planes, planes, last_relu=last_relu if i == blocks - 1 else True,
                                    tam_frames=tam_frames))
    return nn.Sequential(*layers)


def duplicate(x, n):
    """Each row into two consecutive slots of n rows, as the public code hands a pair's map on."""
    out = x.new_zeros((n,) + tuple(x.shape[1:]))
    out[0::2] = x
    out[1::2] = x
    return out


class RefBLModule(nn.Module):
    def __init__(self, in_channels, out_channels, blocks, alpha, beta, stride, num_frames):
        super().__init__()
        self.big = ref_make_layer(in_channels, out_channels, blocks - 1, 2, last_relu=False)
        self.little = ref_make_layer(in_channels, out_channels // alpha, max(1, blocks // beta - 1))
        self.little_e = nn.Sequential(nn.Conv2d(out_channels // alpha, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.fusion = ref_make_layer(out_channels, out_channels, 1, stride=stride)
        self.tam = RefTAM(num_frames, in_channels)

    def forward(self, x, big_list, little_list):
        n = x.shape[0]
        x = self.tam(x)
        big = self.big(x[big_list])
        little = self.little_e(self.little(x[little_list]))
        big = F.interpolate(big, little.shape[2:])
        return duplicate(self.fusion(torch.relu(big + little)), n)


class RefBackbone(nn.Module):
    def __init__(self, layers, num_frames, alpha=2, beta=4, fc_classes=0):
        super().__init__()
        self.num_frames = num_frames
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.b_conv0 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn_b0 = nn.BatchNorm2d(64)
        self.l_conv0 = nn.Conv2d(64, 64 // alpha, 3, stride=1, padding=1, bias=False)
        self.bn_l0 = nn.BatchNorm2d(64 // alpha)
        self.l_conv1 = nn.Conv2d(64 // alpha, 64 // alpha, 3, stride=2, padding=1, bias=False)
        self.bn_l1 = nn.BatchNorm2d(64 // alpha)
        self.l_conv2 = nn.Conv2d(64 // alpha, 64, 1, bias=False)
        self.bn_l2 = nn.BatchNorm2d(64)
        self.bl_init = nn.Conv2d(64, 64, 1, bias=False)
        self.bn_bl_init = nn.BatchNorm2d(64)
        self.tam = RefTAM(num_frames, 64)
        self.layer1 = RefBLModule(64, 256, layers[0], alpha, beta, 2, num_frames)
        self.layer2 = RefBLModule(256, 512, layers[1], alpha, beta, 2, num_frames)
        self.layer3 = RefBLModule(512, 1024, layers[2], alpha, beta, 1, num_frames)
        self.layer4 = ref_make_layer(1024, 2048, layers[3], stride=2, tam_frames=num_frames // 2)
        self.fc = nn.Linear(2048, fc_classes) if fc_classes else nn.Dropout(0.5)  # dropout > 0: the head is new_fc

    def layer4_map(self, x):
        """(N * T, 3, H, W) -> layer4 of the big-branch slots, (N * T/2, 2048, H/32, W/32)."""
        x = torch.relu(self.bn1(self.conv1(x)))
        n = x.shape[0]
        big_list = [k for k in range(n) if k % self.num_frames % 2 == 1]
        little_list = [k for k in range(n) if k % self.num_frames % 2 == 0]
        x = self.tam(x)
        bx = self.bn_b0(self.b_conv0(x[big_list]))
        lx = torch.relu(self.bn_l0(self.l_conv0(x[little_list])))
        lx = torch.relu(self.bn_l1(self.l_conv1(lx)))
        lx = self.bn_l2(self.l_conv2(lx))
        bx = torch.relu(self.bn_bl_init(self.bl_init(torch.relu(bx + lx))))
        x = duplicate(bx, n)
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x, big_list, little_list)
        return self.layer4(x[big_list])


class RefBLVNetTAM(nn.Module):
    """bLVNet_TAM: the backbone as ``baseline_model``, the classifier ``new_fc`` (trained with dropout)."""

    def __init__(self, layers, num_frames, num_classes=7, dropout=True):
        super().__init__()
        self.baseline_model = RefBackbone(layers, num_frames, fc_classes=0 if dropout else num_classes)
        if dropout:
            self.new_fc = nn.Linear(2048, num_classes)


def randomise(net: nn.Module) -> nn.Module:
    """Every weight random (BN statistics and affine too), activations of moderate size throughout."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            if m.groups == m.in_channels and m.kernel_size == (1, 1) and m.groups > 1:  # a TAM's blending weights
                m.weight.data.uniform_(-0.3, 0.8)
            else:
                fan_in = m.weight[0].numel()
                m.weight.data.normal_(0, (1.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


def seeded(fn, seed: int = 5):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ref_layer4(ref: RefBackbone, x: torch.Tensor) -> torch.Tensor:
    """The reference on our clip layout: (B, 3, L, H, W) -> (B, 2048, L/2, H/32, W/32)."""
    B, C, L, H, W = x.shape
    with torch.no_grad():
        y = ref.layer4_map(x.transpose(1, 2).reshape(B * L, C, H, W))
    return y.unflatten(0, (B, L // 2)).transpose(1, 2)


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, wrapped", [("blvnet_tam50", True),
                                           pytest.param("blvnet_tam101", False, marks=pytest.mark.slow)])
def test_released_layout_gives_the_reference_layer4(name, wrapped, tmp_path):
    """A bLVNet_TAM state dict as released (plain; or {"state_dict": ...} with DataParallel's module.
    prefix) loads key for key; the layer4 maps agree within 1e-4 (fp32, CPU)."""
    L = 4
    ref = seeded(lambda: randomise(RefBLVNetTAM(DEPTHS[name], L, dropout=wrapped)))
    state = ref.state_dict()
    assert any(k.startswith("new_fc." if wrapped else "baseline_model.fc.") for k in state)
    if wrapped:
        state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 50}
    path = tmp_path / f"st2stv2-bLVNet-TAM-{name[10:]}-a2-b4-f{L // 2}x2.pth.tar"
    torch.save(state, path)
    model = models.build(name, weights=str(path))
    assert model.weights == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.weights_layout == "blvnet-tam"
    x = seeded(lambda: torch.randn(2, 3, L, 64, 64))  # (B, 3, L, H, W)
    with torch.no_grad():
        y = model(x)
    want = ref_layer4(ref.baseline_model, x)
    assert y.shape == want.shape == (2, 2048, L // 2, 2, 2)
    assert rel_diff(y, want) <= 1e-4
    # extraction lays every backbone out channels_last_3d: this 2D network takes it as channels_last
    model = model.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        z = model(x.contiguous(memory_format=torch.channels_last_3d))
    assert z.is_contiguous(memory_format=torch.channels_last_3d) and rel_diff(z, want) <= 1e-4


def test_identity_tam_is_the_network_without_tam_and_imagenet_blresnet_loads(tmp_path):
    """With every TAM at curr = 1, prev = next = 0 the network equals the same network without TAMs;
    an ImageNet bLResNet file ({"state_dict": {"module.*"}} with its fc) loads with exactly those TAMs."""
    from faster.extract.models.blvnet import DEPTHS as OUR_DEPTHS, BLVNetTAM

    plain = seeded(lambda: randomise(BLVNetTAM(OUR_DEPTHS[50], tam=False)))
    state = plain.state_dict()
    assert not any("tam" in k for k in state)
    imagenet = {"module." + k: v for k, v in state.items()}
    imagenet.update({"module.fc.weight": torch.zeros(1000, 2048), "module.fc.bias": torch.zeros(1000)})
    path = tmp_path / "ImageNet-bLResNet-50-a2-b4.pth.tar"
    torch.save({"epoch": 90, "arch": "blresnet50", "state_dict": imagenet}, path)
    model = models.build("blvnet_tam50", weights=str(path))
    assert model.weights_layout == "blresnet"
    tams = {k: v for k, v in model.state_dict().items() if ".tam." in "." + k}
    assert len(tams) == 3 * (1 + 3 + 3)  # stem, layer1..3, layer4's three blocks: prev, curr, next each
    assert all(torch.equal(v, torch.ones_like(v) if ".curr." in k else torch.zeros_like(v)) for k, v in tams.items())
    x = seeded(lambda: torch.randn(1, 3, 4, 64, 64))
    with torch.no_grad():
        y, want = model(x), plain(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        for m in model.modules():  # other TAM weights change the map
            if type(m).__name__ == "TAM":
                m.prev.weight.fill_(0.25)
        assert rel_diff(model(x), want) > 1e-2


def test_clip_layout_errors_and_checkpoint_round_trip(tmp_path):
    model = seeded(lambda: randomise(models.build("blvnet_tam50")))
    assert (model.layer, model.out_channels, model.temporal_stride, model.spatial_stride) == ("layer4", 2048, 2, 32)
    assert (model.mean, model.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for bad in ((1, 3, 3, 64, 64), (1, 1, 4, 64, 64)):  # an odd frame count, one channel
        with pytest.raises(BadValue, match="L even"):
            model(torch.zeros(bad))
    path = tmp_path / "ours.pt"
    models.save_weights(model, path)
    again = models.build("blvnet_tam50", weights=str(path))
    assert again.weights_layout == "blvnet-tam-backbone"
    x = seeded(lambda: torch.randn(1, 3, 2, 64, 64))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    again.train()(x).square().mean().backward()  # train-clip trains it: every weight, the TAMs' too, gets a gradient
    assert all(p.grad is not None for p in again.parameters()) and float(again.tam.prev.weight.grad.abs().sum()) > 0


def test_layouts_of_blvnet_files_are_detected_from_keys():
    t4 = torch.zeros(1, 1, 1, 1)
    assert layouts.layout_of({"baseline_model.conv1.weight": t4, "new_fc.weight": t4}) == "blvnet-tam"
    assert layouts.layout_of({"conv1.weight": t4, "b_conv0.weight": t4, "layer1.0.conv1.weight": t4}) == "blresnet"
    assert layouts.layout_of({"conv1.weight": t4, "b_conv0.weight": t4, "tam.curr.weight": t4}) == \
        "blvnet-tam-backbone"
    assert layouts.unwrap_pytorchvideo({"state_dict": {"a": t4}, "epoch": 1}) == {"a": t4}
    from faster.extract.models.cost import build_on_meta

    assert layouts.layout_of(build_on_meta(models.get("blvnet_tam101")).state_dict()) == "blvnet-tam-backbone"


def test_gflops_match_the_public_code():
    """23.8 GFLOPs for bLVNet-TAM-50 at 16 x 224 (multiply-adds, our count of the public code, which
    runs layer1..3's TAMs on both copies of each fused map); layer4 is L/2 x 7 x 7."""
    from faster.extract.models.cost import build_on_meta
    from faster.macs import count_macs

    assert models.clip_gflops("blvnet_tam50", 16, 224) == pytest.approx(23.8, rel=0.01)
    assert models.feature_shape("blvnet_tam50", 16, 224) == (2048, 8, 7, 7)
    assert models.feature_shape("blvnet_tam101", 8, 112) == (2048, 4, 4, 4)
    for name in DEPTHS:
        ref = build_on_meta(lambda name=name: RefBackbone(DEPTHS[name], 16)).eval()
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.forward = lambda x: x
        public = count_macs(ref.layer4_map, torch.empty(16, 3, 224, 224, device="meta")) / 1e9
        assert models.clip_gflops(name, 16, 224) == pytest.approx(public, rel=0.001)
