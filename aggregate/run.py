"""A fitted run as a typed artifact (docs/format.md "Run directory"): one place saves it, loads it and rebuilds it.

A run directory, written by `faster fit` (and by every cell of `faster ablate`):

  config.json             the FitConfig (asdict), written first
  checkpoint.pt           the ``Run`` below as plain containers + tensors, loadable with
                          torch.load(weights_only=True)
  metrics.jsonl           one JSON object per epoch
  val_predictions.jsonl   the final epoch's validation predictions (what `faster evaluate` reproduces)
  result.json             written last: a run with result.json is complete

``Run`` holds what evaluate, predict and ablate need: the aggregator (name, constructor kwargs,
state dict), the classes, the expensive and cheap models with their feature shapes and provenance,
the extraction configuration of the features it was fitted on, the clip positions used, the
pattern and its expensive mask, and the costs. ``Run.load(dir).aggregator()`` rebuilds the
fitted aggregator; ``sources()`` says which model and clip positions each source reads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from faster.aggregate import patterns
from faster.errors import BadFile, Incompatible
from faster.store.files import replace_atomically

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
VAL_PREDICTIONS = "val_predictions.jsonl"
PREDICTIONS = "predictions.jsonl"
CHECKPOINT_FORMAT = "faster-run"
CHECKPOINT_VERSION = 1


@dataclass
class Run:
    """A fitted aggregator and everything needed to use it again (saved in checkpoint.pt)."""

    config: dict[str, Any]  # the FitConfig it was fitted with (asdict)
    agg: str  # aggregator name (faster.aggregate.names())
    agg_kwargs: dict[str, Any]  # its constructor arguments (num_classes, sources, dropout, ...)
    state_dict: dict[str, Any]  # its fitted parameters and buffers (CPU tensors)
    classes: list[str]
    expensive: str  # model name read at the mask's True positions
    cheap: str  # model name read at the False positions
    models: dict[str, dict[str, Any]]  # per model: "shape" (T', H', W', C) and its provenance attrs
    extraction: dict[str, int]  # clip_len, num_clips (N extracted), frame_stride, size
    positions: list[int]  # which of the N extracted clips the run uses (patterns.subset_positions)
    pattern: str
    mask: list[bool]  # per used clip: expensive?
    gflops: dict[str, Any]  # per_video, aggregator, per_clip (per source)
    software_version: str = ""
    torch_version: str = ""
    policy: dict[str, Any] | None = None  # pattern adaptive: budget, gate width, penalty, gate state dict
    extra: dict[str, Any] = field(default_factory=dict)  # further keys of newer checkpoints, kept as they are

    def __post_init__(self) -> None:
        self.positions = [int(p) for p in self.positions]
        self.mask = [bool(m) for m in self.mask]
        if not self.adaptive and len(self.positions) != len(self.mask):
            raise BadFile(f"run of {len(self.positions)} clip positions with a mask of {len(self.mask)}")

    @property
    def adaptive(self) -> bool:
        """A learned policy chooses the expensive clips of each video (aggregate/policy.py)."""
        return self.policy is not None

    # -- what it reads and costs --

    @property
    def num_clips(self) -> int:
        return len(self.positions)

    @property
    def clip_len(self) -> int:
        return int(self.extraction["clip_len"])

    @property
    def num_extracted(self) -> int:
        return int(self.extraction["num_clips"])

    @property
    def frame_stride(self) -> int:
        return int(self.extraction["frame_stride"])

    @property
    def size(self) -> int:
        return int(self.extraction["size"])

    @property
    def agg_gflops(self) -> float:
        """The aggregator's own multiply-adds per video, GFLOPs."""
        return float(self.gflops["aggregator"])

    def model_at(self, k: int) -> str:
        """The backbone that processes the run's k-th clip (fixed patterns; a policy decides per video)."""
        return self.expensive if self.mask[k] else self.cheap

    @property
    def needed(self) -> list[str]:
        """Backbones the pattern calls (all-c never builds the expensive one), expensive first."""
        if self.adaptive:
            return list(dict.fromkeys((self.expensive, self.cheap)))
        return [m for m in dict.fromkeys((self.expensive, self.cheap))
                if any(self.model_at(k) == m for k in range(len(self.mask)))]

    def sources(self) -> dict[str, tuple[str, list[int]]]:
        """Source -> (model, extracted clip positions) that the aggregator reads (a policy: both, everywhere)."""
        if self.adaptive:
            from faster.aggregate import policy

            return policy.sources(self.positions, self.expensive, self.cheap)
        return patterns.sources(self.positions, self.mask, self.expensive, self.cheap)

    def video_gflops(self, num_expensive: int, num_cheap: int) -> float:
        """A video's cost for these counts of clips, with the per-clip costs recorded at extraction
        (under a policy ``num_cheap`` is every clip: the cheap backbone always runs)."""
        m = self.models
        e = float(m[self.expensive]["gflops_per_clip"]) if num_expensive else 0.0
        c = float(m[self.cheap]["gflops_per_clip"]) if num_cheap else 0.0
        if self.adaptive:
            from faster.aggregate import policy

            g = self.gflops
            return policy.video_gflops(num_expensive, self.num_clips, e, c, g["aggregator_all_e"],
                                       g["aggregator_all_c"], g["gate"])
        return patterns.video_gflops(num_expensive, num_cheap, e, c, self.agg_gflops)

    def videos_gflops(self, chosen: Any) -> Any:
        """Each video's cost from its expensive decisions ``chosen`` (V, n) bool; None when a shard
        lacked the per-clip costs."""
        import numpy as np

        if self.gflops.get("per_video") is None:
            return None
        n_e = np.asarray(chosen, dtype=bool).sum(axis=1)
        n = self.num_clips
        return np.array([self.video_gflops(int(k), n if self.adaptive else n - int(k)) for k in n_e])

    def check_features(self, fs: Any, what: str) -> None:
        """Incompatible unless feature set ``fs`` has this run's classes, extraction and map shapes."""
        if list(fs.classes) != list(self.classes):
            raise Incompatible(f"{what}: class list differs from the run's ({len(fs.classes)} vs "
                               f"{len(self.classes)} classes)")
        if dict(fs.config) != dict(self.extraction):
            raise Incompatible(f"{what}: extraction {fs.config} differs from the run's {self.extraction}")
        for name, _ in self.sources().values():
            if list(fs.model(name).shape) != list(self.models[name]["shape"]):
                raise Incompatible(f"{what}: {name} clips are {fs.model(name).shape}, the run was fitted on "
                                   f"{self.models[name]['shape']}")

    # -- the aggregator --

    def aggregator(self, device: Any = "cpu") -> Any:
        """The fitted aggregator, in eval mode on ``device``."""
        from faster.aggregate.models import build

        model = build(self.agg, **self.agg_kwargs)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def model(self, device: Any = "cpu") -> Any:
        """What evaluate and predict run: the aggregator, or for a policy run the aggregator with its gate."""
        if not self.adaptive:
            return self.aggregator(device)
        from faster.aggregate.policy import Policy

        p = Policy(self.aggregator(), budget=float(self.policy["budget"]), hidden=int(self.policy["hidden"]))
        p.gate.load_state_dict(self.policy["state_dict"])
        return p.to(device).eval()

    # -- files --

    def payload(self) -> dict[str, Any]:
        """The checkpoint's plain containers (what torch.save writes)."""
        d = asdict(self)
        extra = d.pop("extra")
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **extra, **d, "num_clips": self.num_clips}

    def save(self, run_dir: str | Path) -> Path:
        """Write RUN/checkpoint.pt atomically; return its path."""
        import torch

        path = Path(run_dir) / CHECKPOINT
        return replace_atomically(path, lambda tmp: torch.save(self.payload(), tmp))

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        """The run of a run directory (or its checkpoint.pt), loaded with weights_only=True; BadFile
        naming the file when it is missing, unreadable, not a run checkpoint, of another version, or
        when the run is incomplete (no result.json beside it: its fit was interrupted)."""
        import torch

        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise BadFile(f"{path}: no checkpoint (a run directory holds {CHECKPOINT})")
        if not (path.parent / RESULT).is_file():
            raise BadFile(f"{path.parent}: an incomplete run (no {RESULT}): its fit was interrupted or failed; "
                          f"fit it again with --overwrite")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: name it, without torch's advice on unpickling
            raise BadFile(f"{path}: not a PyTorch checkpoint of a faster run "
                          f"(torch.load with weights_only=True failed: {err.__class__.__name__})") from None
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise BadFile(f"{path}: not a faster run checkpoint")
        if ck.get("version") != CHECKPOINT_VERSION:
            raise BadFile(f"{path}: checkpoint version {ck.get('version')!r}; this faster reads {CHECKPOINT_VERSION}")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = sorted(n for n in names if n not in ck and n not in ("software_version", "torch_version", "policy"))
        if missing:
            raise BadFile(f"{path}: the run's checkpoint lacks {missing}: it was not written by `faster fit`")
        extra = {k: v for k, v in ck.items() if k not in names and k not in ("format", "version", "num_clips")}
        run = cls(**{k: ck[k] for k in names if k in ck}, extra=extra)
        for name in run.needed:
            if name not in run.models:
                raise BadFile(f"{path}: the run's checkpoint records no provenance for {name}")
        return run
