"""Ablation grids from cached features: the paper's Table 3, Table 4 and Figs. 3-4 (Zhu et al., AAAI 2020).

Table 3 compares aggregators (avg-pool, concat, LSTM, GRU, FAST-GRU) over numbers of clips with
only the first clip expensive; Table 4 varies the #E:#C pattern over clip length x clips
(8x32, 16x16, 32x8) and reports V@1 with the GFLOPs of the whole pattern; Figs. 3 and 4 plot
accuracy against log GFLOPs. Here every cell of such a grid is one ordinary ``faster fit`` run
directory, ``DIR/cells/<key>/``, so any cell can be evaluated or used by ``predict`` like a run.

A cell's key hashes its full fit configuration (minus out/progress/workers/threads, which do not
change the result) with the checksums of the shards it reads, so running a grid again trains only
the cells it has not seen: adding an aggregator costs one column. Grids over feature sets of
different clip lengths run into the same DIR accumulate; ``DIR/index.json`` maps each table
position (models, aggregator, clip length, clips, pattern, seed) to the cell that last filled it.

On a cluster (docs/ablate-cluster.md) S processes share DIR: ``num_shards``/``shard_index`` and
torchrun's RANK/WORLD_SIZE give each a part (faster.runtime.placement), and a part trains every
num_parts-th cell of the grid's fixed order. Each cell is trained under a claim, a file created
exclusively in ``DIR/.claims/`` (store.lock.FileLock: atomic on NFS v3+ and Lustre, taken over
from a killed process), so no two processes ever train one cell; index.json is merged under a
lock. Sharded processes write no tables: the same command without shard options, run after
them, trains what is missing and writes results.csv, results.md and the plot for the whole grid.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from faster.aggregate import schedule
from faster.errors import BadFile, BadValue, Incompatible
from faster.store import files, schema
from faster.store.files import ChecksumCache

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

KEY_EXCLUDE = ("out", "progress", "workers", "threads", "overwrite")  # fit fields that never change a result
# fit fields added later, left out of a cell's key at these values so that grids run before them keep their cells
KEY_DEFAULTS = {"order": None, "early_exit": False, "exit_budget": None, "exit_mode": "threshold", "dtype": "auto"}
CSV_COLUMNS = ("agg", "clip_len", "num_clips", "pattern", "seed", "top1", "top5", "mean_class_acc",
               "gflops_per_video", "num_expensive", "num_cheap", "budget", "num_expensive_mean", "clips_seen_mean",
               "exit_budget", "order", "pareto", "expensive", "cheap", "teacher", "run")
AGG_NAMES = {"avg": "Avg. pool", "concat": "Concat", "lstm": "LSTM", "gru": "GRU", "fastgru": "FAST-GRU",
             "netvlad": "NetVLAD", "nextvlad": "NeXtVLAD", "tam": "TAM"}
INDEX = "index.json"
INDEX_LOCK = ".index.lock"  # held while index.json (or .checksums.json) is read, merged and written
CLAIMS = ".claims"  # DIR/.claims/<cell>.claim: created exclusively by the one process training the cell
MARKERS = "osD^v<>ph*XPd8H"  # one per pattern on the plot (an exit cell is a pattern of its own)
CELL_DONE = "cell.json"  # written last: a cell directory without it is unfinished and is redone


@dataclass
class AblateConfig:
    """One grid: aggregators x numbers of clips x patterns x seeds, every other fit option shared."""

    feats: list[str]                                     # training feature sets, joined by video id as in fit
    out: str                                             # grid directory: cells/, results.csv/.md, the plot
    aggs: list[str]                                      # aggregator names (Table 3's rows)
    num_clips: list[int] | None = None                   # numbers of clips (Table 3's columns); None: all extracted
    patterns: list[str] = field(default_factory=lambda: ["first"])  # #E:#C patterns (Table 4's rows)
    seeds: list[int] = field(default_factory=lambda: [0])            # one cell per seed; tables show the mean
    jobs: int = 1                                        # cells trained at once (joblib processes)
    expensive: str | None = None                         # None: the model with more GFLOPs per clip
    cheap: str | None = None                             # None: the model with fewer GFLOPs per clip
    fit: dict[str, Any] = field(default_factory=dict)    # other FitConfig fields (val, epochs, lr, device, ...)
    progress: bool = True                                # a progress bar over cells (and per fit when jobs=1)
    budgets: list[float] | None = None                   # pattern adaptive: one policy cell per budget
    exit_budgets: list[float] | None = None              # early-exit cells beside every pattern, one per exit budget
    num_shards: int = 1                                  # processes splitting the grid (a Slurm array's size)
    shard_index: int = 0                                 # this one's index; under torchrun x WORLD_SIZE + RANK


@dataclass(frozen=True)
class Cell:
    """One position of the grid."""

    agg: str
    num_clips: int
    pattern: str
    seed: int


# ----------------------------------------------------------------------------------------------- grid


def expand_grid(aggs: Iterable[str], num_clips: Iterable[int] | None, patterns: Iterable[str],
                seeds: Iterable[int], num_extracted: int, budgets: Iterable[float] | None = None,
                exit_budgets: Iterable[float] | None = None) -> tuple[list[Cell], list[str]]:
    """The valid cells of a grid, and one note per skipped (pattern, number of clips) pair.

    ``num_clips`` None means all ``num_extracted`` clips. A number of clips above the extracted
    ones, or a ``1:N`` pattern whose N+1 does not divide it, is skipped (Table 4's empty cells).
    Pattern ``adaptive`` gives one cell per budget, named ``adaptive@B`` (a learned policy); every
    pattern (and policy) gets one early-exit cell per exit budget F beside it, ``...+exit@F``.
    """
    aggs, patterns, seeds = _unique(aggs), _unique(patterns), _unique(seeds)
    budgets = _unique(float(b) for b in budgets) if budgets else []
    exit_budgets = _unique(float(f) for f in exit_budgets) if exit_budgets else []
    patterns = schedule.grid_patterns(patterns, budgets, exit_budgets)
    counts = _unique(num_clips) if num_clips is not None else [num_extracted]
    if not aggs or not patterns or not seeds or not counts:
        raise BadValue("a grid needs at least one aggregator, number of clips, pattern and seed")
    for n in counts:
        if n < 1:
            raise BadValue(f"numbers of clips must be >= 1, got {n}")
    cells, notes = [], []
    for n in counts:
        if n > num_extracted:
            notes.append(f"{n} clips skipped: the feature sets hold {num_extracted} clips per video")
            continue
        for p in patterns:
            if not schedule.is_valid(split_policy(p)[0], n):
                notes.append(f"pattern {p} at {n} clips skipped: x+1 must divide the number of clips")
                continue
            cells += [Cell(a, n, p, s) for a in aggs for s in seeds]
    return cells, notes


def split_policy(pattern: str) -> tuple[str, float | None]:
    """(fit's pattern, budget) of a grid pattern: ``adaptive@0.125`` -> ("adaptive", 0.125) (an exit
    part, ``+exit@F``, is left out: :func:`split_exit`)."""
    return schedule.split_label(pattern)


def split_exit(pattern: str) -> tuple[str, float | None]:
    """(the grid pattern without its exit, the exit budget or None): ``all-e+exit@0.5`` -> ("all-e", 0.5)."""
    return schedule.split_exit(pattern)


def _unique(values: Iterable) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


# ------------------------------------------------------------------------------------ feature sets


def _shards(feats_dir: str | Path) -> list[Path]:
    from faster.store.reader import list_shards

    shards = list_shards(feats_dir)
    if not shards:
        raise BadFile(f"no shards ({schema.SHARD_GLOB}) in feature set {str(feats_dir)!r}")
    return shards


def feature_info(feats: Iterable[str | Path]) -> dict[str, Any]:
    """clip_len, num_clips and per model its gflops_per_clip, read from the first shard of each set."""
    from faster.store.header import read_header

    info: dict[str, Any] = {"models": {}}
    for d in feats:
        header = read_header(_shards(d)[0]).header
        for attr in ("clip_len", "num_clips"):
            value = int(getattr(header, attr))
            if info.setdefault(attr, value) != value:
                raise Incompatible(f"feature set {str(d)!r} has {attr}={value}, another has {info[attr]}")
        for model, mh in header.models.items():
            info["models"][model] = math.nan if mh.gflops_per_clip is None else float(mh.gflops_per_clip)
    return info


def resolve_models(expensive: str | None, cheap: str | None, models: dict[str, float]) -> tuple[str, str]:
    """Fill a missing expensive/cheap name from the feature sets: more GFLOPs per clip is expensive."""
    for name in (expensive, cheap):
        if name is not None and name not in models:
            raise BadValue(f"model {name!r} is not in the feature sets; they hold {sorted(models)}")
    if expensive is not None and cheap is not None:
        return expensive, cheap
    others = sorted((m for m in models if m not in (expensive, cheap)), key=lambda m: -models[m])
    if len(models) == 1:  # one backbone: every pattern reads the same features (all-e = all-c)
        only = next(iter(models))
        return expensive or only, cheap or only
    if expensive is None and cheap is None and len(models) == 2:
        return others[0], others[1]
    if len(others) == 1:
        return (others[0], cheap) if expensive is None else (expensive, others[0])
    raise BadValue(f"the feature sets hold {sorted(models)}: name --expensive and --cheap")


def _manifest_checksums(feats_dir: Path) -> dict[str, tuple[str, int | None]]:
    """Shard name -> (sha256, bytes) listed by manifest.json and the per-part manifests (store.manifest)."""
    found: dict[str, tuple[str, int | None]] = {}
    for path in sorted(feats_dir.glob("manifest*.json")):
        try:
            manifest = files.read_json(path)
        except (OSError, ValueError):
            continue
        for entry in manifest.get("shards", []) if isinstance(manifest, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and entry.get("name"):
                found[entry["name"]] = (entry["sha256"], entry.get("bytes"))
    return found


def feature_checksums(feats_dir: str | Path, cache: ChecksumCache) -> list[str]:
    """The sorted checksums of a feature set's shards: manifest checksums when listed, else hashed."""
    listed = _manifest_checksums(Path(feats_dir))
    sums = []
    for shard in _shards(feats_dir):
        sha, size = listed.get(shard.name, (None, None))
        sums.append(sha if sha and size in (None, shard.stat().st_size) else cache.sha256(shard))
    return sorted(sums)


def cell_key(fit_config: dict[str, Any], feats_sums: list[list[str]], val_sums: list[list[str]]) -> str:
    """Hash of a cell's fit configuration (minus KEY_EXCLUDE; paths replaced by shard checksums)."""
    keyed = {k: v for k, v in fit_config.items() if k not in KEY_EXCLUDE and k not in ("feats", "val")
             and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])}
    keyed["feats"], keyed["val"] = feats_sums, val_sums
    blob = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cell_dirname(cell: Cell, clip_len: int, key: str) -> str:
    pattern = cell.pattern.replace(":", "to")
    return f"{cell.agg}-L{clip_len}-n{cell.num_clips}-{pattern}-s{cell.seed}-{key}"


