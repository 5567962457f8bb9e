"""Early exit: stop reading a video once its prediction is sure enough (``--early-exit --exit-budget F``;
the schedule is aggregate/schedule.py's ``EarlyExit``, docs/aggregators.md "Three schedules").

A recurrent aggregator predicts after every clip. Trained with a cross-entropy after every step
(the prediction after t clips is then good for every t), it can stop reading a video at the first
step whose exit score reaches that step's threshold, and must stop after the last clip:

* ``threshold`` (AdaFocusV2+, after MSDNet's budgeted evaluation; no extra training): the score is
  the prediction's confidence, the margin between its two largest logits (a softmax probability
  saturates at 1.0 in float32 and cannot rank sure predictions); one threshold per step, set on
  the training videos so that they leave at the steps of a geometric target distribution
  q_t ~ r^t whose mean is F n clips (:func:`quota_thresholds`): at step t the most confident of
  the videos still reading leave, as many as q_t says.
* ``gate`` (FrameExit, CVPR 2021): a small network reads the prediction (its softmax), the step
  (t / n) and, for an aggregator with a step state, the pooled state, and gives the probability
  g_t of leaving after step t. Trained beside the aggregator on the expected loss of the exit
  distribution it implies, pi_t = g_t prod_(s<t) (1 - g_s), with a penalty towards the budget:

      sum_t pi_t CE_t (CE detached: the gate learns where the prediction is good)
        + w (sum_t pi_t (t + 1) / n - F)^2

  and then one threshold on g, calibrated on the training videos to read F n clips on average
  (:func:`single_threshold`).

Evaluate and predict decide identically, clip by clip: the score after step t depends on the clips
read so far only. Nothing here imports a backbone.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.errors import BadValue

EXIT_HIDDEN = 32  # the exit gate's hidden width
EXIT_PENALTY = 10.0  # w of the gate's budget term


def confidence(logits: Tensor) -> Tensor:
    """(..., K) -> (...): the margin between the two largest logits (0 with one class)."""
    logits = logits.float()
    if logits.shape[-1] < 2:
        return logits.new_zeros(logits.shape[:-1])
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def step_losses(logits: Tensor, y: Tensor) -> Tensor:
    """(B, n): the cross-entropy of the prediction after every step, logits (B, n, K), labels (B,)."""
    B, n, K = logits.shape
    ce = F.cross_entropy(logits.reshape(B * n, K).float(), y.repeat_interleave(n), reduction="none")
    return ce.view(B, n)


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """(B, n) probabilities of leaving after each step, from the gate's logits (the last step always)."""
    g = torch.sigmoid(gate_logits.float())
    g = torch.cat([g[:, :-1], torch.ones_like(g[:, -1:])], dim=1)
    stay = torch.cumprod(1 - g, dim=1)
    before = torch.cat([torch.ones_like(stay[:, :1]), stay[:, :-1]], dim=1)  # still reading at step t
    return g * before


def gate_loss(gate_logits: Tensor, ce: Tensor, budget: float, weight: float = EXIT_PENALTY) -> Tensor:
    """The gate's loss: the expected (detached) cross-entropy at its exit + weight (expected fraction read - F)^2."""
    pi = exit_distribution(gate_logits)  # (B, n)
    n = pi.shape[1]
    read = (pi * torch.arange(1, n + 1, device=pi.device, dtype=pi.dtype)).sum(1).mean() / n
    return (pi * ce.detach()).sum(1).mean() + weight * (read - budget) ** 2


class ExitGate(nn.Module):
    """The probability (a logit) of leaving after a step, from [softmax(prediction); t / n; state]."""

    def __init__(self, num_classes: int, state_width: int, hidden: int = EXIT_HIDDEN):
        super().__init__()
        self.num_classes, self.state_width = int(num_classes), int(state_width)
        self.fc1 = nn.Linear(self.num_classes + 1 + self.state_width, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, logits: Tensor, step: Tensor, state: Tensor | None) -> Tensor:
        # logits (..., K), step (..., 1), state (..., D) or None -> (...,)
        parts = [torch.softmax(logits.float(), dim=-1), step.float()]
        if state is not None:
            parts.append(state.float())
        return self.fc2(F.relu(self.fc1(torch.cat(parts, dim=-1)))).squeeze(-1)

    def gflops(self) -> float:
        """Multiply-adds of one decision, GFLOPs."""
        return (self.fc1.in_features * self.fc1.out_features + self.fc1.out_features) / 1e9


