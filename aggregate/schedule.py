"""Schedules: which backbone runs at which clip, in which order the clips are visited, what a video
costs, and when a video stops.

One interface, used by fit, evaluate, ablate, predict and ``faster flops``; nothing outside this
module branches on the kind of schedule. Three implementations:

* :class:`FixedPattern` (``all-e``, ``all-c``, ``first``, ``1:N``; paper Tables 3 and 4, the masks
  in aggregate/patterns.py): the same expensive/cheap choice for every video.
* :class:`LearnedPolicy` (``adaptive`` with a budget B; aggregate/policy.py, after LiteEval and
  AR-Net): the cheap backbone runs on every clip and a small gate decides per video and clip
  whether the expensive one runs too.
* :class:`EarlyExit` (``--early-exit --exit-budget F``; aggregate/exit.py, after FrameExit and
  AdaFocusV2+): wraps either of them and stops reading a video once its prediction is sure enough
  (a confidence threshold per step, calibrated on the training set to read a fraction F of the
  clips on average, or a learned gate).

Every schedule visits the run's clips in an **order** (:data:`ORDERS`): ``temporal`` (clip 0, 1,
2, ...: a stream) or ``coarse-to-fine`` (clip 0, n/2, n/4, 3n/4, n/8, ...: FrameExit's order, so a
video left early is still covered end to end). The aggregator folds the clips in that order; the
order is part of the run. The default is coarse-to-fine with an early exit, temporal otherwise.

A schedule is made by :func:`create` from the pattern name, the number of clips n a run uses, (for
the policy) its budget, the order and (for an exit) the exit budget, or by :func:`from_run` from a
fitted run. It says

* what to read: ``sources(positions, expensive, cheap)`` (source -> (model, clip positions));
* what to train: ``wrap(aggregator)`` (the aggregator itself, or with its gates), ``loss(module,
  x, y, tau)`` (the training loss: cross-entropy + ``penalty``; an exit: at every step),
  ``forward(module, x, tau)`` -> (logits, decisions), ``unroll`` (the prediction after every
  step), ``temperature``, ``calibrate`` (after training: an exit's thresholds);
* what a video costs: ``costs(agg, kwargs, per_clip)`` (the run's record) and ``video_gflops``
  (only the clips read count); ``backbone_runs(decisions)`` which clips each backbone ran on
  (for a backbone whose cost depends on the clip, VA-RED²: Run.videos_gflops adds each clip's own
  figure in place of the header's);
* how it runs online: ``steps(module, features, batch_size)`` (predict), which runs each backbone
  only on the clips the schedule gives it, in the schedule's order, and stops where it exits;
* what to record: ``record(module)`` (the run's gates and thresholds) and ``report(decisions)``
  per video.

Decisions are per clip of the run (in clip order, not visit order): 1 where the expensive map was
folded, 0 where the cheap one was, -1 where the clip was never read (after an exit).

Maps are channels-last everywhere, (B, n, T', H', W', C) as stored on disk.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from faster.aggregate import patterns
from faster.errors import BadValue

ADAPTIVE = "adaptive"  # the learned policy's pattern name; it needs a budget
HELP = "all-e, all-c, first, 1:N (N >= 0; 1:0 is all-e), or adaptive: a learned gate (needs --budget)."
SOURCES = ("expensive", "cheap")
ORDERS = ("temporal", "coarse-to-fine")  # the order a schedule visits the run's clips in
EXITS = ("threshold", "gate")  # how an early exit decides: calibrated confidence thresholds, or a learned gate
EXIT_SUFFIX = "+exit@"  # a grid label's exit part: "all-e+exit@0.5", "adaptive@0.125+exit@0.25"
# a policy's rows in ablate's tables, then the references at its budget (LearnedPolicy.references)
GRID_ROWS = {ADAPTIVE: "Policy", "oracle": "Oracle", "random": "Random"}


# ------------------------------------------------------------------------------------ names, checks


def check_budget(budget: float | None) -> float:
    """B in (0, 1]: the target fraction of clips that also get the expensive backbone."""
    if budget is None:
        raise BadValue("pattern adaptive needs --budget B (the fraction of clips that also get the expensive "
                       "backbone, in (0, 1], e.g. 0.125 for one clip in eight)")
    if not 0 < float(budget) <= 1:
        raise BadValue(f"--budget must be in (0, 1], got {budget}")
    return float(budget)


def check_exit_budget(exit_budget: float | None) -> float:
    """F in (0, 1]: the mean fraction of a video's clips an early-exit run reads."""
    if exit_budget is None:
        raise BadValue("--early-exit needs --exit-budget F (the mean fraction of a video's clips to read, in "
                       "(0, 1], e.g. 0.5)")
    if not 0 < float(exit_budget) <= 1:
        raise BadValue(f"--exit-budget must be in (0, 1], got {exit_budget}")
    return float(exit_budget)


def check_exit(mode: str) -> str:
    if mode not in EXITS:
        raise BadValue(f"unknown --exit {mode!r}; expected one of {', '.join(EXITS)}")
    return mode


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise BadValue(f"unknown --order {order!r}; expected one of {', '.join(ORDERS)}")
    return order