# ---------------------------------------------------------------------------------------- running


@dataclass
class GridPlan:
    """What a grid holds and which of its cells this process trains (``run_ablate`` without training)."""

    out: Path
    clip_len: int
    expensive: str
    cheap: str
    notes: list[str]                       # skipped (pattern, number of clips) pairs
    cells: list[tuple[Cell, Path]]         # every cell of the grid in its fixed order, with its run directory
    mine: list[tuple[dict, dict]]          # (fit config, cell.json metadata) of this process's cells
    part: int = 0                          # this process's part of the grid ...
    num_parts: int = 1                     # ... of num_shards x WORLD_SIZE parts
    local_rank: int = 0
    local_world_size: int = 1

    def claim_path(self, run_dir: str | Path) -> Path:
        return claim_path(self.out, Path(run_dir).name)


def claim_path(out: str | Path, cell_dirname: str) -> Path:
    """The file whose exclusive creation claims a cell for one process (store.lock.FileLock)."""
    return Path(out) / CLAIMS / f"{cell_dirname}.claim"


def plan_grid(cfg: AblateConfig) -> GridPlan:
    """Check the configuration, read the feature sets' headers and checksums, and lay out the grid:
    every cell in a fixed order (clips, then pattern, aggregator, seed, as given), and this process's
    share of it, every num_parts-th cell from its part on (faster.runtime.placement)."""
    from faster.runtime import placement

    if cfg.jobs < 1:
        raise BadValue(f"jobs must be >= 1, got {cfg.jobs}")
    if cfg.num_shards < 1:
        raise BadValue(f"num_shards must be >= 1, got {cfg.num_shards}")
    where = placement(cfg.num_shards, cfg.shard_index)
    if not cfg.feats:
        raise BadValue("ablate needs at least one feature set")
    for name in ("out", "feats", "agg", "pattern", "num_clips", "seed", "expensive", "cheap", "budget", "early_exit",
                 "exit_budget"):
        if name in cfg.fit:
            raise BadValue(f"fit option {name!r} is set by the grid itself, not through AblateConfig.fit")
    _check_aggs(cfg.aggs)
    out = Path(cfg.out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    (out / CLAIMS).mkdir(exist_ok=True)

    val = list(cfg.fit.get("val", []))
    info = feature_info(cfg.feats)
    if val:
        val_info = feature_info(val)
        if (val_info["clip_len"], val_info["num_clips"]) != (info["clip_len"], info["num_clips"]):
            raise Incompatible(f"validation sets have {val_info['num_clips']} clips of {val_info['clip_len']} "
                             f"frames, training sets {info['num_clips']} of {info['clip_len']}")
    expensive, cheap = resolve_models(cfg.expensive, cfg.cheap, info["models"])
    cells, notes = expand_grid(cfg.aggs, cfg.num_clips, cfg.patterns, cfg.seeds, info["num_clips"], cfg.budgets,
                               cfg.exit_budgets)
    clip_len = info["clip_len"]

    from faster.aggregate.fit import FitConfig

    sums = ChecksumCache(out / ".checksums.json")
    feats_sums = [feature_checksums(d, sums) for d in cfg.feats]
    val_sums = [feature_checksums(d, sums) for d in val]
    if sums.dirty:
        with _grid_lock(out):  # several processes of one grid: one writer of the cache at a time
            sums.save()

    plan = GridPlan(out=out, clip_len=clip_len, expensive=expensive, cheap=cheap, notes=notes, cells=[], mine=[],
                    part=where.part, num_parts=where.num_parts, local_rank=where.local_rank,
                    local_world_size=where.local_world_size)
    for i, cell in enumerate(cells):
        pattern, budget = split_policy(cell.pattern)
        exit_budget = split_exit(cell.pattern)[1]
        fit_cfg = FitConfig(feats=[str(d) for d in cfg.feats], out="", agg=cell.agg, expensive=expensive,
                            cheap=cheap, pattern=pattern, budget=budget, num_clips=cell.num_clips, seed=cell.seed,
                            early_exit=exit_budget is not None, exit_budget=exit_budget,
                            **{k: v for k, v in cfg.fit.items() if k != "val"}, val=[str(d) for d in val])
        fit_dict = dataclasses.asdict(fit_cfg)
        key = cell_key(fit_dict, feats_sums, val_sums)
        run_dir = cells_dir / cell_dirname(cell, clip_len, key)
        fit_dict["out"] = str(run_dir)
        meta = {"key": key, "agg": cell.agg, "clip_len": clip_len, "num_clips": cell.num_clips,
                "pattern": cell.pattern, "seed": cell.seed, "expensive": expensive, "cheap": cheap,
                "feats": fit_dict["feats"], "val": fit_dict["val"]}
        plan.cells.append((cell, run_dir))
        if i % where.num_parts == where.part:
            plan.mine.append((fit_dict, meta))
    return plan


def run_ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Train this process's unfinished cells (``cfg.jobs`` at a time), each under a claim no other
    process can hold at once; then, when the grid is not sharded, write results.csv, results.md and
    accuracy_vs_gflops.png over every cell DIR holds. Returns a summary.

    A sharded process (``num_shards`` > 1, or several torchrun ranks) trains every num_parts-th cell
    and writes no tables: the same command without the shard options, run afterwards, trains what
    is still missing (a killed shard's cells) and writes the tables of the whole grid."""
    t0 = time.perf_counter()
    plan = plan_grid(cfg)
    clip_len, out = plan.clip_len, plan.out
    for note in plan.notes:
        log.warning("L=%d: %s", clip_len, note)
    for f, m in plan.mine:  # a cell.json left unreadable (a crash, a bad edit): rebuilt, or the cell redone
        if (Path(f["out"]) / CELL_DONE).exists() and _read_cell(Path(f["out"]) / CELL_DONE) is None:
            _repair_cell(Path(f["out"]), m)
    todo = [(f, m) for f, m in plan.mine if not (Path(f["out"]) / CELL_DONE).exists()]

    from faster.runtime import cores

    jobs = max(1, min(cfg.jobs, len(todo)))
    threads = max(1, cores() // (jobs * plan.local_world_size))
    device = _rank_device(todo[0][0]["device"], plan.local_rank, plan.local_world_size) if todo else None
    log.info("%d cells, %d of them part %d of %d: %d to train (%d at a time, %d threads each)", len(plan.cells),
             len(plan.mine), plan.part, plan.num_parts, len(todo), jobs, threads)
    outcomes = _train_cells(todo, out, jobs=jobs, threads=threads, device=device, progress=cfg.progress)

    def where(m: dict[str, Any]) -> str:
        return f"L={clip_len}: {m['agg']} {m['pattern']} at {m['num_clips']} clips (seed {m['seed']})"

    failures = [f"{where(m)} failed in the last run (run the grid again to retry): {detail}"
                for m, status, detail in outcomes if status == "failed"]
    busy = [f"{where(m)} is being trained by {detail}: its result appears when a run after it finishes"
            for m, status, detail in outcomes if status == "busy"]
    for line in busy:
        log.warning("%s", line)
    trained = sum(status == "trained" for _, status, _ in outcomes)
    summary = {"out": str(out), "clip_len": clip_len, "expensive": plan.expensive, "cheap": plan.cheap,
               "cells": len(plan.cells), "part": plan.part, "num_parts": plan.num_parts, "assigned": len(plan.mine),
               "trained": trained, "reused": len(plan.mine) - len(todo) + sum(s == "done" for _, s, _ in outcomes),
               "failed": len(failures), "busy": len(busy), "skipped": plan.notes, "failures": failures,
               "in_progress": busy}

    index = _update_index(out, clip_len, plan.expensive, plan.cheap, plan.cells, plan.notes, cfg.fit.get("teacher"))  # skip notes persist
    if plan.num_parts > 1:  # a part of the grid: the closing run without shard options writes the tables
        summary.update(rows=None, results_csv=None, results_md=None, plot=None)
    else:
        unreadable: list[str] = []
        rows = collect_rows(out, index, unreadable)
        summary["unreadable"] = unreadable
        write_csv(rows, out / "results.csv")
        files.write_text(out / "results.md", render_markdown(rows, index["notes"] + failures + busy + unreadable))
        plot_path = plot_accuracy_vs_gflops(rows, out / "accuracy_vs_gflops.png")
        summary.update(rows=len(rows), results_csv=str(out / "results.csv"), results_md=str(out / "results.md"),
                       plot=str(plot_path))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _check_aggs(aggs: list[str]) -> None:
    """Unknown aggregator names fail before any training, when the aggregator registry is there."""
    from faster.aggregate import names

    try:
        known = names()
    except ImportError:  # the built-in aggregators are not importable: fit itself will name the bad value
        return
    for a in aggs:
        if a not in known:
            raise BadValue(f"unknown aggregator {a!r}; expected one of {', '.join(known)}")


def _rank_device(name: str, local_rank: int, local_world_size: int) -> str | None:
    """Under torchrun with several ranks per node, "auto"/"cuda" means this rank's GPU (cuda:LOCAL_RANK).
    Only the run uses it: the cell key keeps the configured name, so any process may finish any cell."""
    if local_world_size <= 1 or name not in ("auto", "cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def _grid_lock(out: Path):
    """The lock serialising writes of DIR/index.json and DIR/.checksums.json among a grid's processes."""
    from faster.store.lock import FileLock

    return FileLock(out / INDEX_LOCK, what="the lock of the grid's index", wait=True, poll=0.05,
                    heartbeat=10.0, stale_after=120.0)


def _train_cells(todo: list[tuple[dict, dict]], out: Path, *, jobs: int, threads: int, device: str | None,
                 progress: bool) -> list[tuple[dict, str, str | None]]:
    """Run the cells (in-process when jobs=1, else joblib processes); return (meta, status, detail) per
    cell, status one of trained, failed (detail: the error), busy (detail: who holds its claim) and
    done (finished by another process meanwhile)."""
    if not todo:
        return []
    from faster.progress import Progress

    per_fit_progress = progress and jobs == 1
    args = [(fit_dict, meta, threads, device, per_fit_progress, str(claim_path(out, Path(fit_dict["out"]).name)))
            for fit_dict, meta in todo]
    bar = Progress(len(todo), "cells", unit="cell", enabled=progress, leave=True)
    outcomes = []
    if jobs == 1:
        results = (_run_cell(*a) for a in args)
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=jobs, return_as="generator_unordered")(delayed(_run_cell)(*a) for a in args)
    for meta, status, detail in results:
        if status == "failed":
            log.error("cell %s failed: %s", meta["key"], detail)
        outcomes.append((meta, status, detail))
        bar.update(1)
    bar.close()
    return outcomes


def _run_cell(fit_dict: dict[str, Any], meta: dict[str, Any], threads: int, device: str | None, progress: bool,
              claim: str) -> tuple[dict[str, Any], str, str | None]:
    """Claim one cell, fit it into its run directory and mark it finished by writing cell.json last.

    The claim (store.lock.FileLock on DIR/.claims/<cell>.claim) is taken before the run directory is
    looked at, so a cell that another process finished or trains is never touched; a claim left by a
    killed process is taken over (a dead pid on this host; another host's after STALE_AFTER seconds
    without a heartbeat) and its half-written run directory is redone."""
    from faster.aggregate import fit as fitting
    from faster.engine import Distributed
    from faster.store.lock import FileLock, describe

    run_dir = Path(fit_dict["out"])
    lock = FileLock(claim, what=f"the claim of cell {run_dir.name}")
    if not lock.try_acquire():
        return meta, "busy", describe(lock.holder())
    try:
        if (run_dir / CELL_DONE).exists():  # finished by another process between our look and our claim
            return meta, "done", None
        if run_dir.exists():  # an unfinished cell from an interrupted grid: start it afresh
            shutil.rmtree(run_dir)
        cfg = fitting.FitConfig(**{**fit_dict, "threads": threads, "progress": progress,
                                 **({"device": device} if device else {})})
        try:
            result = fitting.fit(cfg, dist=Distributed())  # a cell is one process, also under torchrun
        except Exception as err:  # one bad cell must not lose the others: reported in the summary and results.md
            log.debug("cell %s", meta["key"], exc_info=True)
            return meta, "failed", f"{type(err).__name__}: {err}"
        if not lock.still_held():  # this process stalled past the heartbeat timeout and lost the cell
            return meta, "failed", f"its claim was taken over by {describe(lock.holder())} during training"
        trainer = {k: lock.me[k] for k in ("host", "pid", "since")}
        done = {**meta, "result": result, "trained_by": trainer}
        references = cfg.schedule(cfg.num_clips or 1).references(run_dir, seed=cfg.seed)
        if references:  # a policy's two references at its own budget (policy.reference_points)
            done["references"] = references
        files.write_json(run_dir / CELL_DONE, done)
        return meta, "trained", None
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------- results


def _identity(expensive: str, cheap: str, agg: str, clip_len: int, num_clips: int, pattern: str, seed: int,
              teacher: str | None = None) -> str:
    """A table position; a taught cell (--teacher) is its own position beside the untaught one."""
    ident = [expensive, cheap, agg, clip_len, num_clips, pattern, seed]
    return json.dumps(ident + [teacher] if teacher else ident)


def _update_index(out: Path, clip_len: int, expensive: str, cheap: str, plan: list[tuple[Cell, Path]],
                  notes: list[str], teacher: str | None = None) -> dict[str, Any]:
    """Point each of this grid's table positions at its cell (the latest run wins); keep every note.

    Read, merged and written under the grid's lock, so processes sharing DIR never lose each
    other's entries."""
    path = out / INDEX
    with _grid_lock(out):
        index = _read_index(out)
        for cell, run_dir in plan:
            ident = _identity(expensive, cheap, cell.agg, clip_len, cell.num_clips, cell.pattern, cell.seed, teacher)
            index["cells"][ident] = run_dir.name
        for note in notes:
            note = f"L={clip_len}: {note}"
            if note not in index["notes"]:
                index["notes"].append(note)
        files.write_json(path, index)
    return index


def _read_cell(path: Path) -> dict[str, Any] | None:
    """A cell.json's record, or None when it cannot be read or is not one (cut short, edited)."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = ("agg", "clip_len", "num_clips", "pattern", "seed", "expensive", "cheap", "result")
    return cell if isinstance(cell, dict) and all(k in cell for k in keys) and isinstance(cell["result"], dict) \
        else None


def _set_aside(path: Path) -> Path:
    """Rename an unreadable bookkeeping file to PATH.unreadable-<time> (kept for inspection); return it."""
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    return aside


def _repair_cell(run_dir: Path, meta: dict[str, Any]) -> None:
    """A cell whose cell.json is unreadable: rebuilt from its run's result.json when that run is
    complete (its fit finished: nothing is retrained), otherwise set aside so the cell is trained again."""
    from faster.aggregate import run as rundir

    done = run_dir / CELL_DONE
    aside = _set_aside(done)
    try:
        result = files.read_json(run_dir / rundir.RESULT)
    except BadFile:
        result = None
    if isinstance(result, dict) and (run_dir / rundir.CHECKPOINT).is_file():
        files.write_json(done, {**meta, "result": result, "trained_by": None, "rebuilt_from": rundir.RESULT})
        log.warning("%s was unreadable (kept as %s): rebuilt from the cell's %s", done, aside.name, rundir.RESULT)
    else:
        log.warning("%s was unreadable (kept as %s) and the cell's run is incomplete: the cell is trained again",
                    done, aside.name)


def _read_index(out: Path) -> dict[str, Any]:
    """DIR/index.json; when it is unreadable, set aside and rebuilt from every readable cells/*/cell.json
    (the latest cell of a table position wins, as when the index is written), with a warning naming it.
    The caller holds the grid's lock."""
    path = out / INDEX
    if not path.exists():
        return {"cells": {}, "notes": []}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(index, dict) and isinstance(index.get("cells"), dict) and isinstance(index.get("notes"), list):
            return index
    except (OSError, ValueError):
        pass
    aside = _set_aside(path)
    index = {"cells": {}, "notes": []}
    cells = sorted((out / "cells").glob(f"*/{CELL_DONE}"), key=lambda p: p.stat().st_mtime)
    for done in cells:
        cell = _read_cell(done)
        if cell is None:
            continue
        teacher = cell["result"].get("teacher")
        ident = _identity(cell["expensive"], cell["cheap"], cell["agg"], cell["clip_len"], cell["num_clips"],
                          cell["pattern"], cell["seed"], teacher.get("path") if isinstance(teacher, dict) else None)
        index["cells"][ident] = done.parent.name
    log.warning("%s was unreadable (kept as %s): rebuilt from the %d finished cells in %s", path, aside.name,
                len(index["cells"]), out / "cells")
    files.write_json(path, index)
    return index


def collect_rows(out: str | Path, index: dict[str, Any] | None = None,
                 unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per finished cell the index points at (all grids run into ``out``). A cell.json that
    cannot be read is left out with a warning naming it, appended to ``unreadable`` (results.md's notes)."""
    out = Path(out)
    if index is None:
        with _grid_lock(out):
            index = _read_index(out)
    rows = []
    for name in index["cells"].values():
        done = out / "cells" / name / CELL_DONE
        if not done.exists():
            continue
        cell = _read_cell(done)
        if cell is None:
            line = (f"{done} is unreadable: its row is missing; run the grid that made it again to rebuild it "
                    "from the cell's run")
            log.warning("%s", line)
            if unreadable is not None:
                unreadable.append(line)
            continue
        result = cell["result"]
        row = {c: result.get(c) for c in CSV_COLUMNS}
        row.update({k: cell[k] for k in ("agg", "clip_len", "num_clips", "pattern", "seed", "expensive", "cheap")})
        teacher = (result.get("teacher") or {}).get("path") if isinstance(result.get("teacher"), dict) else None
        row["teacher"] = teacher
        if teacher:  # a taught cell: its own row in the tables and its own line on the plot
            row["agg"] = f"{cell['agg']}+kd"
        row["run"] = str(Path("cells") / name)
        rows.append(row)
        budget = split_policy(cell["pattern"])[1]
        for ref, r in (cell.get("references") or {}).items():  # random and oracle schedules at the same budget
            rows.append({**row, "pattern": f"{ref}@{budget:g}", "top1": r["top1"], "top5": None,
                         "mean_class_acc": None, "gflops_per_video": r["gflops_per_video"],
                         "num_expensive": r["num_expensive"], "num_expensive_mean": r["num_expensive"],
                         "clips_seen_mean": row["clips_seen_mean"]})
    rows.sort(key=lambda r: (r["expensive"], r["cheap"], r["clip_len"], _agg_order(r["agg"]), r["num_clips"],
                             _pattern_order(r["pattern"]), r["seed"]))
    _mark_pareto(rows)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    files.replace_atomically(path, write)


def _agg_order(agg: str) -> tuple[int, str]:
    order = list(AGG_NAMES)
    base = agg.removesuffix("+kd")
    return (order.index(base) if base in order else len(order), agg)


def _agg_label(agg: str) -> str:
    """Table 3's name of an aggregator; "+ KD" for a student taught by --teacher (Fewer Frames)."""
    base = agg.removesuffix("+kd")
    return AGG_NAMES.get(base, base) + (" + KD" if agg.endswith("+kd") else "")


REFERENCES = tuple(schedule.GRID_ROWS)  # a policy's rows, then its references at the same budget


def _pattern_order(pattern: str) -> tuple[int, float, float]:
    """Table 4's row order: All E, 1:1, 1:3, ..., then first, then All C; then each policy budget
    (largest first) followed by its oracle and random references; each pattern's early-exit cells
    right after it, largest exit budget first."""
    base, exit_budget = split_exit(pattern)
    after = 0.0 if exit_budget is None else 2.0 - exit_budget
    if base == "all-e":
        return (0, 0, after)
    if base.startswith("1:"):
        return (1, int(base[2:]), after)
    name, budget = split_policy(base)
    if budget is not None:
        return (4, -budget + REFERENCES.index(name) * 1e-9 if name in REFERENCES else 0.0, after)
    return ((2, 0, after) if base == "first" else (3, 0, after))


def _pattern_label(pattern: str) -> str:
    base, exit_budget = split_exit(pattern)
    name, budget = split_policy(base)
    if budget is not None:
        label = schedule.GRID_ROWS.get(name, name) + f" B={budget:g}"
    else:
        label = {"all-e": "All E", "all-c": "All C", "1:0": "All E"}.get(base, base)
    return label if exit_budget is None else f"{label} + exit F={exit_budget:g}"


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (GFLOPs, top-1) point is on the Pareto front: no other point is as cheap and as
    accurate and better in one of them. Points with a missing value are not."""
    ok = [not (math.isnan(g) or math.isnan(a)) for g, a in points]
    out = []
    for i, (g, a) in enumerate(points):
        dominated = any(ok[j] and j != i and g2 <= g and a2 >= a and (g2 < g or a2 > a)
                        for j, (g2, a2) in enumerate(points))
        out.append(ok[i] and not dominated)
    return out


def _mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``pareto``: whether its cell (the mean over seeds) is on the accuracy/GFLOPs front
    of its models, clip length and aggregator (every family: fixed, policy, exit, references)."""
    def num(v: Any) -> float:
        return math.nan if v in (None, "") else float(v)

    for _, group in _groups(rows, "expensive", "cheap", "clip_len", "agg").items():
        cells = _groups(group, "pattern", "num_clips")
        keys = list(cells)
        points = [(_mean([num(r["gflops_per_video"]) for r in cells[k]])[0],
                   _mean([num(r["top1"]) for r in cells[k]])[0]) for k in keys]
        for k, on in zip(keys, pareto(points)):
            for r in cells[k]:
                r["pareto"] = on


def _mean(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _fmt_acc(values: list[float]) -> str:
    mean, std = _mean([100 * float(v) for v in values if v not in (None, "")])
    if math.isnan(mean):
        return ""
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _fmt_gflops(values: list[float]) -> str:
    mean, _ = _mean([float(v) for v in values if v not in (None, "")])
    return "" if math.isnan(mean) else (f"{mean:.1f}" if mean >= 1 else f"{mean:.3g}")


def _groups(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def render_markdown(rows: list[dict[str, Any]], notes: Iterable[str] = ()) -> str:
    """Tables shaped like the paper's Table 3 (aggregator x number of clips, one per clip length and
    pattern, `first` first) and Table 4 (pattern x clip length at its largest number of clips, V@1
    and GFLOPs, one per aggregator)."""
    lines = ["# Ablation results", "",
             "V@1: top-1 accuracy (%) on the validation videos, the mean over seeds (± their standard "
             "deviation when there are several). GFLOPs per video (multiply-adds, the paper's convention) = "
             "#E x expensive GFLOPs/clip + #C x cheap GFLOPs/clip + aggregator, counting only the clips a video "
             "read (an early exit, `+ exit F`, leaves it before its last clip). ★: on the Pareto front of accuracy "
             "against GFLOPs among the aggregator's cells (no cell is both cheaper and more accurate). Every value "
             "comes from a run directory listed in results.csv.", ""]
    if not rows:
        lines += ["No finished cells yet.", ""]
    for (expensive, cheap), group in _groups(rows, "expensive", "cheap").items():
        models = f"E = {expensive}, C = {cheap}"
        pats = sorted({r["pattern"] for r in group}, key=lambda p: (p != "first", _pattern_order(p)))
        for clip_len in sorted({r["clip_len"] for r in group}):
            at_len = [r for r in group if r["clip_len"] == clip_len]
            counts = sorted({r["num_clips"] for r in at_len})
            for pattern in pats:
                if split_policy(pattern)[0] in ("oracle", "random"):  # references: in Table 4's layout only
                    continue
                cells = _groups([r for r in at_len if r["pattern"] == pattern], "agg", "num_clips")
                if not cells:
                    continue
                aggs = sorted({a for a, _ in cells}, key=_agg_order)
                lines += [f"## Table 3 layout: aggregator x number of clips ({models}, L = {clip_len}, "
                          f"pattern {pattern})", ""]
                lines += _table(["Model"] + [str(n) for n in counts],
                                [[_agg_label(a)] + [_fmt_acc([r["top1"] for r in cells.get((a, n), [])])
                                                          for n in counts] for a in aggs])
                lines.append("")
        # Table 4's columns: each clip length at the most clips the grid ran it with (8x32, 16x16, 32x8).
        layouts = sorted({(L, max(r["num_clips"] for r in group if r["clip_len"] == L))
                          for L in {r["clip_len"] for r in group}})
        for agg in sorted({r["agg"] for r in group}, key=_agg_order):
            cells = _groups([r for r in group if r["agg"] == agg], "pattern", "clip_len", "num_clips")
            header = ["#E:#C"]
            for L, n in layouts:
                header += [f"{L}-frames x {n}-clips V@1", "GFLOPs"]
            body = []
            for pattern in sorted({p for p, L, n in cells if (L, n) in layouts}, key=_pattern_order):
                row = [_pattern_label(pattern)]
                for L, n in layouts:
                    rs = cells.get((pattern, L, n), [])
                    star = " ★" if rs and all(r.get("pareto") for r in rs) else ""
                    row += [_fmt_acc([r["top1"] for r in rs]) + star, _fmt_gflops([r["gflops_per_video"] for r in rs])]
                body.append(row)
            lines += [f"## Table 4 layout: #E:#C x clip length x clips ({_agg_label(agg)}, {models})", ""]
            lines += _table(header, body) + [""]
    notes = list(notes)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def accuracy_vs_gflops_figure(rows: list[dict[str, Any]]) -> Figure:
    """Top-1 vs log GFLOPs (the paper's Figs. 3-4): one colour per aggregator, one marker per pattern
    (its early-exit cells hollow, their exit budget F beside them),
    lines joining the numbers of clips of one aggregator, pattern and clip length, and one curve per
    family of schedules (fixed patterns, policies, early exits, policies with an exit:
    aggregate/schedule.py ``family``; a line style each) through the family's own Pareto front
    among its cells of one aggregator, clip length and number of clips, so that which family
    dominates at which cost shows; the legend to the
    right of the axes. A figure on an Agg canvas of its own (no pyplot state), drawn by the caller."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(8.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    aggs = sorted({r["agg"] for r in rows}, key=_agg_order)
    pats = sorted({r["pattern"] for r in rows}, key=_pattern_order)
    tab10 = matplotlib.colormaps["tab10"]
    colours = {a: tab10(i % 10) for i, a in enumerate(aggs)}
    bases = list(dict.fromkeys(split_exit(p)[0] for p in pats))  # a marker per pattern; its exit cells hollow
    markers = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(bases)}
    for (agg, pattern, _clip_len, _expensive), group in _groups(rows, "agg", "pattern", "clip_len",
                                                              "expensive").items():
        points = sorted((_mean([float(r["gflops_per_video"]) for r in rs])[0],
                         _mean([100 * float(r["top1"]) for r in rs])[0])
                        for rs in _groups(group, "num_clips").values())
        xs, ys = zip(*points)
        base, exit_budget = split_exit(pattern)
        ax.plot(xs, ys, color=colours[agg], marker=markers[base], linewidth=1, markersize=6,
                **({} if exit_budget is None else {"markerfacecolor": "white"}))
        if exit_budget is not None:
            for x, y in points:
                ax.annotate(f"{exit_budget:g}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6,
                            color=colours[agg])
    styles = dict(zip(schedule.FAMILIES, ("-", "--", ":", "-.")))
    drawn: set[str] = set()
    for (agg, _clip_len, _expensive, _n), group in _groups(rows, "agg", "clip_len", "expensive", "num_clips").items():
        for fam, members in _groups([{**r, "family": schedule.family(r["pattern"])} for r in group], "family").items():
            cells = _groups(members, "pattern")
            if fam[0] is None or len(cells) < 2:
                continue
            points = [(_mean([float(r["gflops_per_video"]) for r in rs])[0],
                       _mean([100 * float(r["top1"]) for r in rs])[0]) for rs in cells.values()]
            front = sorted(p for p, on in zip(points, pareto(points)) if on)  # the family's own front
            if len(front) < 2:
                continue
            xs, ys = zip(*front)
            ax.plot(xs, ys, color=colours[agg], linestyle=styles[fam[0]], linewidth=1.6, alpha=0.8)
            drawn.add(fam[0])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 20, not 2x10^1
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=50))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor ticks and grid lines, no labels
    ax.set_xlabel("GFLOPs per video (multiply-adds, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs. cost (cf. FASTER, Figs. 3 and 4)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    if rows:
        handles = [Line2D([], [], color=colours[a], linewidth=2, label=_agg_label(a)) for a in aggs]
        handles += [Line2D([], [], color="grey", linestyle=styles[f], linewidth=1.6, label=f"family: {f}")
                    for f in schedule.FAMILIES if f in drawn]
        handles += [Line2D([], [], color="grey", marker=markers[p], linestyle="", label=_pattern_label(p))
                    for p in bases]
        if len(bases) < len(pats):
            handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="",
                                  label="hollow: + early exit (F beside)"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0,
                  fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()  # counts the legend: the axes shrink to leave it room
    if rows:  # major ticks for the axis as laid out, then the layout again for their labels
        size = FontProperties(size=matplotlib.rcParams["xtick.labelsize"]).get_size_in_points()
        length = ax.bbox.width * 72.0 / fig.dpi
        ax.xaxis.set_major_locator(FixedLocator(readable_log_ticks(*ax.get_xlim(), length, size)))
        fig.tight_layout()
    return fig


def plot_accuracy_vs_gflops(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``accuracy_vs_gflops_figure(rows)`` to ``path`` as a PNG (atomically, legend included)."""
    path = Path(path)
    fig = accuracy_vs_gflops_figure(rows)
    files.replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path


TICK_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))  # densest first
CHAR_EM, PAD_EM = 0.65, 1.0  # a label's width per character (DejaVu digits: 0.64 em) and the gap between two


def readable_log_ticks(lo: float, hi: float, axis_points: float, fontsize: float) -> list[float]:
    """Major ticks for a log axis from ``lo`` to ``hi`` drawn ``axis_points`` long whose plain labels
    (``f"{v:g}"`` at ``fontsize`` points) never collide: of TICK_SUBS per decade, the densest whose two
    closest ticks lie further apart than the widest label plus a gap; beyond that one decade in k;
    over a span where even 1..9 leaves fewer than two ticks, evenly spaced values (0.052, 0.054)."""
    lo, hi = sorted((float(lo), float(hi)))
    if not (lo > 0 and math.isfinite(hi)) or hi <= lo:
        return [v for v in (lo, hi) if v > 0][:1]
    per_decade = axis_points / math.log10(hi / lo)  # points per factor of 10

    def fits(ticks: list[float]) -> bool:
        if len(ticks) < 2:
            return True
        width = (max(len(f"{t:g}") for t in ticks) * CHAR_EM + PAD_EM) * fontsize
        return min(math.log10(b / a) for a, b in zip(ticks, ticks[1:])) * per_decade >= width

    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for subs in TICK_SUBS:
        ticks = [t for t in (float(f"{s * 10.0 ** k:.12g}") for k in range(k0, k1 + 1) for s in subs) if lo <= t <= hi]
        if fits(ticks):
            if len(ticks) >= 2 or subs is not TICK_SUBS[0]:
                return ticks
            break  # a narrow span: fewer than two of the 1..9 ticks in view
    else:
        for step in range(2, k1 - k0 + 2):
            ticks = [10.0 ** k for k in range(k0, k1 + 1) if k % step == 0 and lo <= 10.0 ** k <= hi]
            if fits(ticks):
                break
        return ticks
    from matplotlib.ticker import MaxNLocator

    for nbins in (4, 3, 2):
        values = MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        ticks = [t for t in (float(f"{v:.6g}") for v in values) if lo <= t <= hi]
        if fits(ticks):
            break
    return ticks