class Exit(nn.Module):
    """The module of an early-exit run: the inner schedule's module (the aggregator, or a policy),
    the thresholds per step (a buffer: +inf until calibrated, so an uncalibrated module reads every
    clip) and, with ``mode`` gate, the exit gate."""

    def __init__(self, inner: nn.Module, aggregator: nn.Module, *, num_clips: int, mode: str = "threshold",
                 hidden: int | None = None):
        super().__init__()
        self.inner = inner
        self.num_clips = int(num_clips)
        self.mode = mode
        thresholds = torch.full((self.num_clips,), math.inf)
        thresholds[-1] = -math.inf  # the last clip always ends the video
        self.register_buffer("thresholds", thresholds)
        self.gate: ExitGate | None = None
        if mode == "gate":
            width = 0
            if getattr(aggregator, "stateful", False):
                was = aggregator.training
                aggregator.eval()  # state_width folds a zero clip: no batch-norm statistics may move
                width = aggregator.state_width()
                aggregator.train(was)
            self.gate = ExitGate(aggregator.num_classes, width, hidden or EXIT_HIDDEN)

    @property
    def needs_state(self) -> bool:
        """Whether the exit reads the aggregator's state after each step (a gate on a stateful aggregator)."""
        return self.gate is not None and self.gate.state_width > 0

    def gate_logits(self, logits: Tensor, states: Tensor | None) -> Tensor:
        """(B, n) the gate's logits after every step; its inputs are detached (the gate does not train
        the aggregator)."""
        B, n, _ = logits.shape
        step = (torch.arange(1, n + 1, device=logits.device, dtype=torch.float32) / self.num_clips)
        step = step.view(1, n, 1).expand(B, n, 1)
        return self.gate(logits.detach(), step, None if states is None else states.detach())

    def scores(self, logits: Tensor, states: Tensor | None) -> Tensor:
        """(B, n) exit scores after every step: confidence, or the gate's probability."""
        if self.gate is None:
            return confidence(logits)
        return torch.sigmoid(self.gate_logits(logits, states).float())

    def exit_steps(self, scores: Tensor) -> Tensor:
        """(B,) the step (in visit order) after which each video is left: the first whose score reaches its threshold."""
        hit = scores.float() >= self.thresholds.to(scores.device)[None, : scores.shape[1]]
        hit[:, -1] = True
        return hit.float().argmax(dim=1)

    def leaves(self, step: int, logits: Tensor, state: Tensor | None) -> bool:
        """Online: whether the video is left after ``step`` (0-based), logits (1, K), state vector (1, D) or None."""
        if step >= self.num_clips - 1:
            return True
        if self.gate is None:
            score = confidence(logits)[0]
        else:
            s = torch.full((1, 1), (step + 1) / self.num_clips, device=logits.device)
            score = torch.sigmoid(self.gate(logits, s, state).float())[0]
        return bool(score >= self.thresholds[step])

    def calibrate(self, scores: np.ndarray, budget: float) -> None:
        """Set the thresholds from the training videos' scores (V, n) to read a fraction ``budget``."""
        f = quota_thresholds if self.gate is None else single_threshold
        self.thresholds.copy_(torch.as_tensor(f(scores, budget), dtype=self.thresholds.dtype))

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "thresholds": [float(t) for t in self.thresholds.cpu()],
                "hidden": None if self.gate is None else self.gate.fc1.out_features,
                "gate": None if self.gate is None else {k: v.detach().cpu() for k, v in self.gate.state_dict().items()}}

    def load_record(self, record: dict[str, Any]) -> None:
        thresholds = torch.tensor([float(t) for t in record["thresholds"]], dtype=self.thresholds.dtype)
        if thresholds.shape != self.thresholds.shape:
            raise BadValue(f"an exit record of {len(thresholds)} thresholds for {self.num_clips} clips")
        self.thresholds.copy_(thresholds)
        if self.gate is not None:
            if not record.get("gate"):
                raise BadValue("an exit-gate run without its gate")
            self.gate.load_state_dict(record["gate"])


# ------------------------------------------------------------------------------------- calibration


