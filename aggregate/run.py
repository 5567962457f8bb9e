"""A fitted run as a typed artifact (docs/format.md "Run directory"): one place saves it, loads it and rebuilds it.

A run directory, written by `faster fit` (and by every cell of `faster ablate`):

  config.json             the FitConfig (asdict), written first
  last.pt                 while it trains: the training state after the last finished epoch
                          (faster/engine.py), what ``--resume`` continues from; removed at the end
  checkpoint.pt           the ``Run`` below as plain containers + tensors, loadable with
                          torch.load(weights_only=True)
  metrics.jsonl           one JSON object per finished epoch, written while it trains
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

from faster.errors import BadFile
from faster.store.files import replace_atomically

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
TRAINING_STATE = "last.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
PREVIOUS = ".previous"  # RUN/.previous: the finished run an --overwrite fit replaces, kept until the new one completes
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
    mask: list[bool]  # per used clip: expensive? ([] when the schedule chooses per video)
    gflops: dict[str, Any]  # per_video, aggregator, per_clip (per source)
    software_version: str = ""
    torch_version: str = ""
    policy: dict[str, Any] | None = None  # the schedule's own record (a learned gate: budget, width, state dict)
    extra: dict[str, Any] = field(default_factory=dict)  # further keys of newer checkpoints, kept as they are

    def __post_init__(self) -> None:
        self.positions = [int(p) for p in self.positions]
        self.mask = [bool(m) for m in self.mask]
        if self.mask and len(self.positions) != len(self.mask):
            raise BadFile(f"run of {len(self.positions)} clip positions with a mask of {len(self.mask)}")

    @property
    def schedule(self) -> Any:
        """The schedule it was fitted with (aggregate/schedule.py): what runs where, what it costs."""
        from faster.aggregate.schedule import from_run

        return from_run(self)

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

    def model_name(self, source: str) -> str:
        """The backbone of source "expensive" or "cheap"."""
        return self.expensive if source == "expensive" else self.cheap

    @property
    def needed(self) -> list[str]:
        """Backbones the schedule calls (all-c never builds the expensive one), expensive first."""
        return list(dict.fromkeys(self.model_name(src) for src in self.schedule.roles()))

    def sources(self) -> dict[str, tuple[str, list[int]]]:
        """Source -> (model, extracted clip positions) that the aggregator reads."""
        return self.schedule.sources(self.positions, self.expensive, self.cheap)

    def per_clip_gflops(self) -> dict[str, float]:
        """Source -> its backbone's GFLOPs per clip, as recorded at extraction."""
        return {src: float(self.models[self.model_name(src)]["gflops_per_clip"])
                for src in ("expensive", "cheap") if self.model_name(src) in self.models
                and self.models[self.model_name(src)].get("gflops_per_clip") is not None}

    def video_gflops(self, num_expensive: float, clips_seen: float | None = None) -> float:
        """A video's cost when ``num_expensive`` of the ``clips_seen`` clips it read (default: all)
        got the expensive backbone."""
        return self.schedule.video_gflops(self.gflops, self.per_clip_gflops(), num_expensive, clips_seen)

    def videos_gflops(self, decisions: Any, clip_gflops: dict[str, Any] | None = None) -> Any:
        """Each video's cost from its per-clip decisions (V, n) (1 expensive, 0 cheap, -1 not read;
        or booleans); None when a shard lacked the per-clip costs. ``clip_gflops`` (source -> (V, n),
        :meth:`clip_gflops`): a backbone whose cost depends on the clip (VA-RED²) counts each clip it
        ran on at that clip's own GFLOPs instead of the header's figure (its full cost)."""
        import numpy as np

        if self.gflops.get("per_video") is None:
            return None
        schedule, per_clip = self.schedule, self.per_clip_gflops()
        reports = [schedule.report(row) for row in np.asarray(decisions).reshape(-1, self.num_clips)]
        out = np.array([schedule.video_gflops(self.gflops, per_clip, r["num_expensive"], r["clips_seen"])
                        for r in reports])
        if clip_gflops:  # the costs are linear in each clip's backbone cost: swap the header's for the clip's
            ran = dict(zip(("expensive", "cheap"), schedule.backbone_runs(decisions)))
            for src, values in clip_gflops.items():
                out = out + ((np.asarray(values, dtype=np.float64) - per_clip[src]) * ran[src]).sum(axis=1)
        return out

    def clip_gflops(self, fs: Any, indices: Any = None) -> dict[str, Any]:
        """Source -> (V, n) float64 GFLOPs of each clip at the run's positions, of the videos ``indices``
        of FeatureSet ``fs`` (default all), for each backbone whose cost depends on the clip (the
        shards' ``gflops/<model>``, FeatureSet.clip_gflops); a clip without a figure counts at the
        header's. {} for fixed-cost backbones: what :meth:`videos_gflops` takes."""
        import numpy as np

        out, per_clip = {}, self.per_clip_gflops()
        for src, (model, _) in self.sources().items():
            values = fs.clip_gflops(model) if src in per_clip else None
            if values is None:
                continue
            values = (values if indices is None else values[np.asarray(indices)])[:, self.positions]
            out[src] = np.where(np.isnan(values), per_clip[src], values).astype(np.float64)
        return out

    def backbone_clip_gflops(self, decisions: Any, clip_gflops: dict[str, Any]) -> dict[str, float]:
        """Model -> the mean GFLOPs per clip it ran on (result.json's ``clip_gflops_mean``), for the
        clip-dependent backbones of ``clip_gflops``."""
        import numpy as np

        ran = dict(zip(("expensive", "cheap"), self.schedule.backbone_runs(decisions)))
        return {self.model_name(src): float(np.asarray(values)[ran[src]].mean())
                for src, values in clip_gflops.items() if ran[src].any()}

    def check_features(self, fs: Any, what: str) -> None:
        """Incompatible unless feature set ``fs`` has this run's classes, extraction and map shapes."""
        from faster.store.header import check_compatible

        used = [name for name, _ in self.sources().values()]
        check_compatible(fs, classes=self.classes, config=self.extraction,
                         shapes={name: self.models[name]["shape"] for name in used},
                         weights={name: self.models[name].get("weights") for name in used},
                         what=what, reference="the run")

    # -- the aggregator --

    def aggregator(self, device: Any = "cpu") -> Any:
        """The fitted aggregator, in eval mode on ``device``."""
        from faster.aggregate.models import build

        model = build(self.agg, **self.agg_kwargs)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def model(self, device: Any = "cpu") -> Any:
        """What evaluate and predict run: the schedule's module (the aggregator, or with its gate)."""
        return self.schedule.restore(self.aggregator(device), self.policy)

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
    def load(cls, path: str | Path) -> Run:
        """The run of a run directory (or its checkpoint.pt), loaded with weights_only=True; BadFile
        naming the file when it is missing, unreadable, not a run checkpoint, of another version, or
        when the run is incomplete (no result.json beside it: its fit was interrupted)."""
        import torch

        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT
        partial = any((path.parent / name).exists() for name in (CHECKPOINT, CONFIG, TRAINING_STATE))
        if not path.is_file() and not partial:
            raise BadFile(f"{path}: no checkpoint (a run directory holds {CHECKPOINT})")
        if not (path.parent / RESULT).is_file():
            kept = path.parent / PREVIOUS
            if (kept / RESULT).is_file():
                raise BadFile(f"{path.parent}: an incomplete run (no {RESULT}): an --overwrite fit was interrupted; "
                              f"the run it replaces is intact in {kept}; continue the new fit with `faster fit ... "
                              f"--resume`")
            raise BadFile(f"{path.parent}: an incomplete run (no {RESULT}): its fit was interrupted or failed; "
                          f"continue it with `faster fit ... --resume` or start again with --overwrite")
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
        bad = [k for k, v in {**run.state_dict, **((run.policy or {}).get("state_dict") or {})}.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a diverged fit: its predictions would be NaN, scored as if they were classes
            raise BadFile(f"{path}: the aggregator's weights are not finite ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}): its fit diverged; fit it again with a lower --lr")
        for name in run.needed:
            if name not in run.models:
                raise BadFile(f"{path}: the run's checkpoint records no provenance for {name}")
        return run
