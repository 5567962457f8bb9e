"""Fitting and evaluating an aggregator on cached clip features (paper, "Setups for learning to
aggregate": the backbones are fixed; only the aggregator is trained, with a cosine schedule).

``fit(FitConfig)`` streams the shards (faster.store.reader), reads only the model each clip position
needs under the E:C pattern, trains, validates every epoch and writes the run directory
(faster.aggregate.run). ``evaluate(run_dir, feats)`` rebuilds the run and writes per-video
predictions. Neither imports a backbone, torchvision or decord.

Options beyond the paper (docs/aggregators.md): ``agg_options`` (constructor overrides, e.g. a
netvlad's clusters), ``init_centres`` (k-means VLAD centres from the training descriptors),
``train_clips="jitter"`` (one random clip per segment, per video and epoch, as TSN-style training samples
them) and ``teacher`` (Fewer Frames distillation: a frozen fitted run teaches the student through
a KL term on softened predictions and a squared error on the final representations, also on
unlabelled videos).

Cost per video (docs/format.md "Patterns"): #E x the expensive model's gflops_per_clip + #C x the
cheap one's (both from the shards) + the aggregator's own multiply-adds, counted on meta tensors.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from faster.aggregate import get as aggregator_class
from faster.aggregate import patterns, run
from faster.aggregate.run import Run
from faster.errors import BadValue, Incompatible
from faster.store import files

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
TRAIN_CLIPS = ("uniform", "jitter")
MAX_CENTRE_DESCRIPTORS = 100_000  # init_centres: k-means on at most this many training descriptors
RUN_FILES = (run.CONFIG, run.CHECKPOINT, run.METRICS, run.RESULT, run.VAL_PREDICTIONS)  # what fit writes


@dataclass
class FitConfig:
    """Everything a fit depends on; stored in config.json and in the checkpoint."""

    feats: list[str]  # training feature-set directories (parts pooled, different models joined by id)
    out: str  # run directory to write
    agg: str  # aggregator name: avg, concat, lstm, gru, fastgru (faster.aggregate.names())
    expensive: str  # model name of the expensive features (True positions of the pattern)
    cheap: str  # model name of the cheap features (False positions)
    pattern: str  # all-e, all-c, first, 1:N or adaptive (faster.aggregate.patterns; adaptive: aggregate/policy.py)
    budget: float | None = None  # adaptive: the target fraction of clips that also get the expensive map, (0, 1]
    num_clips: int | None = None  # use n of the N extracted clips (positions subset_positions(N, n)); None: all
    val: list[str] = field(default_factory=list)  # validation feature sets; empty: hold out val_fraction of feats
    epochs: int = 10  # passes over the training videos
    batch_size: int = 32  # videos per step
    lr: float = 1e-3  # peak learning rate (cosine decay to 0 over all steps)
    weight_decay: float = 1e-4  # decoupled (AdamW) or L2 (SGD) weight decay
    dropout: float = 0.5  # before the final fully-connected layer
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9)
    seed: int = 0  # model init, shuffling and dropout
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    workers: int = 0  # 0: one background reader thread (keeps up with raw h5py reads, BENCHMARKS.md);
    #                   W > 0: a torch DataLoader with W processes (for compressed shards on many cores)
    threads: int | None = None  # torch intra-op threads for this fit (None: leave as is); ablate runs fits in parallel
    val_fraction: float = 0.2  # held-out fraction of feats, chosen by hashing video ids, when val is empty
    standardize: bool = True  # standardise each input channel with statistics of (up to 1,024) training
    #                          videos, stored in the checkpoint (see aggregate/models.py Align)
    progress: bool = True  # tqdm progress bars
    overwrite: bool = False  # replace a run already in ``out`` (refused otherwise)
    skip_bad: bool = False  # leave out (with a warning) shards changed after writing and videos with NaN/inf
    agg_options: dict[str, Any] = field(default_factory=dict)  # aggregator constructor overrides (--agg-option
    #                          KEY=VALUE, e.g. clusters=64), recorded in the run's agg_kwargs
    init_centres: bool = False  # netvlad: k-means centres on up to 100k training descriptors (ActionVLAD)
    train_clips: str = "uniform"  # uniform, or jitter: each epoch and video one random clip per segment of the N
    #                              extracted (order kept); evaluation and predict always use uniform
    teacher: str | None = None  # a fitted run directory to distil from (Fewer Frames); frozen
    distill_weight: float = 1.0  # A: weight of T^2 KL(teacher || student), softened at temperature T
    rep_weight: float = 0.01  # B: weight of the MSE between final representations (Aggregator.state_vector)
    temperature: float = 2.0  # T of the distillation term

    def validate(self) -> None:
        """Check every value that needs no data; ValueError naming the bad one."""
        from faster.aggregate import names

        if not self.feats:
            raise BadValue("no training feature set given")
        if self.agg not in names():
            raise BadValue(f"unknown aggregator {self.agg!r}; expected one of {', '.join(names())}")
        patterns.check(self.pattern)
        if self.pattern == patterns.ADAPTIVE:
            from faster.aggregate.policy import check_budget

            check_budget(self.budget)
        elif self.budget is not None:
            raise BadValue(f"--budget {self.budget} is for --pattern adaptive, not {self.pattern}")
        if self.num_clips is not None:
            if self.num_clips < 1:
                raise BadValue(f"num_clips must be >= 1, got {self.num_clips}")
            if self.pattern != patterns.ADAPTIVE:
                patterns.expensive_mask(self.pattern, self.num_clips)
        if self.optimizer not in OPTIMIZERS:
            raise BadValue(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1), ("workers", self.workers, 0)):
            if value < low:
                raise BadValue(f"{name} must be >= {low}, got {value}")
        if not self.lr > 0:
            raise BadValue(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise BadValue(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise BadValue(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.val and not 0 < self.val_fraction < 1:
            raise BadValue(f"val_fraction must be in (0, 1) when no val set is given, got {self.val_fraction}")
        if self.threads is not None and self.threads < 1:
            raise BadValue(f"threads must be >= 1, got {self.threads}")
        if not isinstance(self.agg_options, dict):
            raise BadValue(f"agg_options must be a dict of constructor arguments, got {self.agg_options!r}")
        accepted = agg_option_keys(self.agg)
        for key in self.agg_options:
            if key not in accepted:
                raise BadValue(f"--agg-option {key!r} is not an option of {self.agg}; it accepts: "
                               f"{', '.join(accepted) or 'none'}")
        if self.init_centres:
            from faster.aggregate import get

            if not hasattr(get(self.agg), "init_centres"):
                raise BadValue(f"--init-centres is for aggregators with cluster centres (netvlad), not {self.agg}")
        if self.train_clips not in TRAIN_CLIPS:
            raise BadValue(f"unknown train_clips {self.train_clips!r}; expected one of {', '.join(TRAIN_CLIPS)}")
        if self.teacher is not None:
            if self.pattern == patterns.ADAPTIVE:
                raise BadValue("--teacher with --pattern adaptive is not supported: distil into a fixed-pattern student")
            for name, value in (("distill_weight", self.distill_weight), ("rep_weight", self.rep_weight)):
                if not value >= 0:
                    raise BadValue(f"{name} must be >= 0, got {value}")
            if not self.temperature > 0:
                raise BadValue(f"temperature must be > 0, got {self.temperature}")
        _device(self.device)


def agg_option_keys(agg: str) -> list[str]:
    """The constructor options of aggregator ``agg`` that --agg-option may set (all but num_classes,
    sources and dropout, which fit sets)."""
    import inspect

    from faster.aggregate import get

    params = inspect.signature(get(agg).__init__).parameters
    return [k for k, p in params.items()
            if p.kind == p.KEYWORD_ONLY and k not in ("num_classes", "sources", "dropout")]


def jitter_positions(num_extracted: int, num_clips: int, rng: np.random.Generator,
                     videos: int | None = None) -> Any:
    """One clip drawn at random from each of ``num_clips`` consecutive segments of the N extracted
    clips (segment k: [floor(k N / n), floor((k + 1) N / n))): ordered, distinct (--train-clips jitter;
    TSN's segment sampling). A list of n positions, or with ``videos`` an (videos, n) array: an
    independent draw per video."""
    if not 1 <= num_clips <= num_extracted:
        raise BadValue(f"--num-clips must be between 1 and the {num_extracted} extracted clips, got {num_clips}")
    edges = np.array([k * num_extracted // num_clips for k in range(num_clips + 1)])
    draw = rng.integers(edges[:-1], edges[1:], size=(1 if videos is None else videos, num_clips))
    return [int(p) for p in draw[0]] if videos is None else draw.astype(np.int64)


def _device(name: str) -> Any:
    from faster.runtime import resolve_device

    return resolve_device(name)


def holdout(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ids held out for validation: sha1(id) / 2^64 < fraction (order- and seed-free)."""
    h = np.fromiter((int.from_bytes(hashlib.sha1(str(i).encode()).digest()[:8], "big") for i in ids),
                    dtype=np.float64, count=len(ids))
    return h / 2.0 ** 64 < fraction


@dataclass
class Plan:
    """What a run reads and builds: clip positions, pattern mask, sources, aggregator kwargs, cost."""

    num_extracted: int
    positions: list[int]  # the N-clip indices used, subset_positions(N, n)
    mask: list[bool]  # per used clip: expensive?
    sources: dict[str, tuple[str, list[int]]]  # source -> (model, extracted clip positions)
    agg_kwargs: dict[str, Any]
    gflops: dict[str, Any]


def make_plan(fs: Any, *, agg: str, expensive: str, cheap: str, pattern: str, num_clips: int | None,
              num_classes: int, dropout: float, extra_kwargs: dict[str, Any] | None = None,
              budget: float | None = None) -> Plan:
    """Positions, mask and sources of ``pattern`` on feature set ``fs``; ValueError before any read."""
    from faster.aggregate.flops import count_gflops

    N = int(fs.config["num_clips"])
    n = N if num_clips is None else int(num_clips)
    positions = patterns.subset_positions(N, n)
    if pattern == patterns.ADAPTIVE:
        return _adaptive_plan(fs, N, positions, agg=agg, expensive=expensive, cheap=cheap, num_classes=num_classes,
                              dropout=dropout, budget=budget, extra_kwargs=extra_kwargs)
    mask = patterns.expensive_mask(pattern, n)
    sources = patterns.sources(positions, mask, expensive, cheap)
    shapes = {src: fs.model(model).channels_first for src, (model, _) in sources.items()}
    kwargs = {"num_classes": int(num_classes), "sources": shapes, "dropout": float(dropout), **(extra_kwargs or {})}
    agg_gflops = count_gflops(agg, kwargs, mask)
    n_e, n_c = sum(mask), len(mask) - sum(mask)
    per_clip = {src: fs.model(model).attrs.get("gflops_per_clip") for src, (model, _) in sources.items()}
    if any(v is None for v in per_clip.values()):
        log.warning("a shard lacks gflops_per_clip: the video cost leaves the backbones out")
        video = None
    else:
        video = patterns.video_gflops(n_e, n_c, per_clip.get("expensive", 0.0), per_clip.get("cheap", 0.0),
                                      agg_gflops)
    return Plan(N, positions, mask, sources, kwargs,
                {"per_video": video, "aggregator": agg_gflops, "per_clip": per_clip})


def _adaptive_plan(fs: Any, N: int, positions: list[int], *, agg: str, expensive: str, cheap: str,
                   num_classes: int, dropout: float, budget: float | None,
                   extra_kwargs: dict[str, Any] | None) -> Plan:
    """An adaptive run reads both maps at every position; its expected cost is at the budget's rate."""
    import torch

    from faster.aggregate import policy
    from faster.aggregate.flops import count_gflops
    from faster.aggregate.models import build

    budget = policy.check_budget(budget)
    sources = policy.sources(positions, expensive, cheap)
    shapes = {src: fs.model(model).channels_first for src, (model, _) in sources.items()}
    kwargs = {"num_classes": int(num_classes), "sources": shapes, "dropout": float(dropout), **(extra_kwargs or {})}
    n = len(positions)
    agg_e, agg_c = count_gflops(agg, kwargs, [True] * n), count_gflops(agg, kwargs, [False] * n)
    with torch.device("meta"):
        gate = policy.gate_gflops(policy.Policy(build(agg, **kwargs), budget=budget), n)
    per_clip = {src: fs.model(model).attrs.get("gflops_per_clip") for src, (model, _) in sources.items()}
    video = None
    if all(v is not None for v in per_clip.values()):
        video = policy.video_gflops(budget * n, n, per_clip["expensive"], per_clip["cheap"], agg_e, agg_c, gate)
    gflops = {"per_video": video, "aggregator": agg_e, "aggregator_all_e": agg_e, "aggregator_all_c": agg_c,
              "gate": gate, "per_clip": per_clip, "budget": budget}
    return Plan(N, positions, [], sources, kwargs, gflops)


def _forward(model: Any, x: dict[str, Any], mask: Sequence[bool], tau: float | None = None) -> tuple[Any, Any]:
    """(logits, decisions (B, n) or None) of a fixed-pattern aggregator or an adaptive policy."""
    from faster.aggregate.policy import Policy

    if isinstance(model, Policy):
        return model(x, tau)
    return model(x, mask), None


def logits_and_representation(model: Any, x: dict[str, Any], mask: Sequence[bool]) -> tuple[Any, Any]:
    """(logits (B, Y), final representation (B, D)) of a fixed-pattern aggregator: the batched
    forward, keeping its final state for ``state_vector``."""
    state = model._run(model._sequence(x, mask))
    return model._readout(state, len(mask)), model.state_vector(state)


def distillation_loss(logits: Any, labels: Any, teacher_logits: Any, rep: Any, teacher_rep: Any, *,
                      distill_weight: float, rep_weight: float, temperature: float) -> tuple[Any, dict[str, float]]:
    """Fewer Frames' loss, batch means throughout:

        CE(labelled videos) + A T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + B MSE(rep, teacher_rep)

    CE is the mean over the videos with a label >= 0 (0 when the batch has none); the KL is summed
    over classes and averaged over every video of the batch; the MSE is the mean over the batch and
    the D dims of ``rep`` (the student's representation, already projected to the teacher's width)
    against ``teacher_rep``, counted once. Returns (loss, its three terms as floats)."""
    import torch.nn.functional as F

    known = labels >= 0
    ce = F.cross_entropy(logits[known], labels[known]) if bool(known.any()) else logits.new_zeros(())
    T = float(temperature)
    kl = F.kl_div(F.log_softmax(logits / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                  reduction="batchmean", log_target=True)
    mse = F.mse_loss(rep, teacher_rep)
    loss = ce + distill_weight * T * T * kl + rep_weight * mse
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "rep": float(mse.detach())}


@dataclass
class _Teacher:
    """A frozen fitted run read from this fit's features, its sources keyed "teacher_<source>"."""

    run: Run
    model: Any  # the fitted aggregator, eval mode, no gradients
    path: str
    sha256: str
    proj: Any = None  # student width -> teacher width (nn.Linear), trained with the student, not saved
    alias: dict[str, str] = field(default_factory=dict)  # teacher source -> the batch key holding it

    def sources(self, student: dict[str, tuple[str, list[int]]]) -> tuple[dict[str, Any], dict[str, str]]:
        """(the dataset's sources: the student's and the teacher's not already read, teacher source ->
        the dataset key holding it)."""
        union, alias = dict(student), {}
        for src, spec in self.run.sources().items():
            same = [k for k, v in student.items()  # per-video draws (2-D) never equal the teacher's fixed ones
                    if np.ndim(v[1]) == 1 and (v[0], list(v[1])) == (spec[0], list(spec[1]))]
            alias[src] = same[0] if same else f"teacher_{src}"
            union.setdefault(alias[src], (spec[0], list(spec[1])))
        self.alias = alias
        return union, alias

    def record(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def _load_teacher(cfg: "FitConfig", fs: Any, device: Any) -> _Teacher:
    path = Path(cfg.teacher)
    r = Run.load(path)
    if r.adaptive:
        raise BadValue(f"--teacher {path}: an adaptive (policy) teacher is not supported; fit the teacher "
                       f"with a fixed pattern")
    missing = [name for name, _ in r.sources().values() if name not in fs.models]
    if missing:
        raise Incompatible(f"--teacher {path}: the training features {cfg.feats} lack the teacher's "
                           f"model(s) {', '.join(missing)} (they hold {', '.join(fs.models)})")
    r.check_features(fs, f"--teacher {path}: the training features {cfg.feats}")
    ckpt = path / run.CHECKPOINT if path.is_dir() else path
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    model = r.model(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return _Teacher(run=r, model=model, path=str(path), sha256=sha)


def _check_compatible(fs: Any, ref: Any, what: str, models: Sequence[str]) -> None:
    if fs.classes != ref.classes:
        raise Incompatible(f"{what} {fs.dirs}: its class list differs from the training set's")
    if fs.config != ref.config:
        raise Incompatible(f"{what} {fs.dirs}: extraction {fs.config} differs from the training set's {ref.config}")
    for m in models:
        if fs.model(m).shape != ref.model(m).shape:
            raise Incompatible(f"{what} {fs.dirs}: {m} clips are {fs.model(m).shape}, training has {ref.model(m).shape}")


@contextmanager
def _torch_settings(threads: int | None, deterministic: bool) -> Iterator[None]:
    """Set torch threads / deterministic algorithms for one fit and restore them afterwards."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _loader(ds: Any, batch_size: int, workers: int, shuffle: bool, seed: int, pin: bool) -> Any:
    """DataLoader worker processes, or (workers=0) one background reader thread with reused buffers."""
    import torch
    from torch.utils.data import DataLoader

    from faster.store.reader import ThreadedLoader

    if workers == 0:
        return ThreadedLoader(ds, batch_size, shuffle=shuffle, seed=seed, pin=pin)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      pin_memory=pin, persistent_workers=True, drop_last=False)


def input_stats(fs: Any, sources: Any, train_idx: np.ndarray, cfg: FitConfig,
                max_videos: int = 1024) -> dict[str, tuple[Any, Any]]:
    """Per source, the per-channel mean and std (float32, (C,)) of its maps over the training videos
    (a seeded sample of ``max_videos`` when there are more), every clip position and map position."""
    idx = np.sort(train_idx)
    if len(idx) > max_videos:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, max_videos, replace=False))
    ds = fs.dataset(sources, idx)
    sums: dict[str, list[Any]] = {}
    try:
        for batch in _loader(ds, cfg.batch_size, cfg.workers, False, cfg.seed, False):
            for src in ("expensive", "cheap"):
                if src not in batch:
                    continue
                x = batch[src].double().flatten(0, -2)  # (B * n * T' * H' * W', C)
                s = sums.setdefault(src, [0, 0.0, 0.0])
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + (x * x).sum(0)
    finally:
        ds.close()
    out = {}
    for src, (n, s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        out[src] = (mean.float(), var.sqrt().float())
    return out


def _inputs(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """float16 channels-last clips -> float32 (B, n, C, T', H', W') views on device (no layout copy)."""
    return {src: batch[src].to(device, non_blocking=True).float().movedim(-1, 2)
            for src in ("expensive", "cheap") if src in batch}


def _autocast(device: Any) -> Any:
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def predict_loader(model: Any, loader: Any, mask: Sequence[bool], device: Any, progress: bool = False,
                   desc: str = "predict") -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """(probs (V, K) float32, labels (V,), indices (V,), mean loss over labelled videos, expensive
    decisions (V, n) bool) in eval mode: the mask for a fixed pattern, the gate's choices for a policy."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    model.eval()
    probs, labels, indices, chosen = [], [], [], []
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            with _autocast(device):
                logits, decisions = _forward(model, _inputs(batch, device), mask)
            logits = logits.float()
            n = len(batch["label"])
            chosen.append(np.tile(np.asarray(mask, dtype=bool), (n, 1)) if decisions is None
                          else decisions.cpu().numpy() > 0.5)
            y = batch["label"].to(device)
            known = y >= 0
            if known.any():
                loss_sum += float(F.cross_entropy(logits[known], y[known], reduction="sum"))
                count += int(known.sum())
            probs.append(torch.softmax(logits, dim=-1).cpu().numpy())
            labels.append(batch["label"].numpy().copy())  # a ThreadedLoader reuses its buffers
            indices.append(batch["index"].numpy().copy())
    cat = (lambda a, shape: np.concatenate(a) if a else np.zeros(shape))
    return (cat(probs, (0, 0)).astype(np.float32), cat(labels, (0,)).astype(np.int64),
            cat(indices, (0,)).astype(np.int64), loss_sum / max(count, 1), cat(chosen, (0, len(mask))).astype(bool))


def metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """top1, top5 (fractions) and mean per-class accuracy over the labelled videos."""
    known = labels >= 0
    p, y = probs[known], labels[known]
    if not len(y):
        return {"top1": None, "top5": None, "mean_class_acc": None, "num_labelled": 0}
    k = min(5, p.shape[1])
    topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
    hit1 = topk[:, 0] == y
    hit5 = (topk == y[:, None]).any(axis=1)
    per_class = [hit1[y == c].mean() for c in np.unique(y)]
    return {"top1": float(hit1.mean()), "top5": float(hit5.mean()), "mean_class_acc": float(np.mean(per_class)),
            "num_labelled": int(len(y))}


def prediction_rows(ids: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    gflops: Any, chosen: np.ndarray | None = None,
                    cheap_everywhere: bool = False) -> Iterator[dict[str, Any]]:
    """Per-video JSON objects: id, label, probs, top5 [[class, prob], ...], gflops (one value, or one
    per video), and with ``chosen`` (V, n) each video's num_expensive and num_cheap (the clips the
    cheap backbone ran on: all of them under an adaptive policy)."""
    k = min(5, len(classes))
    for i, (vid, y, p) in enumerate(zip(ids, labels, probs)):
        top = np.argsort(-p, kind="stable")[:k]
        row = {"id": str(vid), "label": int(y), "probs": [float(v) for v in p],
               "top5": [[classes[int(c)], float(p[c])] for c in top],
               "gflops": gflops if gflops is None or np.isscalar(gflops) else float(gflops[i])}
        if chosen is not None:
            n_e = int(chosen[i].sum())
            row.update(num_expensive=n_e, num_cheap=len(chosen[i]) if cheap_everywhere else len(chosen[i]) - n_e)
            if cheap_everywhere:  # a policy's own choice for this video: which of the run's clips were expensive
                row["expensive_clips"] = [int(k) for k in np.flatnonzero(chosen[i])]
        yield row


def fit(cfg: FitConfig) -> dict[str, Any]:
    """Train ``cfg.agg`` on ``cfg.feats`` for ``cfg.pattern``; write the run directory; return result.json."""
    import torch

    from faster.aggregate.models import build
    from faster.store.reader import FeatureSet

    from faster.store import integrity

    t0 = time.perf_counter()
    cfg.validate()
    device = _device(cfg.device)
    out = Path(cfg.out)
    held_run = [name for name in (run.CONFIG, run.CHECKPOINT, run.RESULT) if (out / name).exists()]
    if held_run and not cfg.overwrite:
        raise BadValue(f"{out} already holds a run ({', '.join(held_run)}); pass --overwrite to replace it, "
                       f"or choose another -o")
    teacher_models = []
    if cfg.teacher is not None:
        teacher_models = [name for name, _ in Run.load(cfg.teacher).sources().values()]
    checked = integrity.check([*cfg.feats, *cfg.val], skip_bad=cfg.skip_bad,
                              models=list(dict.fromkeys([cfg.expensive, cfg.cheap, *teacher_models])))
    skip = {"skip_shards": checked.bad_shards, "skip_videos": checked.bad_videos}
    fs = FeatureSet(cfg.feats, **skip)
    plan = make_plan(fs, agg=cfg.agg, expensive=cfg.expensive, cheap=cfg.cheap, pattern=cfg.pattern,
                     num_clips=cfg.num_clips, num_classes=len(fs.classes), dropout=cfg.dropout, budget=cfg.budget,
                     extra_kwargs=cfg.agg_options)
    teacher = _load_teacher(cfg, fs, device) if cfg.teacher is not None else None
    used = [m for m, _ in plan.sources.values()]
    pooled = sorted(m for m in set(used) if fs.model(m).attrs.get("spatial_pool"))
    if pooled and not aggregator_class(cfg.agg).pooled:
        log.warning("%s were extracted with --spatial-pool: %s runs on a 1 x 1 grid of them (a pooled aggregator, "
                    "e.g. gru, lstm, netvlad, loses nothing)", ", ".join(pooled), cfg.agg)
    if (fs.labels >= len(fs.classes)).any():
        raise BadValue(f"{cfg.feats}: labels beyond the {len(fs.classes)} classes")
    labelled = fs.labels >= 0
    taught = labelled if teacher is None else np.ones_like(labelled)  # a teacher teaches through unlabelled videos
    if cfg.val:
        vs = FeatureSet(cfg.val, **skip)
        _check_compatible(vs, fs, "validation set", used)
        train_idx = np.flatnonzero(taught)
        val_idx = np.flatnonzero(vs.labels >= 0)
    else:
        vs = fs
        held = holdout(fs.ids, cfg.val_fraction)
        train_idx, val_idx = np.flatnonzero(taught & ~(labelled & held)), np.flatnonzero(labelled & held)
    if not (labelled[train_idx].any() if teacher is None else len(train_idx)):
        raise BadValue(f"{cfg.feats}: no labelled training videos")
    if not len(val_idx):
        raise BadValue("no labelled validation videos: give val feature sets or a larger val_fraction")
    if (~labelled).any() and teacher is None:
        log.warning("%d unlabelled videos are left out of training", int((~labelled).sum()))

    created = not out.exists()
    for name in RUN_FILES:  # --overwrite: the old run's files go; nothing else in the directory is touched
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        config = _config_record(cfg, teacher)
        files.write_json(out / run.CONFIG, config)

        with _torch_settings(cfg.threads, deterministic=device.type == "cpu"):
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            model = build(cfg.agg, **plan.agg_kwargs).to(device)
            aggregator = model
            if cfg.pattern == patterns.ADAPTIVE:
                from faster.aggregate.policy import Policy

                model = Policy(aggregator, budget=cfg.budget).to(device)
            pin = device.type == "cuda"
            params = list(model.parameters())
            if teacher is not None:
                aggregator.eval()  # state_width folds a zero clip: no BN statistics may move
                width, teacher_width = aggregator.state_width(), teacher.model.state_width()
                aggregator.train()
                if width != teacher_width:
                    teacher.proj = torch.nn.Linear(width, teacher_width).to(device)
                    params += list(teacher.proj.parameters())
            train_ds = fs.dataset(_train_sources(plan.sources, teacher), train_idx)
            val_ds = vs.dataset(plan.sources, val_idx)
            if cfg.standardize:
                for src, (mean, std) in input_stats(fs, plan.sources, train_idx, cfg).items():
                    aggregator.set_input_stats(src, mean.to(device), std.to(device))
            if cfg.init_centres:
                descriptors = training_descriptors(aggregator, fs, plan, train_idx, cfg, device)
                aggregator.init_centres(descriptors, seed=cfg.seed)
            train_loader = _loader(train_ds, cfg.batch_size, cfg.workers, True, cfg.seed, pin)
            val_loader = _loader(val_ds, cfg.batch_size, cfg.workers, False, cfg.seed, pin)
            opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                   if cfg.optimizer == "adamw" else
                   torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(train_loader))
            best: dict[str, Any] = {}
            for epoch in range(1, cfg.epochs + 1):
                t_epoch = time.perf_counter()
                drawn = None
                if cfg.train_clips == "jitter":  # this epoch's draw per video; the pattern applies to each
                    drawn = jitter_positions(plan.num_extracted, len(plan.positions),
                                             np.random.default_rng([cfg.seed, epoch]), videos=len(train_idx))
                    train_ds.close()
                    train_ds = fs.dataset(_train_sources(_sources_at(cfg, plan, drawn), teacher), train_idx)
                    train_loader = _loader(train_ds, cfg.batch_size, cfg.workers, True, cfg.seed + epoch, pin)
                train_loss = _train_epoch(model, train_loader, opt, sched, plan.mask, device, cfg, epoch, teacher)
                t_train = time.perf_counter() - t_epoch
                probs, labels, indices, val_loss, chosen = predict_loader(
                    model, val_loader, plan.mask, device, cfg.progress, f"val {epoch}/{cfg.epochs}")
                m = metrics(probs, labels)
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "top1": m["top1"],
                       "top5": m["top5"], "mean_class_acc": m["mean_class_acc"], "lr": opt.param_groups[0]["lr"],
                       "num_expensive_mean": float(chosen.sum(1).mean()) if len(chosen) else None,
                       "train_seconds": round(t_train, 3), "seconds": round(time.perf_counter() - t_epoch, 3)}
                if drawn is not None:  # how varied the draws were: distinct rows, and the first video's
                    row["train_positions_distinct"] = int(len(np.unique(drawn, axis=0)))
                    row["train_positions_first"] = drawn[0].tolist() if len(drawn) else []
                files.append_jsonl(out / run.METRICS, row)
                log.info("epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.4f, top-5 %.4f", epoch, cfg.epochs,
                         train_loss, val_loss, m["top1"], m["top5"])
                if not best or m["top1"] > best["top1"]:
                    best = {"epoch": epoch, "top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"]}
            train_ds.close()
            val_ds.close()

        fitted = make_run(cfg, fs, plan, model, config)
        fitted.save(out)
        per_video = fitted.videos_gflops(chosen)
        files.write_jsonl(out / run.VAL_PREDICTIONS, prediction_rows(
            vs.ids[indices], labels, probs, fs.classes, per_video, chosen, cheap_everywhere=fitted.adaptive))
        n_e = float(chosen.sum(1).mean()) if len(chosen) else 0.0
        result = {"top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"], "best": best,
                  "gflops_per_video": None if per_video is None else float(np.mean(per_video)),
                  "aggregator_gflops": plan.gflops["aggregator"],
                  "num_expensive": sum(plan.mask) if not fitted.adaptive else n_e,
                  "num_cheap": len(plan.mask) - sum(plan.mask) if not fitted.adaptive else len(plan.positions),
                  "num_expensive_mean": n_e, "budget": cfg.budget, "agg": cfg.agg, "pattern": cfg.pattern,
                  "num_clips": len(plan.positions), "clip_len": fs.config["clip_len"], "expensive": cfg.expensive,
                  "cheap": cfg.cheap, "num_train": int(len(train_idx)), "num_val": int(len(val_idx)),
                  "join": fs.join, "skipped": {"shards": checked.bad_shards, "videos": checked.bad_videos},
                  "train_clips": cfg.train_clips, "agg_options": dict(cfg.agg_options),
                  "teacher": None if teacher is None else teacher.record(),
                  **({} if teacher is None else {"distill_weight": cfg.distill_weight, "rep_weight": cfg.rep_weight,
                                                  "temperature": cfg.temperature,
                                                  "num_unlabelled_train": int((~labelled[train_idx]).sum())}),
                  "seconds": round(time.perf_counter() - t0, 3)}
        files.write_json(out / run.RESULT, result)
        log.info("fit %s %s n=%d: top-1 %.4f top-5 %.4f, %.1f GFLOPs/video, %.1f s", cfg.agg, cfg.pattern,
                 len(plan.positions), result["top1"], result["top5"], result["gflops_per_video"] or math.nan,
                 result["seconds"])
    except BaseException:  # interrupted or failed: no half run is left that looks like one
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return result


def _train_epoch(model: Any, loader: Any, opt: Any, sched: Any, mask: Sequence[bool], device: Any,
                 cfg: FitConfig, epoch: int, teacher: _Teacher | None = None) -> float:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from faster.aggregate import policy

    model.train()
    if teacher is not None and teacher.proj is not None:
        teacher.proj.train()
    total, count = 0.0, 0
    adaptive = isinstance(model, policy.Policy)
    tau = policy.temperature(epoch, cfg.epochs) if adaptive else None
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not cfg.progress)
    for batch in bar:
        y = batch["label"].to(device, non_blocking=True)
        if teacher is None:
            with _autocast(device):
                logits, decisions = _forward(model, _inputs(batch, device), mask, tau)
            loss = F.cross_entropy(logits.float(), y)
        else:
            tx = {src: batch[key].to(device, non_blocking=True).float().movedim(-1, 2) for src, key in teacher.alias.items()}
            with _autocast(device):
                logits, rep = logits_and_representation(model, _inputs(batch, device), mask)
                with torch.no_grad():
                    t_logits, t_rep = logits_and_representation(teacher.model, tx, teacher.run.mask)
                if teacher.proj is not None:
                    rep = teacher.proj(rep)
            loss, _ = distillation_loss(logits.float(), y, t_logits.float(), rep.float(), t_rep.float(),
                                        distill_weight=cfg.distill_weight, rep_weight=cfg.rep_weight,
                                        temperature=cfg.temperature)
        if adaptive:
            loss = loss + model.penalty(decisions, policy.PENALTY)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _train_sources(student: dict[str, Any], teacher: _Teacher | None) -> dict[str, Any]:
    """The training dataset's sources: the student's, plus the teacher's it does not read already."""
    return student if teacher is None else teacher.sources(student)[0]


def _sources_at(cfg: FitConfig, plan: Plan, positions: Any) -> dict[str, Any]:
    """The student's sources at drawn clip ``positions``, one row per training video (the pattern, or
    a policy's both maps, over each row)."""
    if cfg.pattern == patterns.ADAPTIVE:
        from faster.aggregate import policy

        return policy.sources(positions, cfg.expensive, cfg.cheap)
    return patterns.sources(positions, plan.mask, cfg.expensive, cfg.cheap)


def _config_record(cfg: FitConfig, teacher: _Teacher | None) -> dict[str, Any]:
    """config.json: the FitConfig, its teacher as {path, sha256 of its checkpoint.pt}."""
    config = asdict(cfg)
    if teacher is not None:
        config["teacher"] = teacher.record()
    return config


def training_descriptors(aggregator: Any, fs: Any, plan: Plan, train_idx: np.ndarray, cfg: FitConfig, device: Any,
                         max_descriptors: int = MAX_CENTRE_DESCRIPTORS) -> Any:
    """(M, D), M <= ``max_descriptors``: what a VLAD's clusters see (``aggregator.descriptors``) on
    training videos in a seeded order, after the input standardisation; for ``init_centres``. An
    adaptive run clusters the expensive maps (it reads both at every position)."""
    import torch

    adaptive = cfg.pattern == patterns.ADAPTIVE
    sources = {"expensive": plan.sources["expensive"]} if adaptive else plan.sources
    mask = [True] * len(plan.positions) if adaptive else plan.mask
    ds = fs.dataset(sources, train_idx)
    chunks, count = [], 0
    try:
        with torch.no_grad():
            for batch in _loader(ds, cfg.batch_size, cfg.workers, True, cfg.seed, False):
                d = aggregator.descriptors(_inputs(batch, device), mask)  # (B, N*P, D)
                chunks.append(d.reshape(-1, d.shape[-1]).float().cpu())
                count += chunks[-1].shape[0]
                if count >= max_descriptors:
                    break
    finally:
        ds.close()
    d = torch.cat(chunks)
    if len(d) > max_descriptors:
        keep = torch.randperm(len(d), generator=torch.Generator().manual_seed(cfg.seed))[:max_descriptors]
        d = d[keep]
    log.info("init_centres: k-means of %d clusters on %d training descriptors", aggregator.clusters, len(d))
    return d


def make_run(cfg: FitConfig, fs: Any, plan: Plan, model: Any, config: dict[str, Any] | None = None) -> Run:
    """The fitted run: everything predict needs to rebuild the aggregator and sample frames as extraction did."""
    import torch

    from faster import __version__

    models = {}
    for name in dict.fromkeys([cfg.expensive, cfg.cheap]):
        if name in fs.models:
            info = fs.models[name]
            models[name] = {"shape": list(info.shape), **info.attrs}
    from faster.aggregate.policy import PENALTY, Policy

    gate = None
    if isinstance(model, Policy):
        gate = {"budget": model.budget, "hidden": model.gate.fc1.out_features, "penalty": PENALTY,
                "state_dict": {k: v.detach().cpu() for k, v in model.gate.state_dict().items()}}
        model = model.aggregator
    return Run(config=asdict(cfg) if config is None else config, agg=cfg.agg, agg_kwargs=plan.agg_kwargs, policy=gate,
               state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, classes=list(fs.classes),
               expensive=cfg.expensive, cheap=cfg.cheap, models=models, extraction=dict(fs.config),
               positions=list(plan.positions), pattern=cfg.pattern, mask=list(plan.mask), gflops=dict(plan.gflops),
               software_version=__version__, torch_version=str(torch.__version__))


def evaluate(run_dir: str | Path, feats: list[str], out: str | None = None, *, batch_size: int | None = None,
             workers: int | None = None, device: str | None = None, progress: bool = True,
             skip_bad: bool = False) -> dict[str, Any]:
    """Score a fitted run on ``feats``; write per-video predictions (default RUN/predictions.jsonl);
    return the metrics over the labelled videos (top1, top5, mean_class_acc) and the counts."""
    from faster.store.reader import FeatureSet

    t0 = time.perf_counter()
    from faster.store import integrity

    r = Run.load(run_dir)
    dev = _device(device or "auto")
    model = r.model(dev)
    checked = integrity.check(feats, skip_bad=skip_bad, models=[name for name, _ in r.sources().values()])
    fs = FeatureSet(feats, skip_shards=checked.bad_shards, skip_videos=checked.bad_videos)
    r.check_features(fs, str(feats))
    ds = fs.dataset(r.sources())
    pin = dev.type == "cuda"
    loader = _loader(ds, batch_size or r.config["batch_size"], r.config["workers"] if workers is None else workers,
                     False, r.config["seed"], pin)
    probs, labels, indices, loss, chosen = predict_loader(model, loader, r.mask, dev, progress, "evaluate")
    ds.close()
    gflops = r.videos_gflops(chosen)
    path = Path(out) if out else Path(run_dir) / run.PREDICTIONS
    files.write_jsonl(path, prediction_rows(fs.ids[indices], labels, probs, r.classes, gflops, chosen,
                                            cheap_everywhere=r.adaptive))
    result = {**metrics(probs, labels), "loss": loss, "num_videos": int(len(indices)),
              "gflops_per_video": None if gflops is None or not len(gflops) else float(np.mean(gflops)),
              "num_expensive_mean": float(chosen.sum(1).mean()) if len(chosen) else None,
              "agg": r.agg, "pattern": r.pattern, "num_clips": r.num_clips, "predictions": str(path),
              "skipped": {"shards": checked.bad_shards, "videos": checked.bad_videos},
              "seconds": round(time.perf_counter() - t0, 3)}
    log.info("evaluate %s: %d videos, top-1 %s", run_dir, len(indices), result["top1"])
    return result
