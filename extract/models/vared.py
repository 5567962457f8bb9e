"""VA-RED² (Pan et al., ICLR 2021) on R(2+1)D-50: a backbone whose cost depends on the clip.

There is no public code; this is built from the paper's formulation (docs/backbones.md "VA-RED²"
says what the paper specifies and what is our choice). Each layer of a residual branch computes
only part of its output, and cheap operations reconstruct the rest:

* **temporal**: the layer's temporal stride S becomes S x R, R = 2^p_t, so only every R-th output
  frame is computed; the missing frames are linear interpolations of their computed neighbours
  (the last one repeats its left neighbour): ``phi_t``, parameter free.
* **channel**: only the first ceil(C / 2^p_c) output channels are computed, with the first filters
  of the full layer (weights shared); the others come from the computed ones through a depthwise
  1x3x3 convolution, missing channel j from computed channel j (``phi_s``, initialised to the
  identity). Then the temporal reconstruction, so phi_s runs on the computed frames only.

A soft modulation gate per stage (res2..res5: global average pool of the stage's input, a linear
layer to max(8, C/4), ReLU, a linear layer to 4 logits) chooses (p_t, p_c) in {0, 1}^2 for every
block of its stage: option 0 full, 1 half the frames, 2 half the channels, 3 both. The four 1x1x1
/ (2+1)D convolutions of each bottleneck are reduced; the stem and the projection shortcuts always
run in full. Each reduced option has its own batch norms (their statistics differ from the full
path's; conv weights are shared); option 0 uses the R(2+1)D-50 ones. The gate's last layer starts
at zero weights and a bias of FULL_BIAS on option 0, so an untrained gate computes everything at
inference (argmax) and 87% of the training clips start on the full path. The gate reads the
stage's input detached: the penalty trains the gates, never the features.

Training (``.train()``): every option of a stage runs on the whole batch and the stage's output is
the straight-through Gumbel-softmax mix (one-hot forward of argmax(logits + noise x Gumbel), the
soft sample's gradient: Jang et al. 2017), so a clip takes one path forward and the gate learns
from all four; ``set_progress`` (train-clip, each epoch) lowers the noise linearly from 1 to 0, so
that training ends on the paths inference takes. ``last_cost`` is then the *expected* GFLOPs per
clip under the gate's softmax (a differentiable (B,) tensor: train-clip's FLOPs penalty,
``flops_weight`` x (mean fraction of ``full_cost`` - target)^2); in eval mode each clip runs only
its argmax option (clips grouped by option) and ``last_cost`` is what each clip cost.
``full_cost`` is the network's cost at full computation for the same input (the fraction's
denominator), ``last_options`` the (B, 4) options chosen.

At option 0 everywhere the network *is* R(2+1)D-50 (same module names and ops): an R(2+1)D-50
checkpoint (ours or any layout :mod:`.layouts` converts into it) initialises it, the VA-RED² keys
it lacks taken from the model's init (gates, phi_s) and the reduced options' batch norms copied
from the full ones; a random init at seed S equals ``r2plus1d50`` at seed S on the shared weights.

Costs are multiply-adds of the convolutions and the gates' linear layers, counted from the shapes
(:meth:`VaRedR2Plus1D.cost_table`; the same formula as torch's flop counter, which the test checks
against faster.macs.count_macs). Interpolation, BN and ReLU are not counted (the paper's
convention). On meta tensors (cost.py's count) every stage runs in full: ``clip_gflops`` of a
VA-RED² name is its full cost, the most a clip can cost.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from faster.errors import BadValue
from faster.extract.models import resnet

OPTIONS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (p_t, p_c) per option: full, half time, half channels, both
OPTION_NAMES = ("full", "half-time", "half-channels", "half-both")
STAGES = ("res2", "res3", "res4", "res5")
DEFAULT_FLOPS_TARGET = 0.6  # train-clip's --flops-target for these backbones
TINY_FLOPS_TARGET = 0.75  # ... and for the tiny variant, whose floor is ~0.68 (vared_r2plus1d50_tiny)
FLOPS_WEIGHT = 20.0  # lambda of the penalty lambda * (mean cost fraction - target)^2
GUMBEL_TAU = 1.0
FULL_BIAS = 3.0  # the gates' initial logit of option 0 (full): softmax 0.87, training starts near R(2+1)D-50
_BRANCH = ("conv1", "conv2s", "conv2t", "conv3")  # the reduced convolutions of a bottleneck


def _out_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def conv_cost(conv: nn.Conv3d, shape: Sequence[int], p_t: int = 0, p_c: int = 0) -> tuple[tuple[int, ...], int]:
    """(output shape (C, T, H, W) after reconstruction, multiply-adds per clip) of ``conv`` on an
    input of ``shape`` (C, T, H, W) at policy (p_t, p_c): the computed part (T / 2^p_t frames,
    ceil(C / 2^p_c) channels) plus the depthwise 1x3x3 phi_s of the missing channels."""
    _, T, H, W = shape
    (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = conv.kernel_size, conv.stride, conv.padding
    C = conv.out_channels
    T_r, Ho, Wo = _out_len(T, kt, st * 2 ** p_t, pt), _out_len(H, kh, sh, ph), _out_len(W, kw, sw, pw)
    keep = _kept(C, p_c)
    macs = keep * T_r * Ho * Wo * (conv.in_channels // conv.groups) * kt * kh * kw + (C - keep) * T_r * Ho * Wo * 9
    return (C, _out_len(T, kt, st, pt), Ho, Wo), macs


def _kept(channels: int, p_c: int) -> int:
    return -(-channels // 2 ** p_c)


def _interpolate_time(y: torch.Tensor, frames: int) -> torch.Tensor:
    """phi_t for R = 2: y (B, C, T_r, H, W) holds output frames 0, 2, 4, ...; frames 1, 3, ... are the
    mean of their neighbours (the last repeats its left one). Returns (B, C, frames, H, W)."""
    nxt = torch.cat([y[:, :, 1:], y[:, :, -1:]], dim=2)
    mid = (y + nxt) * 0.5
    B, C, T, H, W = y.shape
    return torch.stack([y, mid], dim=3).reshape(B, C, 2 * T, H, W)[:, :, :frames]


class _Norms(nn.Module):
    """One reduced option's batch norms of a bottleneck (copies of the full path's at construction)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.bn1 = copy.deepcopy(block.bn1)
        self.bnm = copy.deepcopy(block.conv2[1])
        self.bn2 = copy.deepcopy(block.bn2)
        self.bn3 = copy.deepcopy(block.bn3)


