"""The training engine: one loop for `faster fit` (aggregators on cached maps) and, next, train-clip.

What it owns, so that a command only prepares data and writes its results:

* **processes** (:class:`Distributed`): one process, or DDP under ``torchrun`` (gloo on the CPU,
  nccl on GPUs); ``--batch-size`` is per process and the global batch is it times the world size
  (PySlowFast's and mmaction2's convention); rank 0 writes every file;
* **the optimiser and learning rate**: AdamW or SGD (momentum, optionally Nesterov), weight decay
  (optionally none on norm and bias parameters), linear warmup then cosine decay to 0, stepped
  per optimiser step;
* **precision**: fp32, bf16 autocast, or fp16 autocast with a gradient scaler; gradient clipping;
* **state**: a checkpoint at the end of every epoch (model, optimiser, schedule, scaler, epoch,
  every RNG state, the caller's own state), and with ``save_every`` one inside an epoch every so
  many seconds (with the steps done and the caller's data position: train-clip's epochs take
  hours), written atomically; :meth:`Engine.resume` continues exactly where it stopped, so a rerun
  with ``--resume`` ends with the weights of an uninterrupted run (tests/test_engine.py,
  tests/test_train_clip.py);
* **reporting**: metrics.jsonl (a line per finished epoch, with the optimiser ``steps`` taken),
  a progress bar on a terminal, and in a log file a line every ``log_every`` seconds with the rate (faster.progress)
  and the ETA.

The data order is not the engine's: a caller draws each epoch's order from (seed, epoch) and takes
its rank's share with :meth:`Distributed.shard` (equal lengths on every rank, as
DistributedSampler pads), so a resumed epoch sees what the uninterrupted one saw.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue, Incompatible
from faster.progress import Progress

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
STATE_FORMAT = "faster-training-state"
STATE_VERSION = 1


# ------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Distributed:
        env = os.environ if env is None else env
        try:
            rank, world, local = (int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        except ValueError:
            raise BadValue(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}, "
                           f"{env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise BadValue(f"RANK {rank} is not within WORLD_SIZE {world}")
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    def start(self, device: Any) -> None:
        """Join the process group (gloo on the CPU, nccl on CUDA) when there is more than one process."""
        import torch.distributed as dist

        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        import torch.distributed as dist

        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shard(self, order: Any) -> Any:
        """This rank's share of an epoch's sample order: every world_size-th element from rank, the
        order first padded by its own head to a multiple of world_size (all ranks take the same
        number of steps)."""
        order = np.asarray(order)
        if not self.enabled or not len(order):
            return order
        pad = -len(order) % self.world_size
        if pad:
            order = np.concatenate([order, np.resize(order, pad)])
        return order[self.rank::self.world_size]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (a picklable value: rank 0's decisions, never data read from files)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, decide: Callable[[], Any], errors: tuple[type[Exception], ...]) -> Any:
        """Rank 0's ``decide()`` on every process (what to do with a run directory: rank 0 looks, every
        rank follows). An ``errors`` exception it raises (a refusal) is raised on every process, each
        leaving the process group first."""
        try:
            decision = decide() if self.main else None
        except errors as err:
            decision = err
        decision = self.broadcast(decision)
        if isinstance(decision, Exception):
            self.stop()
            raise decision
        return decision

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some process (one collective: every process must call it)."""
        if not self.enabled:
            return bool(flag)
        return self.sum([float(bool(flag))])[0] > 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


