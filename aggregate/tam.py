"""TAM: a light temporal head whose residual blocks start with a temporal aggregation module across
neighbouring clips (bLVNet-TAM, Fan et al., NeurIPS 2019, Sec. 3.2; github.com/IBM/bLVNet-TAM,
core/models/blvnet_tam_backbone.py, class TAM).

Adapted to cached clip features: bLVNet's "frames" are segments spanning the video, i.e. our N
clips, and the TAMs run in a small head on the cached res5 clip maps (each pooled over its T' steps,
from the expensive or the cheap backbone by the E:C pattern, aligned as the base class does)
instead of inside every residual stage of the backbone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.aggregate import register
from faster.aggregate.models import Aggregator, Conv1x1x1
from faster.errors import BadValue

State = dict[str, Any]


class TemporalAggregation(nn.Module):
    """y_t = ReLU(w_-1 * x_(t-1) + w_0 * x_t + w_+1 * x_(t+1)) per channel over the clip axis, zero
    padding at both ends; 3D weights (the reference's prev/curr/next depthwise 1x1 convolutions,
    no bias), initialised to the identity (w_0 = 1, w_+-1 = 0)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width, bias=False)  # weight (D, 1, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 1] = 1.0  # cross-correlation: column j multiplies x_(t+j-1)

    def forward(self, x: Tensor) -> Tensor:
        B, N, H, W, D = x.shape
        z = x.permute(0, 2, 3, 4, 1).reshape(B * H * W, D, N)  # (B*H'*W', D, N): Conv1d's layout, clips last
        y = F.relu(self.conv(z))
        return y.view(B, H, W, D, N).permute(0, 4, 1, 2, 3)  # (B, N, H', W', D)


class _BN(nn.BatchNorm1d):
    """BatchNorm over every leading position of a channels-last tensor (the statistics of BatchNorm3d)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


class TAMBlock(nn.Module):
    """A residual block whose first op is a TAM: x -> ReLU(x + BN(W_2 ReLU(BN(W_1 TAM(x))))), W_1,
    W_2 1x1 convolutions (D -> D) at every map position of every clip."""

    def __init__(self, width: int):
        super().__init__()
        self.tam = TemporalAggregation(width)
        self.conv1 = Conv1x1x1(width, width, bias=False)
        self.bn1 = _BN(width)
        self.conv2 = Conv1x1x1(width, width, bias=False)
        self.bn2 = _BN(width)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, N, H', W', D)
        y = F.relu(self.bn1(self.conv1(self.tam(x))))
        return F.relu(x + self.bn2(self.conv2(y)))


@register("tam")
class TAM(Aggregator):
    """The TAM head over the clip sequence:

        z_t    = ReLU(BN(P mean_T'(x_t)))                     (1x1 projection C -> D = 512, per clip)
        z^l    = TAMBlock_l(z^(l-1)),  l = 1, 2               (neighbouring clips t-1, t, t+1; zero padding)
        logits = W dropout(mean over clips t and positions of z^2_t) + b

    Multiply-adds per video, N clips of H' x W' positions, Y classes:
    N H'W' C D (projection) + L (3 N H'W' D (TAM) + 2 N H'W' D^2 (W_1, W_2)) + D Y, L = 2 blocks;
    at the defaults on 8 clips x 4 x 7 x 7 x 2048 and 400 classes: 0.823 GFLOPs.

    Online: z^2_t needs the clips up to t + 2. ``step`` keeps the last 2L embedded clips and the sum
    of the finished z^L_0 .. z^L_(t-L) (pooled); the prediction after clip t takes the unseen clips
    as the zero padding of the video's end, i.e. it is exactly the batched forward of the video cut
    after clip t, and after the last step it is the forward of the whole video (the earlier ones
    change once the next clips arrive).
    """

    pooled = False
    stateful = False  # its step keeps the last clips seen, not a recurrent state a policy's gate could read

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5,
                 dim: int = 512, blocks: int = 2):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        for name, value in (("dim", dim), ("blocks", blocks)):
            if not isinstance(value, int) or value < 1:
                raise BadValue(f"{name} must be a positive integer, got {value!r}")
        self.kwargs.update(dim=int(dim), blocks=int(blocks))
        D = int(dim)
        self.dim = D
        self.proj = Conv1x1x1(self.width, D, bias=False)
        self.proj_bn = _BN(D)
        self.blocks = nn.ModuleList(TAMBlock(D) for _ in range(int(blocks)))
        self.fc = nn.Linear(D, num_classes)

    def embed(self, x: Tensor, source: str) -> Tensor:
        """z_t: (M, T', H', W', C) aligned clips -> (M, H', W', D)."""
        return F.relu(self.proj_bn(self.proj(x.mean(dim=1))))  # (M, H', W', D)

    def _head(self, seq: Tensor) -> Tensor:
        for block in self.blocks:
            seq = block(seq)
        return seq  # (B, n, H', W', D)

    def fold_sequence(self, seq: Tensor) -> State:
        y = self._head(seq)  # seq: (B, N, H', W', D)
        return {"sum": y.mean(dim=(2, 3)).sum(dim=1), "buf": [], "n": seq.shape[1], "done": seq.shape[1]}

    # the state: "sum" (B, D) of the pooled finished outputs z^L_0 .. z^L_(done-1), "buf" the last
    # clips z_t (at most 2L + 1), "n" clips seen
    def start(self, x0: Tensor) -> State:
        return self.update({"sum": x0.new_zeros((x0.shape[0], self.dim)), "buf": [], "n": 0, "done": 0}, x0)

    def update(self, state: State, x: Tensor) -> State:
        L = len(self.blocks)
        buf, n = [*state["buf"], x][-(2 * L + 1):], state["n"] + 1
        total, done = state["sum"], state["done"]
        p = n - 1 - L  # z^L_p needs the clips p - L .. p + L, all seen now
        if p >= 0:
            y = self._head(torch.stack(buf, dim=1))  # (B, len(buf), H', W', D): correct at p
            total = total + y[:, p - (n - len(buf))].mean(dim=(1, 2))
            done = p + 1
        return {"sum": total, "buf": buf[-2 * L:], "n": n, "done": done}

    def state_vector(self, h: State) -> Tensor:
        """(B, D): the mean over the clips seen and the positions of z^L, the video cut here
        (what dropout and fc read)."""
        total = h["sum"]
        if h["done"] < h["n"]:  # the last clips' outputs, the unseen future as zero padding
            y = self._head(torch.stack(h["buf"], dim=1))  # window: starts >= L clips before "done", or at 0
            total = total + y[:, h["done"] - (h["n"] - len(h["buf"])):].mean(dim=(2, 3)).sum(dim=1)
        return total / h["n"]

    def readout(self, state: State, num_seen: int) -> Tensor:
        return self.fc(self.dropout(self.state_vector(state)))  # (B, Y)
