"""`faster fit`: train an aggregator on cached clip features (paper, "Setups for learning to
aggregate": the backbones are fixed; only the aggregator is trained, with a cosine schedule).

``fit(FitConfig)`` is three jobs, each given the few values it needs:

1. data preparation (:func:`prepare`): the checks, the feature sets, the plan (which clips each
   source reads under the schedule, aggregate/schedule.py), the teacher, the train/val split;
2. the training engine (faster/engine.py): the optimiser, the cosine schedule, DDP under
   torchrun, a training state after every epoch and exact ``--resume``;
3. writing the run (aggregate/run.py) and its validation predictions (aggregate/evaluation.py).

No backbone, torchvision or decord is imported. Options beyond the paper (docs/aggregators.md):
``agg_options`` (constructor overrides, e.g. a netvlad's clusters), ``init_centres`` (k-means VLAD
centres from the training descriptors), ``train_clips="jitter"`` (one random clip per segment, per
video and epoch, as TSN-style training samples them) and ``teacher`` (Fewer Frames distillation: a
frozen fitted run teaches the student through a KL term on softened predictions and a squared error
on the final representations, also on unlabelled videos), ``order`` (the clips folded in temporal or
coarse-to-fine order) and ``early_exit`` with ``exit_budget`` (a loss after every step, then the
exit's thresholds calibrated on the training videos: aggregate/exit.py).

Cost per video (docs/format.md "Patterns"): the schedule's ``costs`` from the per-clip GFLOPs the
shards record and the aggregator's own multiply-adds, counted on meta tensors.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faster.aggregate import check_dropout, data, evaluation, get as aggregator_class, patterns, run, schedule
from faster.aggregate.run import Run
from faster.errors import BadValue, Incompatible
from faster.runtime import check_dtype, resolve_device, resolve_dtype
from faster.store import files
from faster.store.header import check_compatible

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
MAX_CENTRE_DESCRIPTORS = 100_000  # init_centres: k-means on at most this many training descriptors
RUN_FILES = (run.CONFIG, run.TRAINING_STATE, run.CHECKPOINT, run.METRICS, run.RESULT, run.VAL_PREDICTIONS)
# config keys that may differ when a fit is resumed (how it runs, not what it computes)
RESUME_FREE = ("resume", "overwrite", "progress", "threads", "workers", "device")


@dataclass
class FitConfig:
    """Everything a fit depends on; stored in config.json and in the checkpoint."""

    feats: list[str]  # training feature-set directories (parts pooled, different models joined by id)
    out: str  # run directory to write
    agg: str  # aggregator name: avg, concat, lstm, gru, fastgru (faster.aggregate.names())
    expensive: str  # model name of the expensive features (True positions of the pattern)
    cheap: str  # model name of the cheap features (False positions)
    pattern: str  # a schedule (aggregate/schedule.py): all-e, all-c, first, 1:N, or adaptive with a budget
    budget: float | None = None  # adaptive: the target fraction of clips that also get the expensive map, (0, 1]
    num_clips: int | None = None  # use n of the N extracted clips (positions subset_positions(N, n)); None: all
    val: list[str] = field(default_factory=list)  # validation feature sets; empty: hold out val_fraction of feats
    epochs: int = 10  # passes over the training videos
    batch_size: int = 32  # videos per step and process (under torchrun the global batch is it x the world size)
    lr: float = 1e-3  # peak learning rate (cosine decay to 0 over all steps)
    weight_decay: float = 1e-4  # decoupled (AdamW) or L2 (SGD) weight decay
    dropout: float = 0.5  # before the final fully-connected layer
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9)
    seed: int = 0  # model init, shuffling and dropout
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    dtype: str = "auto"  # the training forward: fp32, or bf16 autocast (weights, optimiser, losses stay fp32);
    #                      auto: bf16 where the device computes it natively (faster/runtime.py), as extract
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
    resume: bool = False  # continue the interrupted fit in ``out`` from its last finished epoch
    order: str | None = None  # the order the clips are folded in: temporal or coarse-to-fine (aggregate/schedule.py);
    #                           None: coarse-to-fine with an early exit, temporal otherwise (resolved by validate)
    early_exit: bool = False  # stop reading a video once its prediction is sure enough (aggregate/exit.py)
    exit_budget: float | None = None  # early_exit: F in (0, 1], the mean fraction of a video's clips to read
    exit_mode: str = "threshold"  # early_exit: threshold (calibrated confidence per step) or gate (learned)

    def validate(self) -> None:
        """Check every value that needs no data; ValueError naming the bad one."""
        from faster.aggregate import names

        if not self.feats:
            raise BadValue("no training feature set given")
        if self.agg not in names():
            raise BadValue(f"unknown aggregator {self.agg!r}; expected one of {', '.join(names())}")
        if self.num_clips is not None and self.num_clips < 1:
            raise BadValue(f"num_clips must be >= 1, got {self.num_clips}")
        schedule.check(self.pattern, self.budget, self.num_clips)
        if self.early_exit:
            schedule.check_exit_budget(self.exit_budget)
        elif self.exit_budget is not None:
            raise BadValue(f"--exit-budget {self.exit_budget} is for --early-exit")
        schedule.check_exit(self.exit_mode)
        self.order = schedule.resolve_order(self.order, self.early_exit)
        if self.optimizer not in OPTIMIZERS:
            raise BadValue(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1), ("workers", self.workers, 0)):
            if value < low:
                raise BadValue(f"{name} must be >= {low}, got {value}")
        if not self.lr > 0:
            raise BadValue(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise BadValue(f"weight_decay must be >= 0, got {self.weight_decay}")
        check_dropout(self.dropout)
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
        if self.train_clips not in data.TRAIN_CLIPS:
            raise BadValue(f"unknown train_clips {self.train_clips!r}; expected one of {', '.join(data.TRAIN_CLIPS)}")
        if self.teacher is not None:
            # without --num-clips: any count the pattern accepts (1:1 needs an even one); distillable is per kind
            n = self.num_clips or next((k for k in range(1, 65) if patterns.is_valid(self.pattern, k)), 1)
            if not self.schedule(n).distillable:
                raise BadValue(f"--teacher with --pattern {self.pattern} is not supported: distil into a "
                               f"fixed-pattern student")
            for name, value in (("distill_weight", self.distill_weight), ("rep_weight", self.rep_weight)):
                if not value >= 0:
                    raise BadValue(f"{name} must be >= 0, got {value}")
            if not self.temperature > 0:
                raise BadValue(f"temperature must be > 0, got {self.temperature}")
        check_dtype(self.dtype)
        resolve_device(self.device)

    def schedule(self, num_clips: int) -> Any:
        """The schedule of this fit over ``num_clips`` clips (aggregate/schedule.py)."""
        return schedule.create(self.pattern, num_clips, self.budget, order=self.order,
                               exit_budget=self.exit_budget if self.early_exit else None, exit_mode=self.exit_mode)

    def settings(self, device: Any = None) -> Any:
        """The training engine's settings (faster/engine.py): the optimiser, the cosine schedule and the
        precision, ``dtype`` resolved on ``device`` (None: the CPU)."""
        import torch

        from faster.engine import Settings

        bf16 = resolve_dtype(self.dtype, torch.device(device or "cpu")) == "bfloat16"
        return Settings(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, optimizer=self.optimizer,
                        momentum=0.9, precision="bf16" if bf16 else "fp32")


def agg_option_keys(agg: str) -> list[str]:
    """The constructor options of aggregator ``agg`` that --agg-option may set (all but num_classes,
    sources and dropout, which fit sets)."""
    import inspect

    from faster.aggregate import get

    params = inspect.signature(get(agg).__init__).parameters
    return [k for k, p in params.items()
            if p.kind == p.KEYWORD_ONLY and k not in ("num_classes", "sources", "dropout")]


@dataclass
class FitPlan:
    """What a fit reads and builds: clip positions, the schedule, sources, aggregator kwargs, cost."""

    num_extracted: int
    positions: list[int]  # the N-clip indices used, subset_positions(N, n)
    schedule: Any  # aggregate/schedule.py
    sources: dict[str, tuple[str, list[int]]]  # source -> (model, extracted clip positions)
    agg_kwargs: dict[str, Any]
    gflops: dict[str, Any]

    @property
    def mask(self) -> list[bool]:
        """The fixed expensive mask over the used clips ([] when the schedule chooses per video)."""
        return self.schedule.mask()


def make_plan(fs: Any, *, agg: str, expensive: str, cheap: str, pattern: str, num_clips: int | None,
              num_classes: int, dropout: float, extra_kwargs: dict[str, Any] | None = None,
              budget: float | None = None, order: str | None = None, exit_budget: float | None = None,
              exit_mode: str = "threshold") -> FitPlan:
    """Positions, schedule and sources of ``pattern`` on feature set ``fs``; ValueError before any read."""
    N = int(fs.config["num_clips"])
    n = N if num_clips is None else int(num_clips)
    positions = patterns.subset_positions(N, n)
    plan_schedule = schedule.create(pattern, n, budget, order=order, exit_budget=exit_budget, exit_mode=exit_mode)
    sources = plan_schedule.sources(positions, expensive, cheap)
    shapes = {src: fs.model(model).channels_first for src, (model, _) in sources.items()}
    kwargs = {"num_classes": int(num_classes), "sources": shapes, "dropout": float(dropout), **(extra_kwargs or {})}
    per_clip = {src: fs.model(model).attrs.get("gflops_per_clip") for src, (model, _) in sources.items()}
    costs = plan_schedule.costs(agg, kwargs, per_clip)
    if costs["per_video"] is None:
        log.warning("a shard lacks gflops_per_clip: the video cost leaves the backbones out")
    return FitPlan(N, positions, plan_schedule, sources, kwargs, costs)


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


def _load_teacher(cfg: FitConfig, fs: Any, device: Any) -> _Teacher:
    path = Path(cfg.teacher)
    r = Run.load(path)
    if not r.schedule.distillable:
        raise BadValue(f"--teacher {path}: a teacher fitted with pattern {r.pattern} is not supported; fit the "
                       f"teacher with a fixed pattern")
    missing = [name for name, _ in r.sources().values() if name not in fs.models]
    if missing:
        raise Incompatible(f"--teacher {path}: the training features {cfg.feats} lack the teacher's "
                           f"model(s) {', '.join(missing)} (they hold {', '.join(fs.models)})")
    r.check_features(fs, f"--teacher {path}: the training features {cfg.feats}")
    ckpt = path / run.CHECKPOINT if path.is_dir() else path
    sha = files.sha256_file(ckpt)
    model = r.model(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return _Teacher(run=r, model=model, path=str(path), sha256=sha)


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


def _fit_step_class() -> Any:
    """The module the engine trains: the schedule's module (student) and, when taught, the
    projection of its representation to the teacher's width. Its forward returns the loss, so that
    under torchrun DDP sees every parameter the loss uses."""
    from torch import nn

    class FitStep(nn.Module):
        def __init__(self, plan_schedule: Any, student: Any, proj: Any, cfg: FitConfig):
            super().__init__()
            self.schedule, self.student, self.proj = plan_schedule, student, proj
            self.weights = (cfg.distill_weight, cfg.rep_weight, cfg.temperature)

        def forward(self, x: dict[str, Any], y: Any, tau: float | None = None, taught: Any = None) -> Any:
            if taught is None:  # the schedule's loss: CE + its penalty (an exit: CE after every step)
                return self.schedule.loss(self.student, x, y, tau)
            logits, rep = self.schedule.forward_with_state(self.student, x)
            if self.proj is not None:
                rep = self.proj(rep)
            t_logits, t_rep = taught
            a, b, temperature = self.weights
            loss, _ = distillation_loss(logits.float(), y, t_logits.float(), rep.float(), t_rep.float(),
                                        distill_weight=a, rep_weight=b, temperature=temperature)
            return loss

    return FitStep


def training_descriptors(aggregator: Any, fs: Any, plan: FitPlan, train_idx: np.ndarray, cfg: FitConfig, device: Any,
                         max_descriptors: int = MAX_CENTRE_DESCRIPTORS) -> Any:
    """(M, D), M <= ``max_descriptors``: what a VLAD's clusters see (``aggregator.descriptors``) on
    training videos in a seeded order, after the input standardisation; for ``init_centres``. The
    schedule says which maps (a policy reads both at every position: the expensive ones)."""
    import torch

    sources, mask = plan.schedule.descriptor_view(plan.sources)
    ds = fs.dataset(sources, train_idx)
    chunks, count = [], 0
    try:
        with torch.no_grad():
            for batch in data.loader(ds, cfg.batch_size, cfg.workers, shuffle=True, seed=cfg.seed):
                d = aggregator.descriptors(data.inputs(batch, device), mask)  # (B, N*P, D)
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


def make_run(cfg: FitConfig, fs: Any, plan: FitPlan, module: Any, config: dict[str, Any] | None = None) -> Run:
    """The fitted run: everything predict needs to rebuild the aggregator and sample frames as extraction did."""
    import torch

    from faster import __version__

    models = {}
    for name in dict.fromkeys([cfg.expensive, cfg.cheap]):
        if name in fs.models:
            info = fs.models[name]
            models[name] = {"shape": list(info.shape), **info.attrs}
    aggregator = plan.schedule.aggregator(module)
    return Run(config=asdict(cfg) if config is None else config, agg=cfg.agg, agg_kwargs=plan.agg_kwargs,
               policy=plan.schedule.record(module),
               state_dict={k: v.detach().cpu() for k, v in aggregator.state_dict().items()}, classes=list(fs.classes),
               expensive=cfg.expensive, cheap=cfg.cheap, models=models, extraction=dict(fs.config),
               positions=list(plan.positions), pattern=cfg.pattern, mask=plan.mask, gflops=dict(plan.gflops),
               software_version=__version__, torch_version=str(torch.__version__))


# ------------------------------------------------------------------------------------------- fit


@dataclass
class _Prepared:
    """The data side of a fit, checked before anything is written."""

    fs: Any  # training feature set
    vs: Any  # validation feature set (fs itself when held out)
    plan: FitPlan
    train_idx: np.ndarray
    val_idx: np.ndarray
    labelled: np.ndarray
    teacher: _Teacher | None
    skipped: dict[str, list[str]]


def prepare(cfg: FitConfig, device: Any) -> _Prepared:
    """Every check that needs the data, the plan, the teacher and the split; nothing is written."""
    from faster.store import integrity
    from faster.store.reader import FeatureSet

    teacher_models = []
    if cfg.teacher is not None:
        teacher_models = [name for name, _ in Run.load(cfg.teacher).sources().values()]
    checked = integrity.check([*cfg.feats, *cfg.val], skip_bad=cfg.skip_bad,
                              models=list(dict.fromkeys([cfg.expensive, cfg.cheap, *teacher_models])))
    skip = {"skip_shards": checked.bad_shards, "skip_videos": checked.bad_videos}
    fs = FeatureSet(cfg.feats, **skip)
    plan = make_plan(fs, agg=cfg.agg, expensive=cfg.expensive, cheap=cfg.cheap, pattern=cfg.pattern,
                     num_clips=cfg.num_clips, num_classes=len(fs.classes), dropout=cfg.dropout, budget=cfg.budget,
                     extra_kwargs=cfg.agg_options, order=cfg.order,
                     exit_budget=cfg.exit_budget if cfg.early_exit else None, exit_mode=cfg.exit_mode)
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
        check_compatible(vs, classes=fs.classes, config=fs.config, shapes={m: fs.model(m).shape for m in used},
                         weights={m: fs.model(m).attrs.get("weights") for m in used},
                         what=f"validation set {vs.dirs}", reference=f"the training set {fs.dirs}")
        train_idx = np.flatnonzero(taught)
        val_idx = np.flatnonzero(vs.labels >= 0)
    else:
        vs = fs
        held = data.holdout(fs.ids, cfg.val_fraction)
        train_idx, val_idx = np.flatnonzero(taught & ~(labelled & held)), np.flatnonzero(labelled & held)
    if not (labelled[train_idx].any() if teacher is None else len(train_idx)):
        raise BadValue(f"{cfg.feats}: no labelled training videos")
    if not len(val_idx):
        raise BadValue("no labelled validation videos: give val feature sets or a larger val_fraction")
    if (~labelled).any() and teacher is None:
        log.warning("%d unlabelled videos are left out of training", int((~labelled).sum()))
    return _Prepared(fs, vs, plan, train_idx, val_idx, labelled, teacher,
                     {"shards": checked.bad_shards, "videos": checked.bad_videos})


def _put_aside(out: Path) -> None:
    """Before a new fit writes OUT: a finished run there (--overwrite) moves to OUT/.previous, where it
    stays until the new fit completes (an interrupted one leaves it there, and a failure before the
    first epoch is saved puts it back); a half run's files are removed. result.json moves first and
    comes back last, so OUT never holds a complete-looking mixture."""
    previous = out / run.PREVIOUS
    if (out / run.RESULT).exists():
        shutil.rmtree(previous, ignore_errors=True)  # an older replaced run: this finished one is newer
        previous.mkdir(parents=True)
        for name in sorted(RUN_FILES, key=lambda n: n != run.RESULT):  # result.json first
            if (out / name).exists():
                (out / name).replace(previous / name)
        log.info("%s: the finished run there is kept in %s until this fit completes", out, previous)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _restore(out: Path) -> None:
    """Put a run :func:`_put_aside` moved to OUT/.previous back into OUT (result.json last)."""
    previous = out / run.PREVIOUS
    if not (previous / run.RESULT).exists():
        return
    for name in sorted(RUN_FILES, key=lambda n: n == run.RESULT):  # result.json last
        if (previous / name).exists():
            (previous / name).replace(out / name)
    shutil.rmtree(previous, ignore_errors=True)


def _check_out(cfg: FitConfig, config: dict[str, Any]) -> bool:
    """Whether the fit resumes an interrupted one in ``cfg.out`` (faster.engine.check_run_dir)."""
    from faster.engine import check_run_dir

    return check_run_dir(cfg.out, config, resume=cfg.resume, overwrite=cfg.overwrite, done=run.RESULT,
                         partial=(run.CONFIG, run.TRAINING_STATE, run.METRICS, run.CHECKPOINT),
                         state=run.TRAINING_STATE, free=RESUME_FREE, what="fit",
                         defaults={"dtype": "auto"})  # fits interrupted before --dtype existed resume


def fit(cfg: FitConfig, *, dist: Any = None) -> dict[str, Any]:
    """Train ``cfg.agg`` on ``cfg.feats`` under ``cfg.pattern``; write the run directory; return result.json.

    ``dist``: the processes of this fit (faster.engine.Distributed); default: torchrun's
    environment, one process without it. `faster ablate` passes one process for every cell."""
    import torch

    from faster.aggregate.models import build
    from faster.engine import Distributed, Engine

    t0 = time.perf_counter()
    cfg.validate()
    dist = Distributed.from_env() if dist is None else dist
    device = resolve_device(cfg.device, dist.local_rank)
    out = Path(cfg.out)
    prep = prepare(cfg, device)
    plan, fs, vs, teacher = prep.plan, prep.fs, prep.vs, prep.teacher
    config = _config_record(cfg, teacher)
    dist.start(device)
    resuming = bool(dist.decide(lambda: _check_out(cfg, config), (BadValue, Incompatible)))
    created = not out.exists()
    written = False  # a training state exists: an interruption from here on leaves a resumable run
    try:
        if dist.main:
            if not resuming:  # a new fit (or --overwrite): a finished run waits in OUT/.previous until it completes
                _put_aside(out)
            out.mkdir(parents=True, exist_ok=True)
            files.write_json(out / run.CONFIG, config)
        dist.barrier()
        FitStep = _fit_step_class()
        with _torch_settings(cfg.threads, deterministic=device.type == "cpu"):
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            aggregator = build(cfg.agg, **plan.agg_kwargs).to(device)
            student = plan.schedule.wrap(aggregator).to(device)
            proj = None
            if teacher is not None:
                aggregator.eval()  # state_width folds a zero clip: no BN statistics may move
                width, teacher_width = aggregator.state_width(), teacher.model.state_width()
                aggregator.train()
                if width != teacher_width:
                    proj = torch.nn.Linear(width, teacher_width).to(device)
            if not resuming:
                if cfg.standardize:
                    for src, (mean, std) in data.input_stats(fs, plan.sources, prep.train_idx,
                                                             batch_size=cfg.batch_size, workers=cfg.workers,
                                                             seed=cfg.seed).items():
                        aggregator.set_input_stats(src, mean.to(device), std.to(device))
                if cfg.init_centres:
                    aggregator.init_centres(training_descriptors(aggregator, fs, plan, prep.train_idx, cfg, device),
                                            seed=cfg.seed)
            torch.manual_seed(cfg.seed + dist.rank)  # dropout and sampling differ between the ranks
            module = FitStep(plan.schedule, student, proj, cfg)
            per_rank = len(dist.shard(np.arange(len(prep.train_idx))))
            settings = cfg.settings(device)
            log.info("training forward in %s (--dtype %s) on %s", settings.precision, cfg.dtype, device)
            engine = Engine(module, settings, device=device, steps_per_epoch=math.ceil(per_rank / cfg.batch_size),
                            dist=dist, state_path=out / run.TRAINING_STATE, metrics_path=out / run.METRICS,
                            progress=cfg.progress, find_unused=True)
            first, best = 1, {}
            if resuming:
                done, extra = engine.resume()
                first, best = done + 1, extra.get("best", {})
                log.info("resuming %s after epoch %d of %d", out, done, cfg.epochs)
            written = resuming
            scored = None
            for epoch in range(first, cfg.epochs + 1):
                t_epoch = time.perf_counter()
                batches, drawn, ds = _epoch_batches(cfg, prep, dist, epoch, device)
                tau = plan.schedule.temperature(epoch, cfg.epochs)
                try:
                    stats = engine.train_epoch(epoch, batches, _step_fn(teacher, device, tau))
                finally:
                    ds.close()
                row = {}
                if dist.main:
                    scored = _validate(student, plan, vs, prep.val_idx, cfg, device, f"val {epoch}/{cfg.epochs}")
                    probs, labels, _, val_loss, chosen = scored
                    m = evaluation.metrics(probs, labels)
                    row = {"train_loss": stats["train_loss"], "val_loss": val_loss, "top1": m["top1"],
                           "top5": m["top5"], "mean_class_acc": m["mean_class_acc"], "lr": stats["lr"],
                           "num_expensive_mean": float((chosen == 1).sum(1).mean()) if len(chosen) else None,
                           "clips_seen_mean": float((chosen >= 0).sum(1).mean()) if len(chosen) else None,
                           "steps": stats["steps"], "data_wait": stats["data_wait"],
                           "train_seconds": stats["train_seconds"], "seconds": round(time.perf_counter() - t_epoch, 3)}
                    if drawn is not None:  # how varied the draws were: distinct rows, and the first video's
                        row["train_positions_distinct"] = int(len(np.unique(drawn, axis=0)))
                        row["train_positions_first"] = drawn[0].tolist() if len(drawn) else []
                    log.info("epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.4f, top-5 %.4f", epoch,
                             cfg.epochs, stats["train_loss"], val_loss, m["top1"], m["top5"])
                    if not best or m["top1"] > best["top1"]:
                        best = {"epoch": epoch, "top1": m["top1"], "top5": m["top5"],
                                "mean_class_acc": m["mean_class_acc"]}
                engine.end_epoch(epoch, row, {"best": best})
                written = True
            # after training, on the training videos: what the schedule calibrates (an exit's thresholds)
            calibrated = dist.main and _calibrate(student, prep, cfg, device)
            if dist.main and (scored is None or calibrated):  # resumed after the last epoch, or calibrated
                scored = _validate(student, plan, vs, prep.val_idx, cfg, device, "val")
        result = None
        if dist.main:
            result = _write_run(cfg, prep, module.student, config, scored, best, dist, t0)
            (out / run.TRAINING_STATE).unlink(missing_ok=True)
            shutil.rmtree(out / run.PREVIOUS, ignore_errors=True)  # the run it replaced, now that this one is complete
        dist.barrier()
    except BaseException:
        if not written and dist.main:  # nothing resumable yet: leave no half run that looks like one
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            _restore(out)  # the run --overwrite was replacing, as it was
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        dist.stop()
    if result is None:  # another rank: rank 0 wrote it
        result = files.read_json(out / run.RESULT)
    return result


def _epoch_batches(cfg: FitConfig, prep: _Prepared, dist: Any, epoch: int, device: Any) -> tuple[Any, Any, Any]:
    """(batches, this epoch's jitter draws or None, the dataset to close) of this rank's share of
    ``epoch``: the order and the draws are functions of (seed, epoch), so a resumed epoch is the same."""
    plan, train_idx = prep.plan, prep.train_idx
    mine = dist.shard(data.epoch_order(len(train_idx), cfg.seed, epoch))
    sources, drawn = plan.sources, None
    if cfg.train_clips == "jitter":  # this epoch's draw per video; the schedule applies to each row
        drawn = data.jitter_positions(plan.num_extracted, len(plan.positions), np.random.default_rng([cfg.seed, epoch]),
                                      videos=len(train_idx))
        sources = plan.schedule.sources(drawn[mine], cfg.expensive, cfg.cheap)
    if prep.teacher is not None:
        sources = prep.teacher.sources(sources)[0]
    ds = prep.fs.dataset(sources, train_idx[mine])
    return data.loader(ds, cfg.batch_size, cfg.workers, seed=cfg.seed + epoch, pin=device.type == "cuda"), drawn, ds


def _step_fn(teacher: _Teacher | None, device: Any, tau: float | None) -> Any:
    """The engine's step: a batch in, (loss, videos) out, through the (DDP-wrapped) FitStep."""
    import torch

    def step(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
        y = batch["label"].to(device, non_blocking=True)
        taught = None
        if teacher is not None:
            tx = {src: batch[key].to(device, non_blocking=True).float() for src, key in teacher.alias.items()}
            with torch.no_grad():
                taught = teacher.run.schedule.forward_with_state(teacher.model, tx)
        return model(data.inputs(batch, device), y, tau, taught), len(y)

    return step


def _calibrate(student: Any, prep: _Prepared, cfg: FitConfig, device: Any) -> bool:
    """The schedule's calibration on the training videos (uniform clips); whether it changed anything.
    The batches are read only if the schedule asks for them."""
    def batches() -> Iterator[Any]:
        ds = prep.fs.dataset(prep.plan.sources, prep.train_idx)
        try:
            yield from data.loader(ds, cfg.batch_size, cfg.workers, seed=cfg.seed, pin=device.type == "cuda")
        finally:
            ds.close()

    return bool(prep.plan.schedule.calibrate(student, batches(), device))


def _validate(student: Any, plan: FitPlan, vs: Any, val_idx: np.ndarray, cfg: FitConfig, device: Any,
              desc: str) -> tuple[Any, ...]:
    ds = vs.dataset(plan.sources, val_idx)
    try:
        batches = data.loader(ds, cfg.batch_size, cfg.workers, seed=cfg.seed, pin=device.type == "cuda")
        return evaluation.score(student, plan.schedule, batches, device, progress=cfg.progress, desc=desc)
    finally:
        ds.close()


def _write_run(cfg: FitConfig, prep: _Prepared, student: Any, config: dict[str, Any], scored: tuple[Any, ...],
               best: dict[str, Any], dist: Any, t0: float) -> dict[str, Any]:
    """checkpoint.pt, val_predictions.jsonl, then result.json (last: a run with it is complete)."""
    out, plan, fs, vs = Path(cfg.out), prep.plan, prep.fs, prep.vs
    probs, labels, indices, _, chosen = scored
    fitted = make_run(cfg, fs, plan, student, config)
    fitted.save(out)
    clip_gflops = fitted.clip_gflops(vs, indices)  # backbones whose cost depends on the clip (VA-RED²)
    per_video = fitted.videos_gflops(chosen, clip_gflops)
    files.write_jsonl(out / run.VAL_PREDICTIONS, evaluation.prediction_rows(
        vs.ids[indices], labels, probs, fs.classes, per_video, [plan.schedule.report(row) for row in chosen]))
    m = evaluation.metrics(probs, labels)
    teacher = prep.teacher
    result = {"top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"], "best": best,
              "gflops_per_video": None if per_video is None else float(np.mean(per_video)),
              "aggregator_gflops": plan.gflops["aggregator"], **plan.schedule.summary(chosen),
              **({"clip_gflops_mean": fitted.backbone_clip_gflops(chosen, clip_gflops)} if clip_gflops else {}),
              "agg": cfg.agg, "pattern": cfg.pattern, "num_clips": len(plan.positions),
              "clip_len": fs.config["clip_len"], "expensive": cfg.expensive, "cheap": cfg.cheap,
              "num_train": int(len(prep.train_idx)), "num_val": int(len(prep.val_idx)), "join": fs.join,
              "skipped": prep.skipped, "train_clips": cfg.train_clips, "agg_options": dict(cfg.agg_options),
              "world_size": dist.world_size, "global_batch_size": cfg.batch_size * dist.world_size,
              "teacher": None if teacher is None else teacher.record(),
              **({} if teacher is None else {"distill_weight": cfg.distill_weight, "rep_weight": cfg.rep_weight,
                                              "temperature": cfg.temperature,
                                              "num_unlabelled_train": int((~prep.labelled[prep.train_idx]).sum())}),
              "seconds": round(time.perf_counter() - t0, 3)}
    files.write_json(out / run.RESULT, result)
    log.info("fit %s %s n=%d: top-1 %.4f top-5 %.4f, %.1f GFLOPs/video, %.1f s", cfg.agg, cfg.pattern,
             len(plan.positions), result["top1"], result["top5"], result["gflops_per_video"] or math.nan,
             result["seconds"])
    return result


def _config_record(cfg: FitConfig, teacher: _Teacher | None) -> dict[str, Any]:
    """config.json: the FitConfig, its teacher as {path, sha256 of its checkpoint.pt}."""
    config = asdict(cfg)
    if teacher is not None:
        config["teacher"] = teacher.record()
    return config