def resolve_order(order: str | None, early_exit: bool) -> str:
    """The order a run uses: the one given, else coarse-to-fine with an early exit and temporal otherwise."""
    if order is None:
        return "coarse-to-fine" if early_exit else "temporal"
    return check_order(order)


def visit_order(order: str, num_clips: int) -> list[int]:
    """The run's clip indices in the order they are visited.

    ``temporal``: 0, 1, ..., n-1. ``coarse-to-fine``: floor(u n) for u = 0, 1/2, 1/4, 3/4, 1/8, 3/8,
    5/8, 7/8, ... (each dyadic level in turn), each index the first time it comes: at n = 8 that is
    0, 4, 2, 6, 1, 3, 5, 7 (FrameExit's order); at n = 6 it is 0, 3, 1, 4, 2, 5."""
    check_order(order)
    n = int(num_clips)
    if n < 1:
        raise BadValue(f"num_clips must be >= 1, got {num_clips}")
    if order == "temporal":
        return list(range(n))
    seen: list[int] = [0]
    found = {0}  # membership in the list itself would make this quadratic in n
    level = 1
    while len(seen) < n:
        for j in range(1, 2 ** level, 2):  # the new points of this level: odd multiples of 1 / 2^level
            k = (j * n) >> level  # floor(j n / 2^level)
            if k not in found:
                found.add(k)
                seen.append(k)
        level += 1
    return seen


def check(pattern: str, budget: float | None = None, num_clips: int | None = None) -> str:
    """Validate a (pattern, budget) pair, and the pattern at ``num_clips`` clips when given; return the pattern."""
    if pattern == ADAPTIVE:
        check_budget(budget)
        if num_clips is not None and num_clips < 1:
            raise BadValue(f"num_clips must be >= 1, got {num_clips}")
        return pattern
    try:
        patterns.check(pattern)
    except BadValue:
        raise BadValue(f"unknown pattern {pattern!r}; expected {HELP}") from None
    if budget is not None:
        raise BadValue(f"--budget {budget} is for --pattern {ADAPTIVE}, not {pattern}")
    if num_clips is not None:
        patterns.expensive_mask(pattern, num_clips)
    return pattern


def is_valid(pattern: str, num_clips: int) -> bool:
    """Whether ``pattern`` can run on ``num_clips`` clips (1:N needs N+1 to divide it)."""
    if pattern == ADAPTIVE:
        return num_clips >= 1
    return patterns.is_valid(pattern, num_clips)


def grid_patterns(names: Sequence[str], budgets: Sequence[float],
                  exit_budgets: Sequence[float] | None = None) -> list[str]:
    """An ablation grid's pattern axis: ``adaptive`` becomes one ``adaptive@B`` per budget, and with
    ``exit_budgets`` every label gets one early-exit cell per exit budget beside it
    (``all-e+exit@0.5``, ``adaptive@0.125+exit@0.5``)."""
    names = list(names)
    if ADAPTIVE in names:
        if not budgets:
            raise BadValue("--pattern adaptive needs --budget B[,B...] (fractions of clips that also get the "
                           "expensive backbone, e.g. 0.0625,0.125,0.25)")
        for b in budgets:
            check_budget(b)
        i = names.index(ADAPTIVE)
        names[i:i + 1] = [grid_label(ADAPTIVE, b) for b in budgets]
    elif budgets:
        raise BadValue(f"--budget is for --pattern {ADAPTIVE}")
    for name in names:
        pattern, budget = split_label(name)
        check(pattern, budget)
    if exit_budgets:
        for f in exit_budgets:
            check_exit_budget(f)
        names = [label for name in names for label in [name, *(grid_label(name, None, f) for f in exit_budgets)]]
    return names


def grid_label(pattern: str, budget: float | None, exit_budget: float | None = None) -> str:
    """A grid cell's pattern label: the pattern, ``adaptive@B`` for a policy, ``...+exit@F`` with an exit."""
    label = pattern if budget is None else f"{pattern}@{budget:g}"
    return label if exit_budget is None else f"{label}{EXIT_SUFFIX}{exit_budget:g}"


def split_exit(label: str) -> tuple[str, float | None]:
    """(label without its exit, exit budget or None): ``all-e+exit@0.5`` -> ("all-e", 0.5)."""
    base, sep, f = label.partition(EXIT_SUFFIX)
    return (base, float(f)) if sep else (label, None)


def split_label(label: str) -> tuple[str, float | None]:
    """(pattern, budget) of a grid label: ``adaptive@0.125`` -> ("adaptive", 0.125) (an exit part is ignored)."""
    name, sep, budget = split_exit(label)[0].partition("@")
    return (name, float(budget)) if sep else (name, None)


FAMILIES = ("fixed", "policy", "exit", "policy + exit")


def family(label: str) -> str | None:
    """The family a grid label belongs to in ablate's plot (one curve each): fixed, policy, exit,
    policy + exit; None for a policy's references (oracle, random: single points)."""
    name, budget = split_label(label)
    exit_budget = split_exit(label)[1]
    if budget is not None and name != ADAPTIVE:
        return None
    base = "fixed" if budget is None else "policy"
    if exit_budget is None:
        return base
    return "exit" if base == "fixed" else "policy + exit"


