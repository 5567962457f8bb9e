"""Schedules: which backbone runs at which clip, what a video costs, and (next) when a video stops.

One interface, used by fit, evaluate, ablate, predict and ``faster flops``; nothing outside this
module branches on the kind of schedule. Two implementations today:

* :class:`FixedPattern` (``all-e``, ``all-c``, ``first``, ``1:N``; paper Tables 3 and 4, the masks
  in aggregate/patterns.py): the same expensive/cheap choice for every video.
* :class:`LearnedPolicy` (``adaptive`` with a budget B; aggregate/policy.py, after LiteEval and
  AR-Net): the cheap backbone runs on every clip and a small gate decides per video and clip
  whether the expensive one runs too.

A schedule is made by :func:`create` from the pattern name, the number of clips n a run uses and
(for the policy) its budget, or by :func:`from_run` from a fitted run. It says

* what to read: ``sources(positions, expensive, cheap)`` (source -> (model, clip positions));
* what to train: ``wrap(aggregator)`` (the aggregator itself, or the aggregator with its gate),
  ``forward(module, x, tau)`` -> (logits, decisions), ``penalty``, ``temperature``;
* what a video costs: ``costs(agg, kwargs, per_clip)`` (the run's record) and ``video_gflops``;
* how it runs online: ``steps(module, features, batch_size)`` (predict), which runs each backbone
  only on the clips the schedule gives it;
* what to record: ``record(module)`` (the run's mask and gate) and ``report(decisions)`` per video.

Maps are channels-last everywhere, (B, n, T', H', W', C) as stored on disk. Early exit ([20]) will
be a third schedule: ``steps`` already yields after every clip, and ``report`` counts what ran.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faster.aggregate import patterns
from faster.errors import BadValue

ADAPTIVE = "adaptive"  # the learned policy's pattern name; it needs a budget
HELP = "all-e, all-c, first, 1:N (N >= 0; 1:0 is all-e), or adaptive: a learned gate (needs --budget)."
SOURCES = ("expensive", "cheap")
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


def grid_patterns(names: Sequence[str], budgets: Sequence[float]) -> list[str]:
    """An ablation grid's pattern axis: ``adaptive`` becomes one ``adaptive@B`` per budget."""
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
    return names


def grid_label(pattern: str, budget: float | None) -> str:
    """A grid cell's pattern label: the pattern, or ``adaptive@B`` for a policy."""
    return pattern if budget is None else f"{pattern}@{budget:g}"


def split_label(label: str) -> tuple[str, float | None]:
    """(pattern, budget) of a grid label: ``adaptive@0.125`` -> ("adaptive", 0.125)."""
    name, sep, budget = label.partition("@")
    return (name, float(budget)) if sep else (label, None)


# ------------------------------------------------------------------------------------------ the API


class Schedule:
    """What runs at which clip of a video, what it costs, how it trains and how it runs online."""

    pattern: str
    num_clips: int
    budget: float | None = None
    distillable = True  # whether a fit with this schedule can teach or be taught (--teacher)

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
        """(logits (B, K), decisions (B, n) in {0, 1}: 1 where the expensive map was folded)."""
        raise NotImplementedError

    def forward_with_state(self, module: Any, x: dict[str, Any]) -> tuple[Any, Any]:
        """(logits, final representation (B, D)), for distillation."""
        raise BadValue(f"pattern {self.pattern}: distillation needs a fixed-pattern student or teacher")

    def temperature(self, epoch: int, epochs: int) -> float | None:
        """The sampling temperature of ``epoch`` (1-based) for a schedule that samples; None otherwise."""
        return None

    def penalty(self, module: Any, decisions: Any) -> Any:
        """The schedule's own training loss term (0 for a fixed pattern)."""
        return 0.0

    # -- costs -----------------------------------------------------------------------------------
    def costs(self, agg: str, kwargs: dict[str, Any], per_clip: dict[str, float | None]) -> dict[str, Any]:
        """The run's cost record: per_video (None when a shard lacks per-clip costs), aggregator,
        per_clip and what else ``video_gflops`` needs."""
        raise NotImplementedError

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float) -> float:
        """One video's GFLOPs when ``num_expensive`` of its clips got the expensive backbone."""
        raise NotImplementedError

    def expected_counts(self) -> tuple[float, int]:
        """(expensive, cheap) backbone runs per video: exact for a fixed pattern, expected for a policy."""
        raise NotImplementedError

    def describe(self) -> str:
        """The schedule in words for one line of output, e.g. "1:3" or "adaptive at budget 0.125"."""
        return self.pattern

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

    def report(self, decisions: Sequence[bool]) -> dict[str, Any]:
        """A video's counts from its per-clip decisions: num_expensive, num_cheap (+ the policy's clips)."""
        n_e = int(sum(bool(d) for d in decisions))
        return {"num_expensive": n_e, "num_cheap": len(decisions) - n_e}

    def summary(self, decisions: Any) -> dict[str, Any]:
        """result.json's schedule fields from the validation decisions (V, n)."""
        import numpy as np

        chosen = np.asarray(decisions, dtype=bool).reshape(-1, self.num_clips)
        n_e = float(chosen.sum(1).mean()) if len(chosen) else 0.0
        return {"num_expensive_mean": n_e, "budget": self.budget}

    # -- online (predict) ------------------------------------------------------------------------
    def steps(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any]]:
        """Fold one video clip by clip: yields (clip k, source that ran, logits after clip k).

        ``features(source, ks)``: the maps (len(ks), T', H', W', C) of the run's clips ``ks`` from
        that source's backbone; it is called only for the clips the schedule gives the backbone."""
        raise NotImplementedError

    def references(self, run_dir: str | Path, *, seed: int = 0) -> dict[str, dict[str, float]]:
        """Reference schedules at this one's cost for ablate's tables ({} for a fixed pattern)."""
        return {}