def exit_steps(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(V,) the step each video leaves after (numpy twin of ``Exit.exit_steps``)."""
    hit = scores >= np.asarray(thresholds)[None, : scores.shape[1]]
    hit[:, -1] = True
    return hit.argmax(axis=1)


def geometric_target(num_clips: int, budget: float) -> np.ndarray:
    """q (n,): the fraction of videos to leave after each step, q_t ~ r^t, with mean (t + 1) = F n
    (clamped to [1, n]; r found by bisection on log r)."""
    n = int(num_clips)
    target = min(max(budget * n, 1.0), float(n))
    t = np.arange(n)

    def dist(log_r: float) -> np.ndarray:
        w = np.exp(log_r * t - np.max(log_r * t))
        return w / w.sum()

    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((dist(mid) * (t + 1)).sum()) < target:
            lo = mid
        else:
            hi = mid
    return dist((lo + hi) / 2)


def quota_thresholds(scores: np.ndarray, budget: float) -> np.ndarray:
    """Thresholds per step such that the videos of ``scores`` (V, n) leave as the geometric target
    says: at step t, of the videos still reading, the most confident ones, as many as the target's
    cumulative share minus those already gone (each threshold halfway between the last one leaving
    and the next one staying). The last step's is -inf."""
    V, n = scores.shape
    thresholds = np.full(n, np.inf)
    thresholds[-1] = -np.inf
    if not V:
        return thresholds
    cumulative = np.cumsum(geometric_target(n, budget))
    reading = np.ones(V, dtype=bool)
    gone = 0
    for t in range(n - 1):
        want = int(round(cumulative[t] * V)) - gone
        left = np.flatnonzero(reading)
        if want <= 0 or not len(left):
            continue
        s = np.sort(scores[left, t])[::-1]
        want = min(want, len(s))
        thresholds[t] = s[want - 1] if want == len(s) else (s[want - 1] + s[want]) / 2  # ties all leave
        leave = left[scores[left, t] >= thresholds[t]]
        reading[leave] = False
        gone += len(leave)
    return thresholds


def single_threshold(scores: np.ndarray, budget: float) -> np.ndarray:
    """One threshold for every step (the last: -inf) such that the videos of ``scores`` (V, n) read a
    fraction ``budget`` of their clips on average, as near as the scores allow (bisection)."""
    V, n = scores.shape
    out = np.full(n, -np.inf)
    if not V:
        out[:-1] = np.inf
        return out

    def read(th: float) -> float:
        out[:-1] = th
        return float((exit_steps(scores, out) + 1).mean()) / n

    candidates = np.unique(np.concatenate([scores[:, :-1].ravel(), [np.inf]]))
    lo, hi = 0, len(candidates) - 1  # read() grows with the threshold
    while lo < hi:
        mid = (lo + hi) // 2
        if read(candidates[mid]) < budget:
            lo = mid + 1
        else:
            hi = mid
    best = min({lo, max(lo - 1, 0)}, key=lambda i: abs(read(candidates[i]) - budget))
    read(candidates[best])
    return out.copy()


# ------------------------------------------------------------------------------------------- cost


def exit_step_gflops(agg: str, kwargs: dict[str, Any], mode: str) -> dict[str, float]:
    """{"exit_readout": one readout of the aggregator (the prediction after a step), "exit_gate": one
    decision of the exit gate (0 for thresholds)}, GFLOPs, counted on meta tensors and cached."""
    import json

    from faster.macs import cached_count

    key = f"exit|{agg}|{json.dumps(kwargs, sort_keys=True, default=str)}|{mode}"
    return dict(cached_count(key, [__file__], lambda: _count_step(agg, kwargs, mode)))


def _count_step(agg: str, kwargs: dict[str, Any], mode: str) -> dict[str, float]:
    from faster.aggregate.models import build
    from faster.macs import count_macs

    with torch.device("meta"):
        model = build(agg, **kwargs).eval()
        src = "expensive" if "expensive" in kwargs["sources"] else "cheap"
        c, *grid = kwargs["sources"][src]
        with torch.no_grad():
            state = model.fold(None, model.encode(torch.empty((1, *grid, c)), src))
            readout = count_macs(lambda: model.readout(state, 1)) / 1e9
        gate = 0.0
        if mode == "gate":
            width = model.state_vector(state).shape[-1] if getattr(model, "stateful", False) else 0
            gate = ExitGate(model.num_classes, width).gflops()
    return {"exit_readout": float(readout), "exit_gate": float(gate)}