def _at(values: Sequence[float], s: float) -> float:
    """values[i] is the value after i + 1 clips; the value after ``s`` clips (linear between whole ones)."""
    s = min(max(float(s), 1.0), float(len(values)))
    lo = int(math.floor(s))
    if lo >= len(values):
        return float(values[-1])
    return float(values[lo - 1]) + (s - lo) * (float(values[lo]) - float(values[lo - 1]))


def _code(value: Any) -> int:
    """A decision as 1 (expensive), 0 (cheap) or -1 (never read)."""
    v = float(value)
    return -1 if v < -0.5 else int(v > 0.5)


def _codes(decisions: Any, num_clips: int) -> Any:
    """:func:`_code` of a (V, n) array of decisions, as int8."""
    import numpy as np

    v = np.asarray(decisions, dtype=np.float64).reshape(-1, num_clips)
    return np.where(v < -0.5, -1, (v > 0.5).astype(np.int8)).astype(np.int8)


# ------------------------------------------------------------------------------------------ the API


class Schedule:
    """What runs at which clip of a video, what it costs, how it trains and how it runs online."""

    pattern: str
    num_clips: int
    budget: float | None = None
    order: str = "temporal"
    exit_budget: float | None = None
    distillable = True  # whether a fit with this schedule can teach or be taught (--teacher)
    stops_early = False  # whether a video may be left before its last clip (predict then decodes on demand)

    @property
    def visits(self) -> list[int]:
        """The run's clip indices in the order this schedule visits them."""
        return visit_order(self.order, self.num_clips)

    def with_order(self, order: str) -> Schedule:
        """This schedule visiting the clips in ``order`` (evaluate/predict --order on a run without an exit)."""
        return replace(self, order=check_order(order))

    # -- what to read ----------------------------------------------------------------------------
    def sources(self, positions: Any, expensive: str, cheap: str) -> dict[str, tuple[str, Any]]:
        """Source -> (model, extracted clip positions read); ``positions`` may be (videos, n) draws."""
        raise NotImplementedError

    def roles(self) -> list[str]:
        """The sources ("expensive", "cheap") whose backbones run at all, expensive first."""
        raise NotImplementedError

    def descriptor_view(self, sources: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
        """(sources, mask) of the clip maps a VLAD's centres are initialised on."""
        raise NotImplementedError

    # -- what trains -----------------------------------------------------------------------------
    def wrap(self, aggregator: Any) -> Any:
        """The module that trains and evaluates: the aggregator, or the aggregator with a gate."""
        return aggregator

    def aggregator(self, module: Any) -> Any:
        """The aggregator inside ``module`` (what ``wrap`` was given)."""
        return module

    def forward(self, module: Any, x: dict[str, Any], tau: float | None = None) -> tuple[Any, Any]:
        """(logits (B, K), decisions (B, n) per clip: 1 expensive, 0 cheap, -1 not read)."""
        raise NotImplementedError

    def unroll(self, module: Any, x: dict[str, Any], tau: float | None = None,
               want_state: bool = False) -> tuple[Any, Any, Any]:
        """(logits after every step (B, n, K) in visit order, the state vectors after every step
        (B, n, D) when ``want_state`` else None, decisions (B, n) per clip)."""
        raise NotImplementedError

    def loss(self, module: Any, x: dict[str, Any], y: Any, tau: float | None = None) -> Any:
        """The training loss of a batch: cross-entropy of the video's prediction + ``penalty``."""
        import torch.nn.functional as F

        logits, decisions = self.forward(module, x, tau)
        return F.cross_entropy(logits.float(), y) + self.penalty(module, decisions)

    def forward_with_state(self, module: Any, x: dict[str, Any]) -> tuple[Any, Any]:
        """(logits, final representation (B, D)), for distillation."""
        raise BadValue(f"pattern {self.pattern}: distillation needs a fixed-pattern student or teacher")

    def temperature(self, epoch: int, epochs: int) -> float | None:
        """The sampling temperature of ``epoch`` (1-based) for a schedule that samples; None otherwise."""
        return None

    def penalty(self, module: Any, decisions: Any) -> Any:
        """The schedule's own training loss term (0 for a fixed pattern)."""
        return 0.0

    def calibrate(self, module: Any, batches: Any, device: Any) -> bool:
        """After training, on the training videos ``batches``: set what the schedule calibrates (an
        exit's thresholds). Returns whether anything changed (the validation is then scored again)."""
        return False

    # -- costs -----------------------------------------------------------------------------------
    def costs(self, agg: str, kwargs: dict[str, Any], per_clip: dict[str, float | None]) -> dict[str, Any]:
        """The run's cost record: per_video (None when a shard lacks per-clip costs), aggregator,
        per_clip and what else ``video_gflops`` needs."""
        raise NotImplementedError

    def step_costs(self, agg: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The aggregator's GFLOPs after each number of clips read, in this schedule's order (what a
        video left early costs; an exit's record)."""
        raise NotImplementedError

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float,
                     clips_seen: float | None = None) -> float:
        """One video's GFLOPs when ``num_expensive`` of the ``clips_seen`` clips it read (default:
        all) got the expensive backbone."""
        raise NotImplementedError

    def expected_counts(self) -> tuple[float, float]:
        """(expensive, cheap) backbone runs per video: exact for a fixed pattern, expected for a policy or exit."""
        return self.counts_at(self.num_clips)

    def counts_at(self, clips_seen: float) -> tuple[float, float]:
        """(expensive, cheap) backbone runs of a video that read ``clips_seen`` clips (in order)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The schedule in words for one line of output, e.g. "1:3" or "adaptive at budget 0.125"."""
        return self.pattern + ("" if self.order == "temporal" else f" ({self.order})")

    # -- what is recorded ------------------------------------------------------------------------
    def mask(self) -> list[bool]:
        """The fixed expensive mask over the run's clips ([] when it is chosen per video)."""
        return []

    def record(self, module: Any) -> dict[str, Any] | None:
        """The schedule's own state saved in the run (the gate), or None."""
        return None

    def restore(self, aggregator: Any, record: dict[str, Any] | None) -> Any:
        """The evaluation module of a saved run from its fitted aggregator and ``record``."""
        return aggregator

    def report(self, decisions: Sequence[Any]) -> dict[str, Any]:
        """A video's counts from its per-clip decisions (1, 0, -1 or booleans): num_expensive,
        num_cheap, clips_seen (+ the policy's clips, an exit's exit clip)."""
        codes = [_code(d) for d in decisions]
        n_e, n_c = codes.count(1), codes.count(0)
        return {"num_expensive": n_e, "num_cheap": n_c, "clips_seen": n_e + n_c}

    def backbone_runs(self, decisions: Any) -> tuple[Any, Any]:
        """(expensive, cheap): (V, n) booleans, the clips each backbone ran on, from the decisions (V, n)
        (1, 0, -1 or booleans). Here the cheap one runs where the expensive one does not."""
        codes = _codes(decisions, self.num_clips)
        return codes == 1, codes == 0

    def summary(self, decisions: Any) -> dict[str, Any]:
        """result.json's schedule fields from the validation decisions (V, n)."""
        import numpy as np

        codes = np.asarray(decisions).reshape(-1, self.num_clips)
        n_e = float((codes == 1).sum(1).mean()) if len(codes) else 0.0
        seen = float((codes >= 0).sum(1).mean()) if len(codes) else float(self.num_clips)
        return {"num_expensive_mean": n_e, "budget": self.budget, "clips_seen_mean": seen,
                "order": self.order, "exit_budget": self.exit_budget}

    # -- online (predict) ------------------------------------------------------------------------
    def steps(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any]]:
        """Fold one video clip by clip in the schedule's order: yields (clip k, source that ran,
        logits after clip k); an exit stops yielding where the video is left.

        ``features(source, ks)``: the maps (len(ks), T', H', W', C) of the run's clips ``ks`` from
        that source's backbone; it is called only for the clips the schedule gives the backbone."""
        for k, source, logits, _ in self.trace(module, features, batch_size):
            yield k, source, logits

    def trace(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any, Any]]:
        """``steps`` with the online state after each clip as a fourth item."""
        raise NotImplementedError

    def references(self, run_dir: str | Path, *, seed: int = 0) -> dict[str, dict[str, float]]:
        """Reference schedules at this one's cost for ablate's tables ({} for a fixed pattern)."""
        return {}


