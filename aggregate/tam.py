"""TAM: depthwise temporal aggregation across neighbouring clips (bLVNet-TAM, Fan et al., NeurIPS
2019, Sec. 3.2; github.com/IBM/bLVNet-TAM, core/models/blvnet_tam_backbone.py, class TAM).

Adapted to cached clip features: bLVNet's "frames" are segments spanning the video, i.e. our N
clips, and the module runs once, on the res5 clip maps (from the expensive or the cheap backbone
by the E:C pattern, aligned as the base class does), instead of inside every residual stage.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.aggregate import register
from faster.aggregate.models import Aggregator

State = dict[str, Any]


@register("tam")
class TAM(Aggregator):
    """Temporal aggregation over r = 3 neighbouring clips, per channel, then a linear readout:

        y_t    = ReLU(w_-1 * x_(t-1) + w_0 * x_t + w_+1 * x_(t+1))    (x_(-1) = x_N = 0; * per channel)
        logits = W dropout(mean over clips t and positions of y_t) + b

    at every map position, with 3C weights (the reference's prev/curr/next depthwise 1x1 convolutions
    have no bias), initialised to the identity (w_0 = 1, w_+-1 = 0). Multiply-adds per video:
    3 N C T' H' W' (a depthwise convolution of kernel 3 over the clips) + C Y for the readout.

    Online: y_t needs x_(t+1), so ``step`` keeps the last two clips and the sum of the finished
    y_0 .. y_(t-1); the prediction after clip t treats the unseen future as the zero padding of the
    video's end, i.e. it is exactly the batched forward of the video cut after clip t. The batched
    forward of the whole video therefore equals the prediction after its last step, not the ones
    before (those change once the next clip arrives).
    """

    pooled = False
    stateful = False  # its step keeps the clips seen so far, not a recurrent state a gate could read

    def __init__(self, *, num_classes: int, sources: dict[str, Sequence[int]], dropout: float = 0.5):
        super().__init__(num_classes=num_classes, sources=sources, dropout=dropout)
        C = self.width
        self.tam = nn.Conv1d(C, C, kernel_size=3, padding=1, groups=C, bias=False)  # weight (C, 1, 3)
        with torch.no_grad():
            self.tam.weight.zero_()
            self.tam.weight[:, 0, 1] = 1.0  # identity: w_0 = 1, w_-1 = w_+1 = 0
        self.fc = nn.Linear(C, num_classes)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        w = self.tam.weight[:, 0]  # (C, 3): cross-correlation, so column j multiplies x_(t+j-1)
        return w[:, 0], w[:, 1], w[:, 2]

    def _run(self, seq: Tensor) -> State:
        B, N, T, H, W, C = seq.shape
        x = seq.permute(0, 2, 3, 4, 5, 1).reshape(B * T * H * W, C, N)  # (B*T'*H'*W', C, N): clips last
        y = F.relu(self.tam(x))  # (B*T'*H'*W', C, N), zero padding at both ends
        pooled = y.view(B, T * H * W, C, N).mean(dim=1).sum(dim=-1)  # (B, C): sum over clips of the map means
        return {"sum": pooled, "prev": None, "cur": None}

    def _start(self, x0: Tensor) -> State:
        return {"sum": x0.new_zeros((x0.shape[0], x0.shape[-1])), "prev": None, "cur": x0}  # x0: (B, T', H', W', C)

    def _update(self, state: State, x: Tensor) -> State:
        w_prev, w_cur, w_next = self._weights()
        y = w_cur * state["cur"] + w_next * x  # y_(t-1) is now final: (B, T', H', W', C)
        if state["prev"] is not None:
            y = y + w_prev * state["prev"]
        done = state["sum"] + F.relu(y).mean(dim=(1, 2, 3))  # (B, C)
        return {"sum": done, "prev": state["cur"], "cur": x}

    def _readout(self, state: State, num_seen: int) -> Tensor:
        total = state["sum"]
        if state["cur"] is not None:  # the last clip seen, its successor the zero padding
            w_prev, w_cur, _ = self._weights()
            y = w_cur * state["cur"]
            if state["prev"] is not None:
                y = y + w_prev * state["prev"]
            total = total + F.relu(y).mean(dim=(1, 2, 3))
        return self.fc(self.dropout(total / num_seen))  # (B, Y)