def _cheap(channels: int) -> nn.Conv3d:
    """phi_s of a layer with ``channels`` outputs at p_c = 1: depthwise 1x3x3 from the kept channels
    to the missing ones, initialised to the identity (missing channel j = computed channel j)."""
    miss = channels - _kept(channels, 1)
    conv = nn.Conv3d(miss, miss, (1, 3, 3), padding=(0, 1, 1), groups=miss, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 1, 1] = 1.0
    return conv


class VaRedBottleneck(nn.Module):
    """R(2+1)D-50's bottleneck (its modules, adopted from ``base``) plus phi_s per reduced convolution
    (``cheap``) and the reduced options' batch norms (``norms[option - 1]``)."""

    def __init__(self, base: resnet.Bottleneck):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = base.conv1, base.bn1, base.conv2, base.bn2
        self.conv3, self.bn3, self.relu, self.shortcut = base.conv3, base.bn3, base.relu, base.shortcut
        self.cheap = nn.ModuleDict({name: _cheap(conv.out_channels) for name, conv in zip(_BRANCH, self._convs())})
        self.norms = nn.ModuleList([_Norms(self) for _ in OPTIONS[1:]])

    def _convs(self) -> tuple[nn.Conv3d, ...]:
        return self.conv1, self.conv2[0], self.conv2[3], self.conv3

    def _conv(self, name: str, conv: nn.Conv3d, x: torch.Tensor, p_t: int, p_c: int) -> torch.Tensor:
        """``conv`` at policy (p_t, p_c): the computed part with the shared weights, then phi_s and phi_t."""
        st, sh, sw = conv.stride
        C = conv.out_channels
        keep = _kept(C, p_c)
        weight = conv.weight if keep == C else conv.weight[:keep]
        bias = None if conv.bias is None else conv.bias[:keep]
        y = functional.conv3d(x, weight, bias, (st * 2 ** p_t, sh, sw), conv.padding, conv.dilation, conv.groups)
        if keep < C:
            cheap = self.cheap[name]
            z = functional.conv3d(y[:, :C - keep], cheap.weight, None, 1, (0, 1, 1), 1, C - keep)
            y = torch.cat([y, z], dim=1)
        if p_t:
            y = _interpolate_time(y, _out_len(x.shape[2], conv.kernel_size[0], st, conv.padding[0]))
        return y

    def forward_option(self, x: torch.Tensor, option: int) -> torch.Tensor:
        p_t, p_c = OPTIONS[option]
        n = self if option == 0 else self.norms[option - 1]
        bnm = self.conv2[1] if option == 0 else n.bnm
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(n.bn1(self._conv("conv1", self.conv1, x, p_t, p_c)))
        y = self.relu(bnm(self._conv("conv2s", self.conv2[0], y, p_t, p_c)))
        y = self.relu(n.bn2(self._conv("conv2t", self.conv2[3], y, p_t, p_c)))
        y = n.bn3(self._conv("conv3", self.conv3, y, p_t, p_c))
        return self.relu(y + identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_option(x, 0)

    def cost(self, shape: Sequence[int], option: int) -> tuple[tuple[int, ...], int]:
        """(output shape, multiply-adds per clip) of this block at ``option`` on an input of ``shape``."""
        p_t, p_c = OPTIONS[option]
        macs, s = 0, tuple(shape)
        if self.shortcut is not None:
            macs += conv_cost(self.shortcut[0], shape)[1]
        for conv in self._convs():
            s, m = conv_cost(conv, s, p_t, p_c)
            macs += m
        return s, macs


class Gate(nn.Module):
    """The soft modulation gate of a stage: pool, linear, ReLU, linear to one logit per option."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(8, channels // 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, len(OPTIONS))
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        with torch.no_grad():
            self.fc2.bias[0] = FULL_BIAS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the gate reads the features but does not train them: the FLOPs penalty reaches the gates only
        return self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3, 4)).detach())))  # (B, options)

    def macs(self) -> int:
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


class VaRedR2Plus1D(nn.Module):
    """VA-RED² on an R(2+1)D-50 (module docstring). Maps (B, 3, L, H, W) to res5 (B, C, L/8, H/32, W/32)
    like ``base``, whose modules it adopts; ``force`` (an option index, or None) fixes every stage's
    option (None: the gates choose)."""

    layer = "res5"
    mean = resnet.KINETICS_MEAN
    std = resnet.KINETICS_STD
    spatial_stride = 32
    default_flops_target = DEFAULT_FLOPS_TARGET
    flops_weight = FLOPS_WEIGHT

    def __init__(self, base: resnet.VideoResNet):
        super().__init__()
        self.conv1, self.pool1 = base.conv1, base.pool1
        for name in STAGES:
            self.add_module(name, nn.Sequential(*[VaRedBottleneck(b) for b in getattr(base, name)]))
        self.gates = nn.ModuleDict({name: Gate(getattr(self, name)[0].conv1.in_channels) for name in STAGES})
        self.out_channels, self.temporal_stride, self.min_frames = base.out_channels, base.temporal_stride, base.min_frames
        self.force: int | None = None
        self.tau = GUMBEL_TAU
        self.noise = 1.0  # scale of the Gumbel noise in training (set_progress anneals it to 0)
        self.last_cost: torch.Tensor | None = None  # (B,) GFLOPs per clip of the last forward
        self.full_cost: float | None = None  # GFLOPs per clip at full computation, same input shape
        self.last_options: torch.Tensor | None = None  # (B, 4) option per stage
        self._tables: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._stage_costs: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}  # (shape, device) -> per-stage (options,)

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] (train-clip calls it before each epoch): the Gumbel noise of the
        gates' samples falls linearly from 1 to 0, so that by the end of training each clip takes
        the path inference takes (the argmax), not a random one."""
        self.noise = min(1.0, max(0.0, 1.0 - float(fraction)))

    # --- cost ---------------------------------------------------------------------------------

    def cost_table(self, clip_len: int, size: int | tuple[int, int]) -> dict[str, Any]:
        """Multiply-adds per clip of a (clip_len, H, W) input: ``fixed`` (stem, shortcuts, gates),
        ``stages`` (name -> one figure per option), ``full`` (everything at option 0) and
        ``cheapest`` (option 3 everywhere); all / 1e9 (GFLOPs). Cached per input shape."""
        H, W = (size, size) if isinstance(size, int) else size
        key = (int(clip_len), int(H), int(W))
        if key in self._tables:
            return self._tables[key]
        shape: tuple[int, ...] = (3, *key)
        fixed = 0
        for m in self.conv1:
            if isinstance(m, nn.Conv3d):
                shape, macs = conv_cost(m, shape)
                fixed += macs
        C, T, H, W = shape
        shape = (C, T, _out_len(H, 3, 2, 1), _out_len(W, 3, 2, 1))  # pool1
        stages = {}
        for name in STAGES:
            fixed += self.gates[name].macs()
            per_option = []
            for option in range(len(OPTIONS)):
                s, total = shape, 0
                for block in getattr(self, name):
                    s, macs = block.cost(s, option)
                    total += macs
                per_option.append(total)
            for block in getattr(self, name):  # the shortcuts run in full whatever the option
                if block.shortcut is not None:
                    sc = conv_cost(block.shortcut[0], shape)[1]
                    fixed += sc
                    per_option = [p - sc for p in per_option]
            stages[name] = per_option
            shape = s
        table = {"fixed": fixed / 1e9, "stages": {k: [v / 1e9 for v in vs] for k, vs in stages.items()}}
        table["full"] = table["fixed"] + sum(v[0] for v in table["stages"].values())
        table["cheapest"] = table["fixed"] + sum(v[-1] for v in table["stages"].values())
        self._tables[key] = table
        return table

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L, H, W = x.shape
        if C != 3 or L < self.min_frames:
            raise BadValue(f"{getattr(self, 'name', type(self).__name__)} expects (B, 3, L>={self.min_frames}, H, W), "
                           f"got {tuple(x.shape)}")
        table = self.cost_table(L, (H, W))
        stage_costs = self._stage_cost_tensors(table, (L, H, W), x.device)
        x = self.pool1(self.conv1(x))
        cost = torch.full((B,), table["fixed"], device=x.device, dtype=torch.float32)
        options = []
        for name in STAGES:
            stage, costs = getattr(self, name), stage_costs[name]
            logits = self.gates[name](x).float()  # (B, options)
            if self.training and self.force is None:
                x, expected, chosen = self._train_stage(stage, x, logits, costs)
                cost = cost + expected
            else:
                x, chosen = self._eval_stage(stage, x, logits)
                cost = cost + costs[chosen]
            options.append(chosen)
        self.last_cost = cost
        self.full_cost = table["full"]
        self.last_options = torch.stack(options, dim=1)
        return x

    def _stage_cost_tensors(self, table: dict[str, Any], shape: tuple[int, ...], device: torch.device):
        """``table``'s per-option stage costs as float32 tensors on ``device``, made once per input
        shape and device (a forward on CUDA would otherwise copy four small lists to it)."""
        key = (*shape, str(device))
        if key not in self._stage_costs:
            self._stage_costs[key] = {name: torch.tensor(v, dtype=torch.float32, device=device)
                                      for name, v in table["stages"].items()}
        return self._stage_costs[key]

    def _train_stage(self, stage: nn.Sequential, x: torch.Tensor, logits: torch.Tensor, costs: torch.Tensor):
        """Every option on the whole batch, mixed by a straight-through Gumbel-softmax sample."""
        u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
        soft = torch.softmax((logits - self.noise * torch.log(-torch.log(u))) / self.tau, dim=1)
        hard = torch.nn.functional.one_hot(soft.argmax(dim=1), len(OPTIONS)).to(soft.dtype)
        hard = hard - soft.detach() + soft  # (B, options): one-hot forward, the soft sample's gradient
        out = None
        for option in range(len(OPTIONS)):
            y = x
            for block in stage:
                y = block.forward_option(y, option)
            term = hard[:, option].to(y.dtype).view(-1, 1, 1, 1, 1) * y
            out = term if out is None else out + term
        expected = torch.softmax(logits, dim=1) @ costs.to(logits.dtype)
        return out, expected, hard.argmax(dim=1)

    def _eval_stage(self, stage: nn.Sequential, x: torch.Tensor, logits: torch.Tensor):
        """Each clip through its own option only (``force``, else the gate's argmax; on meta tensors, full)."""
        B = x.shape[0]
        if self.force is not None or x.is_meta:
            option = 0 if self.force is None else int(self.force)
            chosen = torch.full((B,), option, device=x.device, dtype=torch.long)
            present = [option]
        else:
            chosen = logits.argmax(dim=1)
            present = torch.unique(chosen).tolist()
        if len(present) == 1:
            y = x
            for block in stage:
                y = block.forward_option(y, present[0])
            return y, chosen
        order, parts = [], []
        for option in present:
            idx = torch.nonzero(chosen == option).squeeze(1)
            y = x.index_select(0, idx)
            for block in stage:
                y = block.forward_option(y, option)
            order.append(idx)
            parts.append(y)
        order_t, ys = torch.cat(order), torch.cat(parts)
        out = torch.empty_like(ys)
        out[order_t] = ys
        return out, chosen

    # --- weights ------------------------------------------------------------------------------

    def complete_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` as read from a file (weights.load_weights calls this): a VA-RED² checkpoint as it is,
        an R(2+1)D-50 one of the same widths completed with the VA-RED² keys it lacks (see the module
        docstring)."""
        own = self.state_dict()
        extra = [k for k in own if _is_vared_key(k)]
        if not extra or any(k in state for k in extra):
            return state
        state = dict(state)
        for key in extra:
            state[key] = _base_value(key, state, own)
        return state


def _is_vared_key(key: str) -> bool:
    return key.startswith("gates.") or ".cheap." in key or ".norms." in key


def _base_value(key: str, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> torch.Tensor:
    """A VA-RED² key missing from an R(2+1)D-50 file: a reduced option's batch norm from the file's full
    one (``res2.0.norms.1.bnm.weight`` <- ``res2.0.conv2.1.weight``), anything else the model's own."""
    if ".norms." in key:
        head, tail = key.split(".norms.", 1)
        _, bn, param = tail.split(".", 2)
        src = f"{head}.{'conv2.1' if bn == 'bnm' else bn}.{param}"
        if src in state:
            return state[src].clone()
    return own[key].clone()


def _vared(base: resnet.VideoResNet) -> VaRedR2Plus1D:
    return VaRedR2Plus1D(base)


def vared_r2plus1d50() -> VaRedR2Plus1D:
    """VA-RED² on R(2+1)D-50 (Table 1's widths): 30.0 GFLOPs per 8 x 224 clip at full computation."""
    return _vared(resnet.r2plus1d50())


def vared_r2plus1d50_tiny() -> VaRedR2Plus1D:
    """VA-RED² on R(2+1)D-50 tiny's widths (res5: 64 channels), for tests and the demo. Its stem and
    shortcuts (always full) are a larger share of its cost: at 8 x 32 it cannot go below 0.68 of the
    full network, so its default target is 0.75 (trained here: val video@1 as R(2+1)D-50 tiny's at
    0.72-0.82 of its GFLOPs, BENCHMARKS.md)."""
    model = _vared(resnet.r2plus1d50_tiny())
    model.default_flops_target = TINY_FLOPS_TARGET
    return model