def _fold_steps(agg: Any, seq: Any, want_state: bool) -> tuple[Any, Any]:
    """Fold ``seq`` (B, n, *feature), already in visit order: (logits after every step (B, n, K),
    state vectors (B, n, D) or None)."""
    import torch

    state, logits, states = None, [], []
    for t in range(seq.shape[1]):
        state = agg.fold(state, seq[:, t])
        logits.append(agg.readout(state, t + 1))
        if want_state:
            states.append(agg.state_vector(state))
    return torch.stack(logits, dim=1), (torch.stack(states, dim=1) if want_state else None)


@dataclass
class FixedPattern(Schedule):
    """Every video gets the same mask: expensive at ``mask()``'s True positions (patterns.py)."""

    pattern: str
    num_clips: int
    order: str = "temporal"

    def __post_init__(self) -> None:
        self._mask = patterns.expensive_mask(self.pattern, self.num_clips)
        self._visits = visit_order(self.order, self.num_clips)

    @property
    def visits(self) -> list[int]:
        return list(self._visits)

    def mask(self) -> list[bool]:
        return list(self._mask)

    def sources(self, positions: Any, expensive: str, cheap: str) -> dict[str, tuple[str, Any]]:
        return patterns.sources(positions, self._mask, expensive, cheap)

    def roles(self) -> list[str]:
        return [src for src, want in (("expensive", True), ("cheap", False)) if want in self._mask]

    def descriptor_view(self, sources: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
        return sources, self.mask()

    def _ordered(self) -> bool:
        return self._visits != list(range(self.num_clips))

    def forward(self, module: Any, x: dict[str, Any], tau: float | None = None) -> tuple[Any, Any]:
        if not self._ordered():
            logits = module(x, self._mask)
        else:  # the same clips, folded in the schedule's order
            logits = module.readout(module.fold_sequence(module.sequence(x, self._mask)[:, self._visits]),
                                    self.num_clips)
        return logits, self._decisions(logits)

    def unroll(self, module: Any, x: dict[str, Any], tau: float | None = None,
               want_state: bool = False) -> tuple[Any, Any, Any]:
        logits, states = _fold_steps(module, module.sequence(x, self._mask)[:, self._visits], want_state)
        return logits, states, self._decisions(logits)

    def forward_with_state(self, module: Any, x: dict[str, Any]) -> tuple[Any, Any]:
        if not self._ordered():
            logits, state = module.forward_with_state(x, self._mask)
        else:
            state = module.fold_sequence(module.sequence(x, self._mask)[:, self._visits])
            logits = module.readout(state, self.num_clips)
        return logits, module.state_vector(state)

    def _decisions(self, like: Any) -> Any:
        import torch

        return torch.tensor(self._mask, device=like.device, dtype=torch.float32).expand(like.shape[0], -1)

    def costs(self, agg: str, kwargs: dict[str, Any], per_clip: dict[str, float | None]) -> dict[str, Any]:
        from faster.aggregate.flops import count_gflops

        agg_gflops = count_gflops(agg, kwargs, self._mask)
        clip = {src: per_clip.get(src) for src in self.roles()}
        record = {"per_video": None, "aggregator": agg_gflops, "per_clip": clip}
        if all(v is not None for v in clip.values()):
            record["per_video"] = self.video_gflops(record, clip, sum(self._mask))
        return record

    def step_costs(self, agg: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from faster.aggregate.flops import step_gflops

        seen = [self._mask[k] for k in self._visits]
        return {"aggregator_steps": step_gflops(agg, kwargs, seen)}

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float,
                     clips_seen: float | None = None) -> float:
        s = self.num_clips if clips_seen is None else clips_seen
        num_cheap = s - num_expensive
        e = float(per_clip["expensive"]) if num_expensive else 0.0
        c = float(per_clip["cheap"]) if num_cheap else 0.0
        agg = float(costs["aggregator"]) if s >= self.num_clips else _at(costs["aggregator_steps"], s)
        return patterns.video_gflops(num_expensive, num_cheap, e, c, agg)

    def counts_at(self, clips_seen: float) -> tuple[float, float]:
        if clips_seen >= self.num_clips:
            n_e = sum(self._mask)
            return n_e, self.num_clips - n_e
        cumulative, total = [], 0
        for k in self._visits:
            total += self._mask[k]
            cumulative.append(total)
        n_e = _at(cumulative, clips_seen)
        return n_e, float(clips_seen) - n_e

    def summary(self, decisions: Any) -> dict[str, Any]:
        n_e = sum(self._mask)
        return {**super().summary(decisions), "num_expensive": n_e, "num_cheap": self.num_clips - n_e}

    def trace(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any, Any]]:
        state = module.init_state(1)
        for lo in range(0, self.num_clips, batch_size):
            chunk = self._visits[lo:lo + batch_size]
            maps: dict[int, Any] = {}
            for src in self.roles():  # each backbone once per chunk, on its own clips only
                ks = [k for k in chunk if self._mask[k] == (src == "expensive")]
                if ks:
                    out = features(src, ks)
                    maps.update((k, out[i:i + 1]) for i, k in enumerate(ks))
            for k in chunk:
                state = module.step(state, maps.pop(k), expensive=self._mask[k])
                yield k, "expensive" if self._mask[k] else "cheap", module.logits(state), state


