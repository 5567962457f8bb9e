"""A learned, input-dependent E/C schedule: pattern ``adaptive`` with a budget B (docs/format.md "Patterns").

After LiteEval (Wu et al., NeurIPS 2019; `zxwu/lite_eval` models/lite_eval.py) and AR-Net (Meng et al.,
ECCV 2020; `mengyuest/AR-Net` ops/models_ada.py), on FASTER's aggregators: the cheap backbone runs
on every clip; at clip t a small gate reads the cheap map of clip t (standardised, pooled) and the
aggregator's state o_(t-1) (pooled; zeros at t = 0) and decides whether clip t also gets the
expensive backbone; the aggregator then folds the expensive map if chosen, else the cheap one.

    g_t = W2 ReLU(W1 [pool(c_t); pool(o_(t-1))] + b1) + b2          2 logits: cheap, expensive
    d_t = straight-through Gumbel-softmax(g_t, tau)                   in training: d_t ~ Bernoulli(p_t)
    d_t = [p_t > u_t],  p_t = softmax(g_t)_E   at evaluation and in predict: deterministic, no sampling

where u_t = 1/2, 1/4, 3/4, 1/8, 5/8, ... (the van der Corput sequence from its second term) is a
fixed, evenly spread threshold per clip index in place of training's Gumbel noise: a confident
gate (p near 0 or 1) decides as argmax would, and an unsure one keeps the rate it was trained to
(argmax alone would turn a gate that learned p = 0.25 everywhere into no expensive clip at all).
evaluate and predict decide identically, clip by clip.
    x_t = d_t * e_t + (1 - d_t) * c_t,        o_t = f(o_(t-1), x_t)   (Eq. 1 with the aggregator's f)

Training reads both maps of every clip from the cache (exactly what AR-Net does with all backbones
run and masked), with the loss CE + w (mean_t,b d_t - B)^2 (LiteEval's penalty towards a target
rate; B = the fraction of clips that also get the expensive map) and a temperature decayed
geometrically from 5 to 0.5 over the epochs (AR-Net: 5 exp(-0.045 epoch)). A video costs
N x cheap + #E x expensive + aggregator + N x gate GFLOPs.

Nothing here imports a backbone: the policy is trained and scored on cached features.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faster.aggregate.models import Aggregator
from faster.aggregate.schedule import check_budget
from faster.errors import BadValue

GATE_HIDDEN = 64  # the gate's hidden width: its cost is negligible beside one clip of a backbone
PENALTY = 10.0  # w of the budget term w (mean decision - B)^2 (LiteEval); recorded in the run


def dither(t: int) -> float:
    """u_t: the van der Corput sequence (base 2) from its second term: 1/2, 1/4, 3/4, 1/8, 5/8, ..."""
    k, u, scale = t + 1, 0.0, 0.5
    while k:
        u += scale * (k & 1)
        k >>= 1
        scale /= 2
    return u


def temperature(epoch: int, epochs: int, start: float = 5.0, end: float = 0.5) -> float:
    """Gumbel-softmax temperature of ``epoch`` (1-based): geometric from ``start`` to ``end``."""
    if epochs <= 1:
        return end
    return start * (end / start) ** ((epoch - 1) / (epochs - 1))


class Gate(nn.Module):
    """Two logits (cheap, expensive) from the pooled cheap map of clip t and the pooled state o_(t-1)."""

    def __init__(self, cheap_channels: int, state_channels: int, hidden: int = GATE_HIDDEN, budget: float = 0.5):
        super().__init__()
        self.cheap_channels, self.state_channels = int(cheap_channels), int(state_channels)
        self.fc1 = nn.Linear(self.cheap_channels + self.state_channels, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        with torch.no_grad():  # start at the budget's rate: P(expensive) = B
            self.fc2.bias.copy_(torch.tensor([0.0, math.log(budget / max(1 - budget, 1e-6))]))

    def forward(self, cheap: Tensor, state: Tensor) -> Tensor:
        # cheap: (B, C_cheap), state: (B, C_state) -> (B, 2)
        return self.fc2(F.relu(self.fc1(torch.cat([cheap, state.to(cheap.dtype)], dim=-1))))


class Policy(nn.Module):
    """An aggregator with a gate (see the module docstring). ``aggregator`` must keep a step state
    (``Aggregator.stateful``): avg pooling and TAM do not, and are refused."""

    def __init__(self, aggregator: Aggregator, *, budget: float, hidden: int = GATE_HIDDEN):
        super().__init__()
        if not getattr(aggregator, "stateful", False):
            raise BadValue(f"pattern adaptive needs an aggregator with a step state (fastgru, gru, lstm, concat, "
                           f"netvlad, nextvlad); {type(aggregator).__name__} has none a gate could read")
        if set(aggregator.align) != {"expensive", "cheap"}:
            raise BadValue("pattern adaptive needs both an expensive and a cheap source")
        self.aggregator = aggregator
        self.budget = check_budget(budget)
        cheap_shape = aggregator.kwargs["sources"]["cheap"]  # [C, T', H', W']
        self.gate = Gate(int(cheap_shape[0]), aggregator.state_width(), hidden, self.budget)

    # -- pieces --

    def _cheap_summary(self, c: Tensor) -> Tensor:
        """(B, T', H', W', C) channels last -> (B, C): standardised as the aggregator's input, pooled."""
        align = self.aggregator.align["cheap"]
        return ((c - align.in_mean) / align.in_std).mean(dim=(1, 2, 3))

    def _state_summary(self, h: Any, like: Tensor) -> Tensor:
        if h is None:
            return like.new_zeros((like.shape[0], self.gate.state_channels))
        return self.aggregator.state_vector(h)


    # -- batched (training, evaluation) --

    def forward(self, x: dict[str, Tensor], tau: float | None = None,
                order: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """(logits (B, K), decisions (B, N) in {0, 1}) for whole videos.

        ``x["expensive"]`` and ``x["cheap"]``: (B, N, T', H', W', C) channels last, every clip of both
        backbones. ``tau``: sample straight-through Gumbel-softmax decisions at that temperature
        (training); None: hard argmax decisions (evaluation, predict). ``order``: the clip indices
        in the order they are folded (default 0 .. N-1); decisions stay in clip order.
        """
        _, _, decisions, h = self._run(x, tau, order, want_logits=False, want_state=False)
        return self.aggregator.readout(h, x["cheap"].shape[1]), decisions

    def unroll(self, x: dict[str, Tensor], tau: float | None = None, order: list[int] | None = None,
               want_state: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """(logits after every step (B, N, K) in visit order, state vectors after every step
        (B, N, D) or None, decisions (B, N) in clip order): what an early exit reads."""
        logits, states, decisions, _ = self._run(x, tau, order, want_logits=True, want_state=want_state)
        return logits, states, decisions

    def _run(self, x: dict[str, Tensor], tau: float | None, order: list[int] | None, *, want_logits: bool,
             want_state: bool) -> tuple[Any, Any, Tensor, Any]:
        e, c = x["expensive"], x["cheap"]
        if e.shape[:2] != c.shape[:2]:
            raise BadValue(f"adaptive needs both maps of every clip, got {tuple(e.shape[:2])} expensive and "
                           f"{tuple(c.shape[:2])} cheap")
        n = c.shape[1]
        order = list(range(n)) if order is None else list(order)
        agg = self.aggregator
        h, decisions, logits, states = None, [None] * n, [], []
        for step, t in enumerate(order):
            g = self.gate(self._cheap_summary(c[:, t]), self._state_summary(h, c[:, t, 0, 0, 0]))  # (B, 2)
            # u_t of the step (clips folded so far), as ``decide`` online
            d = (F.gumbel_softmax(g.float(), tau=tau, hard=True)[:, 1] if tau is not None
                 else (torch.softmax(g.float(), dim=-1)[:, 1] > dither(step)).to(c.dtype))  # (B,)
            xe, xc = agg.encode(e[:, t], "expensive"), agg.encode(c[:, t], "cheap")
            w = d.view(-1, *([1] * (xe.dim() - 1))).to(xe.dtype)
            h = agg.fold(h, w * xe + (1 - w) * xc)
            decisions[t] = d
            if want_logits:
                logits.append(agg.readout(h, step + 1))
            if want_state:
                states.append(agg.state_vector(h))
        return (torch.stack(logits, dim=1) if want_logits else None, torch.stack(states, dim=1) if want_state else None,
                torch.stack(decisions, dim=1), h)

    def penalty(self, decisions: Tensor, weight: float) -> Tensor:
        """LiteEval's budget term: weight x (mean decision - B)^2."""
        return weight * (decisions.float().mean() - self.budget) ** 2

    # -- online (predict) --

    def init_state(self, batch_size: int, device: Any = None) -> dict[str, Any]:
        return {"t": 0, "h": None, "batch_size": int(batch_size)}

    def decide(self, state: dict[str, Any], cheap: Tensor) -> bool:
        """Whether the next clip, whose cheap map is ``cheap`` (1, T', H', W', C), gets the expensive backbone."""
        g = self.gate(self._cheap_summary(cheap), self._state_summary(state["h"], cheap[:, 0, 0, 0]))
        return bool(torch.softmax(g.float(), dim=-1)[0, 1] > dither(state["t"]))

    def step(self, state: dict[str, Any], x: Tensor, expensive: bool) -> dict[str, Any]:
        """Fold the clip's chosen map x (1, T', H', W', C_src)."""
        agg = self.aggregator
        h = agg.fold(state["h"], agg.encode(x, "expensive" if expensive else "cheap"))
        return {**state, "t": state["t"] + 1, "h": h}

    def logits(self, state: dict[str, Any]) -> Tensor:
        if state["t"] == 0:
            raise BadValue("no clip has been stepped yet")
        return self.aggregator.readout(state["h"], state["t"])


def gate_gflops(policy: Policy, num_clips: int) -> float:
    """The gate's multiply-adds per video (one decision per clip), GFLOPs."""
    g = policy.gate
    per_clip = (g.cheap_channels + g.state_channels) * g.fc1.out_features + g.fc1.out_features * 2
    return num_clips * per_clip / 1e9


def reference_points(run_dir: Any, schedule: Any, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Two schedules at a policy run's own mean budget, scored on its validation videos with its
    aggregator (the gate replaced): ``random`` (k positions per video drawn at random) and ``oracle``
    (k positions chosen greedily per video to lower that video's loss: it knows the label, an upper
    bound for any gate). k = the run's mean number of expensive clips per video, rounded. Each is
    {"top1", "gflops_per_video", "num_expensive"}; the cost counts the cheap backbone on every clip,
    as the policy's does (without the gate). ``schedule``: the run's (aggregate/schedule.py)."""
    import numpy as np

    from faster.aggregate.data import validation_videos
    from faster.aggregate.run import RESULT, Run
    from faster.store.files import read_json

    run = Run.load(run_dir)
    n = run.num_clips
    k = int(round(float((read_json(Path(run_dir) / RESULT) or {}).get("num_expensive_mean") or 0)))
    k = min(max(k, 0), n)
    fs, idx = validation_videos(run.config)
    agg = run.aggregator()
    ds = fs.dataset(run.sources(), idx)
    rng = np.random.default_rng(seed)
    hits = {"random": 0, "oracle": 0}
    try:
        with torch.no_grad():
            for i in range(len(ds)):
                item = ds[i]
                e = item["expensive"].float()[None]  # (1, n, T', H', W', C)
                c = item["cheap"].float()[None]
                y = int(item["label"])

                def logits(chosen: set[int], e: Tensor = e, c: Tensor = c) -> Tensor:
                    mask = [t in chosen for t in range(n)]
                    x = {}
                    if any(mask):
                        x["expensive"] = e[:, [t for t in range(n) if mask[t]]]
                    if not all(mask):
                        x["cheap"] = c[:, [t for t in range(n) if not mask[t]]]
                    return agg(x, mask)[0]

                drawn = set(rng.choice(n, size=k, replace=False).tolist()) if k else set()
                hits["random"] += int(logits(drawn).argmax()) == y
                chosen: set[int] = set()
                for _ in range(k):  # greedy: the position that lowers this video's loss most
                    best = min((t for t in range(n) if t not in chosen),
                               key=lambda t: float(F.cross_entropy(logits(chosen | {t})[None], torch.tensor([y]))))
                    chosen.add(best)
                hits["oracle"] += int(logits(chosen).argmax()) == y
    finally:
        ds.close()
    per_clip = {"expensive": float(run.models[run.expensive]["gflops_per_clip"]),
                "cheap": float(run.models[run.cheap]["gflops_per_clip"])}
    cost = schedule.video_gflops({**run.gflops, "gate": 0.0}, per_clip, k)
    return {name: {"top1": h / max(len(ds), 1), "gflops_per_video": cost, "num_expensive": k}
            for name, h in hits.items()}