@dataclass
class FixedPattern(Schedule):
    """Every video gets the same mask: expensive at ``mask()``'s True positions (patterns.py)."""

    pattern: str
    num_clips: int

    def __post_init__(self) -> None:
        self._mask = patterns.expensive_mask(self.pattern, self.num_clips)

    def mask(self) -> list[bool]:
        return list(self._mask)

    def sources(self, positions: Any, expensive: str, cheap: str) -> dict[str, tuple[str, Any]]:
        return patterns.sources(positions, self._mask, expensive, cheap)

    def roles(self) -> list[str]:
        return [src for src, want in (("expensive", True), ("cheap", False)) if want in self._mask]

    def descriptor_view(self, sources: dict[str, Any]) -> tuple[dict[str, Any], list[bool]]:
        return sources, self.mask()

    def forward(self, module: Any, x: dict[str, Any], tau: float | None = None) -> tuple[Any, Any]:
        logits = module(x, self._mask)
        return logits, self._decisions(logits)

    def forward_with_state(self, module: Any, x: dict[str, Any]) -> tuple[Any, Any]:
        logits, state = module.forward_with_state(x, self._mask)
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

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float) -> float:
        num_cheap = self.num_clips - num_expensive
        e = float(per_clip["expensive"]) if num_expensive else 0.0
        c = float(per_clip["cheap"]) if num_cheap else 0.0
        return patterns.video_gflops(num_expensive, num_cheap, e, c, float(costs["aggregator"]))

    def expected_counts(self) -> tuple[float, int]:
        n_e = sum(self._mask)
        return n_e, self.num_clips - n_e

    def summary(self, decisions: Any) -> dict[str, Any]:
        n_e = sum(self._mask)
        return {**super().summary(decisions), "num_expensive": n_e, "num_cheap": self.num_clips - n_e}

    def steps(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any]]:
        state = module.init_state(1)
        for lo in range(0, self.num_clips, batch_size):
            chunk = range(lo, min(lo + batch_size, self.num_clips))
            maps: dict[int, Any] = {}
            for src in self.roles():  # each backbone once per chunk, on its own clips only
                ks = [k for k in chunk if self._mask[k] == (src == "expensive")]
                if ks:
                    out = features(src, ks)
                    maps.update((k, out[i:i + 1]) for i, k in enumerate(ks))
            for k in chunk:
                state = module.step(state, maps.pop(k), expensive=self._mask[k])
                yield k, "expensive" if self._mask[k] else "cheap", module.logits(state)


@dataclass
class LearnedPolicy(Schedule):
    """A gate chooses per video and clip (aggregate/policy.py); the cheap backbone runs everywhere."""

    distillable = False
    pattern: str
    num_clips: int
    budget: float | None = None

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)

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
        return module(x, tau)

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

    def video_gflops(self, costs: dict[str, Any], per_clip: dict[str, float], num_expensive: float) -> float:
        """N x cheap (always) + #E x expensive + the aggregator (its cheap-clip alignment cost falls
        as #E grows: interpolated between the all-e and all-c counts, exact since the alignment is
        per clip) + the gate."""
        n = self.num_clips
        agg_e, agg_c = float(costs["aggregator_all_e"]), float(costs["aggregator_all_c"])
        agg = agg_c + num_expensive / max(n, 1) * (agg_e - agg_c)
        e = float(per_clip["expensive"]) if num_expensive else 0.0
        return patterns.video_gflops(num_expensive, n, e, float(per_clip["cheap"]), agg) + float(costs["gate"])

    def expected_counts(self) -> tuple[float, int]:
        return self.budget * self.num_clips, self.num_clips

    def describe(self) -> str:
        return f"{self.pattern} at budget {self.budget:g}"

    def report(self, decisions: Sequence[bool]) -> dict[str, Any]:
        chosen = [k for k, d in enumerate(decisions) if bool(d)]
        return {"num_expensive": len(chosen), "num_cheap": len(decisions), "expensive_clips": chosen}

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

    def steps(self, module: Any, features: Callable[[str, list[int]], Any], batch_size: int) -> Iterator[
            tuple[int, str, Any]]:
        """The cheap backbone on every clip (in chunks of ``batch_size``), then clip by clip the gate
        decides from the cheap map and the state so far whether the expensive backbone runs too."""
        import torch

        n = self.num_clips
        cheap = torch.cat([features("cheap", list(range(lo, min(lo + batch_size, n)))) for lo in range(0, n, batch_size)])
        state = module.init_state(1)
        for k in range(n):
            expensive = module.decide(state, cheap[k:k + 1])
            x = features("expensive", [k]) if expensive else cheap[k:k + 1]
            state = module.step(state, x, expensive=expensive)
            yield k, "expensive" if expensive else "cheap", module.logits(state)

    def references(self, run_dir: str | Path, *, seed: int = 0) -> dict[str, dict[str, float]]:
        from faster.aggregate.policy import reference_points

        return reference_points(run_dir, self, seed=seed)


def create(pattern: str, num_clips: int, budget: float | None = None) -> Schedule:
    """The schedule named by ``pattern`` (and ``budget``) over ``num_clips`` clips."""
    check(pattern, budget, num_clips)
    if pattern == ADAPTIVE:
        return LearnedPolicy(pattern, int(num_clips), budget)
    return FixedPattern(pattern, int(num_clips))


def from_run(run: Any) -> Schedule:
    """The schedule a fitted run (aggregate/run.py) was trained with."""
    budget = None if run.policy is None else float(run.policy["budget"])
    return create(run.pattern, run.num_clips, budget)