@dataclass
class LearnedPolicy(Schedule):
    """A gate chooses per video and clip (aggregate/policy.py); the cheap backbone runs everywhere."""

    distillable = False
    pattern: str
    num_clips: int
    budget: float | None = None
    order: str = "temporal"

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)
        self._visits = visit_order(self.order, self.num_clips)

    @property
    def visits(self) -> list[int]:
        return list(self._visits)

    def sources(self, positions: Any, expensive: str, cheap: str) -> dict[str, tuple[str, Any]]:
        pos = positions if getattr(positions, "ndim", 1) == 2 else [int(p) for p in positions]
        return {"expensive": (expensive, pos), "cheap": (cheap, pos)}  # both maps of every clip

    def roles(self) -> list[str]:
        return ["expensive", "cheap"]

    def descriptor_view(self, sources: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
        return {"expensive": sources["expensive"]}, [True] * self.num_clips  # cluster the expensive maps

    def wrap(self, aggregator: Any) -> Any:
        from faster.aggregate.policy import Policy

        return Policy(aggregator, budget=self.budget)

    def aggregator(self, module: Any) -> Any:
        return module.aggregator

    def forward(self, module: Any, x: dict[str, Any], tau: float | None = None) -> tuple[Any, Any]:
        return module(x, tau, order=self._visits)

    def unroll(self, module: Any, x: dict[str, Any], tau: float | None = None,
               want_state: bool = False) -> tuple[Any, Any, Any]:
        return module.unroll(x, tau, order=self._visits, want_state=want_state)

    def temperature(self, epoch: int, epochs: int) -> float | None:
        from faster.aggregate.policy import temperature

        return temperature(epoch, epochs)

    def penalty(self, module: Any, decisions: Any) -> Any:
        from faster.aggregate.policy import PENALTY

        return module.penalty(decisions, PENALTY)

    def costs(self, agg: str, kwargs: dict[str, Any], per_clip: dict[str, float | None]) -> dict[str, Any]:
        """The expected cost at the budget's rate: N x cheap + B N x expensive + aggregator + gate."""
        import torch

        from faster.aggregate.flops import count_gflops
        from faster.aggregate.models import build
        from faster.aggregate.policy import Policy, gate_gflops

        n = self.num_clips
        agg_e, agg_c = count_gflops(agg, kwargs, [True] * n), count_gflops(agg, kwargs, [False] * n)
        with torch.device("meta"):
            gate = gate_gflops(Policy(build(agg, **kwargs), budget=self.budget), n)
        record = {"per_video": None, "aggregator": agg_e, "aggregator_all_e": agg_e, "aggregator_all_c": agg_c,
                  "gate": gate, "per_clip": dict(per_clip), "budget": self.budget}
        if all(per_clip.get(src) is not None for src in SOURCES):
            record["per_video"] = self.video_gflops(record, per_clip, self.budget * n)
        return record

    def step_costs(self, agg: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from faster.aggregate.flops import step_gflops

        return {"aggregator_all_e_steps": step_gflops(agg, kwargs, [True] * self.num_clips),
                "aggregator_all_c_steps": step_gflops(agg, kwargs, [False] * self.num_clips)}

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float,
                     clips_seen: float | None = None) -> float:
        """s x cheap (every clip read) + #E x expensive + the aggregator (its cheap-clip alignment cost
        falls as #E grows: interpolated between the all-e and all-c counts of s clips, exact since
        the alignment is per clip) + the gate's s decisions."""
        n = self.num_clips
        s = n if clips_seen is None else clips_seen
        if s >= n:
            agg_e, agg_c = float(costs["aggregator_all_e"]), float(costs["aggregator_all_c"])
        else:
            agg_e, agg_c = _at(costs["aggregator_all_e_steps"], s), _at(costs["aggregator_all_c_steps"], s)
        agg = agg_c + num_expensive / max(s, 1) * (agg_e - agg_c)
        e = float(per_clip["expensive"]) if num_expensive else 0.0
        return (patterns.video_gflops(num_expensive, s, e, float(per_clip["cheap"]), agg)
                + float(costs["gate"]) * s / max(n, 1))

    def counts_at(self, clips_seen: float) -> tuple[float, float]:
        s = min(float(clips_seen), float(self.num_clips))
        return self.budget * s, (self.num_clips if s >= self.num_clips else s)

    def describe(self) -> str:
        return f"{self.pattern} at budget {self.budget:g}" + ("" if self.order == "temporal" else f" ({self.order})")

    def backbone_runs(self, decisions: Any) -> tuple[Any, Any]:
        """The cheap backbone runs on every clip read (the gate reads its map), the expensive one where chosen."""
        codes = _codes(decisions, self.num_clips)
        return codes == 1, codes >= 0

    def report(self, decisions: Sequence[Any]) -> dict[str, Any]:
        codes = [_code(d) for d in decisions]
        chosen = [k for k, d in enumerate(codes) if d == 1]
        seen = sum(d >= 0 for d in codes)
        return {"num_expensive": len(chosen), "num_cheap": seen, "clips_seen": seen, "expensive_clips": chosen}

    def summary(self, decisions: Any) -> dict[str, Any]:
        out = super().summary(decisions)
        return {**out, "num_expensive": out["num_expensive_mean"], "num_cheap": self.num_clips}

    def record(self, module: Any) -> dict[str, Any] | None:
        from faster.aggregate.policy import PENALTY

        return {"budget": module.budget, "hidden": module.gate.fc1.out_features, "penalty": PENALTY,
                "state_dict": {k: v.detach().cpu() for k, v in module.gate.state_dict().items()}}

    def restore(self, aggregator: Any, record: dict[str, Any] | None) -> Any:
        from faster.aggregate.policy import Policy

        if not record:
            raise BadValue("a policy run without its gate")
        module = Policy(aggregator, budget=float(record["budget"]), hidden=int(record["hidden"]))
        module.gate.load_state_dict(record["state_dict"])
        return module.to(next(aggregator.parameters()).device).eval()

    def trace(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any, Any]]:
        """The cheap backbone on the clips in the schedule's order (in chunks of ``batch_size``, each
        chunk when it is reached), and clip by clip the gate decides from the cheap map and the
        state so far whether the expensive backbone runs too."""
        state = module.init_state(1)
        for lo in range(0, self.num_clips, batch_size):
            chunk = self._visits[lo:lo + batch_size]
            cheap = features("cheap", chunk)
            for i, k in enumerate(chunk):
                expensive = module.decide(state, cheap[i:i + 1])
                x = features("expensive", [k]) if expensive else cheap[i:i + 1]
                state = module.step(state, x, expensive=expensive)
                yield k, "expensive" if expensive else "cheap", module.logits(state), state

    def references(self, run_dir: str | Path, *, seed: int = 0) -> dict[str, dict[str, float]]:
        from faster.aggregate.policy import reference_points

        return reference_points(run_dir, self, seed=seed)