# ------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How to train: the optimiser, the learning-rate schedule and the precision."""

    epochs: int
    lr: float  # the peak rate, used as given at the global batch the job runs with
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw or sgd
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    decay_norm_and_bias: bool = True  # False: no weight decay on 1-D parameters (norms, biases)
    warmup_epochs: float = 0.0  # linear warmup from 0, then cosine to 0 over the remaining steps
    clip_grad: float | None = None  # max global gradient norm; None: no clipping
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise BadValue(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise BadValue(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise BadValue(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise BadValue(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise BadValue(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise BadValue(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise BadValue(f"clip_grad must be > 0, got {self.clip_grad}")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's multiplier at optimiser step ``step`` of ``total``: linear warmup over
    ``warmup`` steps, then half a cosine to 0 (SGDR without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


# ---------------------------------------------------------------------------------------- engine


class Engine:
    """Trains ``module`` (an nn.Module whose parameters with requires_grad are optimised).

    ``steps_per_epoch``: optimiser steps per epoch on this rank (equal on every rank). ``state_path``:
    where the per-epoch training state goes (None: nowhere); ``metrics_path``: metrics.jsonl.
    ``find_unused``: DDP's find_unused_parameters (a module whose forward may skip parameters).
    """

    def __init__(self, module: Any, settings: Settings, *, device: Any, steps_per_epoch: int,
                 dist: Distributed | None = None, state_path: str | Path | None = None,
                 metrics_path: str | Path | None = None, progress: bool = True, log_every: float = 60.0,
                 find_unused: bool = False):
        import torch

        self.settings, self.device = settings, device
        self.dist = dist or Distributed()
        self.module = module.to(device)
        self.state_path = None if state_path is None else Path(state_path)
        self.metrics_path = None if metrics_path is None else Path(metrics_path)
        self.progress, self.log_every = progress, float(log_every)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.step = 0  # optimiser steps taken
        self.partial: dict[str, Any] | None = None  # after resume: the interrupted epoch's progress, if any
        self.model = module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
        params = [p for p in module.parameters() if p.requires_grad]
        s = settings
        if s.decay_norm_and_bias:
            groups = [{"params": params, "weight_decay": s.weight_decay}]
        else:
            groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": s.weight_decay},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        kind, options = ((torch.optim.AdamW, {"lr": s.lr}) if s.optimizer == "adamw" else
                         (torch.optim.SGD, {"lr": s.lr, "momentum": s.momentum, "nesterov": s.nesterov}))
        try:  # one fused kernel over every parameter per step (CPU and CUDA): AdamW's step ~5x faster on a CPU
            self.optimizer = kind(groups, fused=True, **options)
        except (RuntimeError, ValueError):  # a device without fused kernels
            self.optimizer = kind(groups, **options)
        total = s.epochs * self.steps_per_epoch
        warmup = int(round(s.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(k, total, warmup))
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")

    # -- one epoch -------------------------------------------------------------------------------
    def autocast(self) -> Any:
        """The forward's precision context (bf16/fp16 autocast, or nothing for fp32)."""
        import torch

        p = self.settings.precision
        return torch.autocast(device_type=self.device.type, dtype=torch.float16 if p == "fp16" else torch.bfloat16,
                              enabled=p != "fp32")

    def train_epoch(self, epoch: int, batches: Iterable[Any], step: Callable[[Any, Any], tuple[Any, int]],
                    total: int | None = None, *, save_every: float | None = None,
                    position: Callable[[], Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``step(model, batch) -> (loss, count)`` on every batch (under autocast), back-propagate,
        clip, step the optimiser and the learning rate. ``model`` is the DDP-wrapped module under
        torchrun: call it (its forward) for the gradients to be averaged. Returns {"train_loss"
        (count-weighted mean over every process), "steps", "samples", "train_seconds", "data_wait"
        (the share of the epoch spent waiting for batches)}.

        ``save_every`` (seconds): also save the training state inside the epoch when that long has
        passed since the last save (rank 0's clock decides, every rank follows), with ``position()``
        of every rank (where its data stream stands: picklable) and ``extra``. When :meth:`resume`
        found such a state for this epoch, ``batches`` must start where ``partial["positions"]``
        says; the counters (loss, samples, seconds) continue from it."""
        import torch

        self.module.train()
        s = self.settings
        params = [p for p in self.module.parameters() if p.requires_grad]
        start = self.partial if self.partial is not None and self.partial.get("epoch") == epoch else None
        self.partial = None
        bar = Progress(total or self.steps_per_epoch, f"epoch {epoch}/{s.epochs}", unit="step",
                       enabled=self.progress and self.dist.main, every=self.log_every,
                       done=int(start["steps"]) if start else 0)
        loss_sum, count, steps, wait, before = 0.0, 0, 0, 0.0, 0.0
        if start:
            loss_sum, count, steps = float(start["loss_sum"]), int(start["count"]), int(start["steps"])
            wait, before = float(start["wait"]), float(start["seconds"])
        t0 = time.perf_counter()
        t_ready = t_saved = t0
        for batch in batches:
            wait += time.perf_counter() - t_ready
            with self.autocast():
                loss, n = step(self.model, batch)
            value = float(loss.detach())  # the one device sync of a step (the running loss needs it anyway)
            if not math.isfinite(value):  # before the step: the weights are still the last finite ones
                self._diverged(epoch, steps + 1, value)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if s.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            steps += 1
            loss_sum += value * n
            count += n
            bar.update(1, loss=loss_sum / max(count, 1))
            if save_every is not None and self.state_path is not None and steps < self.steps_per_epoch and \
                    self.dist.any(self.dist.main and time.perf_counter() - t_saved >= save_every):
                partial = {"epoch": epoch, "steps": steps, "loss_sum": loss_sum, "count": count, "wait": wait,
                           "seconds": before + time.perf_counter() - t0,
                           "positions": self.dist.gather(position() if position else None)}
                self._save_state(epoch - 1, extra, partial)
                t_saved = time.perf_counter()
            t_ready = time.perf_counter()
        bar.close()
        seconds = before + time.perf_counter() - t0
        loss_sum, count = self.dist.sum([loss_sum, float(count)])
        return {"train_loss": loss_sum / max(count, 1), "steps": steps, "samples": int(count),
                "train_seconds": round(seconds, 3), "data_wait": round(wait / seconds, 4) if seconds > 0 else 0.0,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _diverged(self, epoch: int, step: int, loss: float) -> None:
        """Stop on a non-finite loss: Diverged naming the epoch, the step and the last good state. Under
        torchrun this rank's exit ends the others (torchrun stops the group when one worker fails)."""
        from faster.errors import Diverged

        kept = (f"the training state of epoch {epoch - 1} is kept in {self.state_path}" if epoch > 1 and
                self.state_path is not None else "no epoch had finished")
        raise Diverged(f"training diverged: loss {loss} at epoch {epoch}, step {step} (lr "
                       f"{self.optimizer.param_groups[0]['lr']:.3g}); {kept}; run again with a lower --lr")

    # -- state -----------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Rank 0 appends ``row`` to metrics.jsonl, then saves the training state after ``epoch``
        (atomically); every rank waits for it."""
        if self.dist.main:
            from faster.store import files

            if self.metrics_path is not None:
                files.append_jsonl(self.metrics_path, {"epoch": epoch, **row})
        self._save_state(epoch, extra)

    def _save_state(self, epoch: int, extra: dict[str, Any] | None, partial: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the state after ``epoch`` (and ``partial``: the next epoch's progress) atomically; all wait."""
        if self.dist.main and self.state_path is not None:
            from faster.store import files

            files.replace_atomically(self.state_path, lambda tmp: _save(self.state(epoch, extra, partial), tmp))
            if partial is not None:
                log.info("saved the training state at step %d of epoch %d", partial["steps"], partial["epoch"])
        self.dist.barrier()

    def state(self, epoch: int, extra: dict[str, Any] | None = None,
              partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything :meth:`resume` needs to continue after ``epoch``, as plain containers and tensors."""
        import torch

        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": _plain(random.getstate()),
               "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": int(epoch), "step": self.step,
                "world_size": self.dist.world_size, "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "extra": extra or {}, "partial": partial}

    def resume(self, path: str | Path | None = None) -> tuple[int, dict[str, Any]]:
        """Load the training state at ``path`` (default: ``state_path``): (the last finished epoch,
        the caller's extra state). Every RNG is restored, so the next epoch is the one an
        uninterrupted run would have trained. A state saved inside an epoch sets ``self.partial``
        (the epoch, its steps done and every rank's data ``positions``), which the next
        :meth:`train_epoch` of that epoch continues. BadFile naming the file when it is not ours;
        Incompatible when it was trained with another world size (the global batch would change)."""
        import torch

        path = Path(path or self.state_path)
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BadFile(f"{path}: not a training state (torch.load with weights_only=True failed: "
                          f"{err.__class__.__name__})") from None
        if not isinstance(ck, dict) or ck.get("format") != STATE_FORMAT or ck.get("version") != STATE_VERSION:
            raise BadFile(f"{path}: not a faster training state of version {STATE_VERSION}")
        if int(ck["world_size"]) != self.dist.world_size:
            raise Incompatible(f"{path}: trained with {ck['world_size']} processes, resumed with "
                               f"{self.dist.world_size}: the global batch would change; resume with "
                               f"{ck['world_size']} processes")
        self.module.load_state_dict(ck["module"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        self.partial = ck.get("partial")
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuples(rng["python"]))
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.metrics_path is not None and self.dist.main:  # lines of epochs the state does not hold go
            _keep_epochs(self.metrics_path, int(ck["epoch"]))
        return int(ck["epoch"]), dict(ck["extra"])


def check_run_dir(out: str | Path, config: dict[str, Any], *, resume: bool, overwrite: bool, done: str,
                  partial: tuple[str, ...], state: str, free: tuple[str, ...], what: str,
                  defaults: dict[str, Any] | None = None) -> bool:
    """Whether a training command resumes the interrupted run in ``out``: a finished run there (its
    ``done`` file) is refused without ``overwrite``; an interrupted one (any of ``partial``) without
    ``resume`` or ``overwrite``; a resume whose config.json differs outside the ``free`` keys
    (those that may change between attempts: device, workers, ...) is Incompatible, naming them;
    ``defaults``: the values of settings added since, for a config.json written before them.
    ``what`` names the run in messages ("fit", "train-clip")."""
    from faster.store import files

    out = Path(out)
    if overwrite:
        return False
    if (out / done).exists():
        held = [name for name in ("config.json", *partial, done) if (out / name).exists()]
        raise BadValue(f"{out} already holds a run ({', '.join(dict.fromkeys(held))}); pass --overwrite to replace "
                       f"it, or choose another -o")
    found = [name for name in partial if (out / name).exists()]
    if not found:
        if resume:
            log.warning("%s holds no interrupted %s to resume: starting from the first epoch", out, what)
        return False
    if not resume:
        raise BadValue(f"{out} holds an interrupted {what} ({', '.join(found)}, no {done}); pass --resume to "
                       f"continue it or --overwrite to start again")
    before = {**(defaults or {}), **(files.read_json(out / "config.json") or {})}
    differ = sorted(k for k in set(before) | set(config) if k not in free and before.get(k) != config.get(k))
    if differ:
        raise Incompatible(f"--resume {out}: the interrupted {what} ran with other settings ({', '.join(differ)}); "
                           f"resume with the same arguments or pass --overwrite")
    return (out / state).exists()


def _save(obj: Any, path: Path) -> None:
    import torch

    torch.save(obj, path)


def _plain(x: Any) -> Any:
    """Tuples as lists (torch.load with weights_only=True reads lists, ints, floats, strings)."""
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _keep_epochs(path: Path, last: int) -> None:
    from faster.store import files

    if path.exists():
        rows = [r for r in files.read_jsonl(path) if int(r.get("epoch", 0)) <= last]
        files.write_jsonl(path, rows)