class EarlyExit(Schedule):
    """Stop reading a video once its prediction is sure enough (aggregate/exit.py).

    Wraps a fixed pattern or a learned policy (``inner``), which says which backbone runs at each
    clip; this schedule says when the video is left. The aggregator is trained with a loss after
    every step; a video is left after the first step t whose exit score reaches the threshold of
    step t (always after the last clip): the score is the prediction's confidence (the margin
    between its two best classes; thresholds per step calibrated on the training set so that a
    fraction ``exit_budget`` of the clips is read on average, AdaFocusV2+'s and MSDNet's way) or,
    with ``mode`` gate, a small learned gate's probability (FrameExit's way), its one threshold
    calibrated to the same budget."""

    distillable = False
    stops_early = True

    def __init__(self, inner: Schedule, exit_budget: float, mode: str = "threshold"):
        self.inner = inner
        self.exit_budget = check_exit_budget(exit_budget)
        self.mode = check_exit(mode)
        self.pattern, self.num_clips, self.budget, self.order = inner.pattern, inner.num_clips, inner.budget, inner.order

    def __repr__(self) -> str:
        return f"EarlyExit({self.inner!r}, exit_budget={self.exit_budget:g}, mode={self.mode!r})"

    @property
    def visits(self) -> list[int]:
        return self.inner.visits

    def with_order(self, order: str) -> Schedule:
        if check_order(order) != self.order:
            raise BadValue(f"the order is part of an early-exit run: its thresholds were calibrated on the "
                           f"{self.order} order, not {order}")
        return self

    # -- what to read: the inner schedule's
    def sources(self, positions: Any, expensive: str, cheap: str) -> dict[str, tuple[str, Any]]:
        return self.inner.sources(positions, expensive, cheap)

    def roles(self) -> list[str]:
        return self.inner.roles()

    def descriptor_view(self, sources: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
        return self.inner.descriptor_view(sources)

    def mask(self) -> list[bool]:
        return self.inner.mask()

    # -- what trains
    def wrap(self, aggregator: Any) -> Any:
        from faster.aggregate.exit import Exit

        return Exit(self.inner.wrap(aggregator), aggregator, num_clips=self.num_clips, mode=self.mode)

    def aggregator(self, module: Any) -> Any:
        return self.inner.aggregator(module.inner)

    def temperature(self, epoch: int, epochs: int) -> float | None:
        return self.inner.temperature(epoch, epochs)

    def penalty(self, module: Any, decisions: Any) -> Any:
        return self.inner.penalty(module.inner, decisions)

    def unroll(self, module: Any, x: dict[str, Any], tau: float | None = None,
               want_state: bool = False) -> tuple[Any, Any, Any]:
        return self.inner.unroll(module.inner, x, tau, want_state)

    def loss(self, module: Any, x: dict[str, Any], y: Any, tau: float | None = None) -> Any:
        """Cross-entropy after every step (so the prediction after t clips is good for every t), the
        inner schedule's penalty and, with a gate, its loss (aggregate/exit.py ``gate_loss``)."""
        from faster.aggregate.exit import gate_loss, step_losses

        logits, states, decisions = self.inner.unroll(module.inner, x, tau, module.needs_state)
        ce = step_losses(logits, y)  # (B, n)
        loss = ce.mean() + self.inner.penalty(module.inner, decisions)
        if module.gate is not None:
            loss = loss + gate_loss(module.gate_logits(logits, states), ce, self.exit_budget)
        return loss

    def forward(self, module: Any, x: dict[str, Any], tau: float | None = None) -> tuple[Any, Any]:
        """The prediction at each video's exit step; decisions -1 at the clips it never read."""
        import torch

        logits, states, decisions = self.inner.unroll(module.inner, x, tau, module.needs_state)
        step = module.exit_steps(module.scores(logits, states))  # (B,) exit step in visit order
        rank = torch.empty(self.num_clips, dtype=torch.long, device=step.device)
        rank[torch.tensor(self.visits, device=step.device)] = torch.arange(self.num_clips, device=step.device)
        read = rank[None, :] <= step[:, None]  # (B, n) per clip
        out = logits[torch.arange(logits.shape[0], device=step.device), step]
        return out, torch.where(read, decisions.to(out.dtype), torch.full_like(decisions, -1, dtype=out.dtype))

    def calibrate(self, module: Any, batches: Any, device: Any) -> bool:
        """The thresholds that read a fraction ``exit_budget`` of the training videos' clips."""
        import numpy as np
        import torch

        from faster.aggregate.data import inputs

        module.eval()
        scores = []
        with torch.no_grad():
            for batch in batches:
                logits, states, _ = self.inner.unroll(module.inner, inputs(batch, device), None, module.needs_state)
                scores.append(module.scores(logits, states).float().cpu().numpy())
        module.calibrate(np.concatenate(scores) if scores else np.zeros((0, self.num_clips)), self.exit_budget)
        return True

    # -- costs
    def costs(self, agg: str, kwargs: dict[str, Any], per_clip: dict[str, float | None]) -> dict[str, Any]:
        """The inner schedule's record, the aggregator's cost after each number of clips, the exit's own
        cost per step, and ``per_video`` the expected cost at the exit budget (F n clips read)."""
        from faster.aggregate.exit import exit_step_gflops

        record = {**self.inner.costs(agg, kwargs, per_clip), **self.inner.step_costs(agg, kwargs)}
        record.update(exit_step_gflops(agg, kwargs, self.mode), exit_budget=self.exit_budget)
        if record["per_video"] is not None:
            n_e, _ = self.expected_counts()
            record["per_video"] = self.video_gflops(record, per_clip, n_e, self.exit_budget * self.num_clips)
        return record

    def step_costs(self, agg: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.inner.step_costs(agg, kwargs)

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float,
                     clips_seen: float | None = None) -> float:
        """The inner schedule's cost of the clips read + a readout after every step but the last
        (counted in the aggregator's) + the exit gate's decision after every step."""
        s = self.num_clips if clips_seen is None else clips_seen
        return (self.inner.video_gflops(costs, per_clip, num_expensive, s)
                + float(costs.get("exit_readout", 0.0)) * max(s - 1, 0) + float(costs.get("exit_gate", 0.0)) * s)

    def counts_at(self, clips_seen: float) -> tuple[float, float]:
        return self.inner.counts_at(clips_seen)

    def expected_counts(self) -> tuple[float, float]:
        return self.inner.counts_at(self.exit_budget * self.num_clips)

    def describe(self) -> str:
        return (f"{self.inner.describe().removesuffix(f' ({self.order})')}, early exit at {self.exit_budget:g} of "
                f"the clips ({self.mode}, {self.order})")

    # -- what is recorded
    def record(self, module: Any) -> dict[str, Any] | None:
        return {"exit": {**module.record(), "exit_budget": self.exit_budget, "order": self.order},
                "inner": self.inner.record(module.inner)}

    def restore(self, aggregator: Any, record: dict[str, Any] | None) -> Any:
        from faster.aggregate.exit import Exit

        if not record or "exit" not in record:
            raise BadValue("an early-exit run without its exit record")
        module = Exit(self.inner.restore(aggregator, record.get("inner")), aggregator, num_clips=self.num_clips,
                      mode=self.mode, hidden=record["exit"].get("hidden"))
        module.load_record(record["exit"])
        return module.to(next(aggregator.parameters()).device).eval()

    def backbone_runs(self, decisions: Any) -> tuple[Any, Any]:
        return self.inner.backbone_runs(decisions)  # a clip never read is -1: no backbone ran on it

    def report(self, decisions: Sequence[Any]) -> dict[str, Any]:
        codes = [_code(d) for d in decisions]
        read = [k for k in self.visits if codes[k] >= 0]
        return {**self.inner.report(codes), "exit_clip": read[-1] if read else None}

    def summary(self, decisions: Any) -> dict[str, Any]:
        import numpy as np

        out = self.inner.summary(decisions)
        rows = np.asarray(decisions).reshape(-1, self.num_clips)
        cheap = float(np.mean([self.inner.report(row)["num_cheap"] for row in rows])) if len(rows) else 0.0
        return {**out, "num_expensive": out["num_expensive_mean"], "num_cheap": cheap,
                "exit_budget": self.exit_budget, "exit": self.mode,
                "clips_read_fraction": out["clips_seen_mean"] / self.num_clips}

    # -- online
    def trace(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any, Any]]:
        """The inner schedule clip by clip (a backbone batch of one: nothing runs past the exit), the
        exit decided after each clip from the prediction (and the state) so far."""
        agg = self.aggregator(module)
        for i, (k, source, logits, state) in enumerate(self.inner.trace(module.inner, features, 1)):
            yield k, source, logits, state
            vector = agg.state_vector(state["h"]) if module.needs_state else None
            if module.leaves(i, logits, vector):
                return


def create(pattern: str, num_clips: int, budget: float | None = None, *, order: str | None = None,
           exit_budget: float | None = None, exit_mode: str = "threshold") -> Schedule:
    """The schedule named by ``pattern`` (and ``budget``) over ``num_clips`` clips, visited in
    ``order`` (None: coarse-to-fine with an exit, else temporal), with an early exit at
    ``exit_budget`` (None: none) decided by ``exit_mode``."""
    check(pattern, budget, num_clips)
    order = resolve_order(order, exit_budget is not None)
    inner: Schedule
    if pattern == ADAPTIVE:
        inner = LearnedPolicy(pattern, int(num_clips), budget, order)
    else:
        inner = FixedPattern(pattern, int(num_clips), order)
    if exit_budget is None:
        return inner
    return EarlyExit(inner, exit_budget, exit_mode)


def from_run(run: Any) -> Schedule:
    """The schedule a fitted run (aggregate/run.py) was trained with."""
    config = run.config or {}
    budget = config.get("budget")
    if budget is None and run.policy is not None:
        budget = (run.policy.get("inner") or {}).get("budget") if "exit" in run.policy else run.policy.get("budget")
    exit_budget = config.get("exit_budget") if config.get("early_exit") else None
    return create(run.pattern, run.num_clips, None if budget is None else float(budget), order=config.get("order"),
                  exit_budget=exit_budget, exit_mode=config.get("exit_mode") or "threshold")
