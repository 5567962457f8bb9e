"""faster ablate: grid expansion, the cell cache (a re-run trains nothing), tables, the plot, the CLI."""
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from faster.aggregate import ablate
from faster.cli import cli


def write_features(root, *, clip_len=8, num_clips=8, videos=16, seed=0):
    """A tiny feature set of an expensive ("big", 10 GFLOPs/clip) and a cheap ("small", 1) model whose
    class is planted in the order of the clips (faster.aggregate.synthetic, signal "order")."""
    from faster.aggregate.synthetic import write_synthetic

    t = max(clip_len // 8, 1)
    return write_synthetic(root, num_videos=videos, num_clips=num_clips, clip_len=clip_len,
                           models={"big": (t, 2, 2, 8), "small": (t, 2, 2, 8)}, gflops=(10.0, 1.0), seed=seed)


# ------------------------------------------------------------------------------------------ grid


def test_expand_grid_skips_invalid_cells_with_a_note():
    cells, notes = ablate.expand_grid(["avg", "fastgru"], [2, 3, 4, 16], ["first", "1:1", "1:3", "all-e"], [0, 1],
                                 num_extracted=8)
    keys = {(c.agg, c.num_clips, c.pattern, c.seed) for c in cells}
    # 1:1 needs an even count, 1:3 a multiple of 4; 16 clips exceed the 8 extracted.
    assert ("avg", 3, "1:1", 0) not in keys and ("fastgru", 2, "1:3", 1) not in keys
    assert ("avg", 4, "1:3", 1) in keys and ("fastgru", 3, "first", 0) in keys
    assert not any(c.num_clips == 16 for c in cells)
    valid_pairs = {(2, "first"), (2, "1:1"), (2, "all-e"), (3, "first"), (3, "all-e"),
                   (4, "first"), (4, "1:1"), (4, "1:3"), (4, "all-e")}
    assert len(cells) == len(valid_pairs) * 2 * 2
    assert any("16 clips" in n for n in notes)
    assert any("1:1 at 3 clips" in n for n in notes) and any("1:3 at 2 clips" in n for n in notes)


def test_expand_grid_defaults_to_all_clips_and_rejects_bad_patterns():
    cells, notes = ablate.expand_grid(["gru"], None, ["1:3"], [0], num_extracted=8)
    assert [(c.num_clips, c.pattern) for c in cells] == [(8, "1:3")] and notes == []
    with pytest.raises(ValueError, match="1-3"):
        ablate.expand_grid(["gru"], [4], ["1-3"], [0], num_extracted=8)


def test_cell_key_ignores_paths_and_threads_but_not_data_or_options():
    base = {"feats": ["/a"], "val": [], "out": "/x", "agg": "gru", "lr": 1e-3, "threads": 1, "workers": 2,
            "progress": True}
    k = ablate.cell_key(base, [["s1"]], [])
    assert ablate.cell_key({**base, "feats": ["/b"], "out": "/y", "threads": 4, "workers": 0, "progress": False},
                      [["s1"]], []) == k
    assert ablate.cell_key({**base, "lr": 1e-2}, [["s1"]], []) != k
    assert ablate.cell_key(base, [["s2"]], []) != k


def test_checksums_come_from_the_manifest_or_a_cached_hash(tmp_path):
    feats = write_features(tmp_path / "feats")
    for manifest in feats.glob("manifest*.json"):  # shards without manifests: hashed and cached
        manifest.unlink()
    shard = next(feats.glob("shard-*.h5"))
    cache = ablate.ChecksumCache(tmp_path / "sums.json")
    hashed = ablate.feature_checksums(feats, cache)
    cache.save()
    assert len(hashed) == 1 and len(hashed[0]) == 64
    again = ablate.ChecksumCache(tmp_path / "sums.json")
    assert again.entries[str(shard.resolve())]["sha256"] == hashed[0]
    (feats / "manifest.json").write_text(json.dumps({"shards": [{"name": shard.name, "sha256": "f" * 64}]}))
    assert ablate.feature_checksums(feats, again) == ["f" * 64]
    stale = {"shards": [{"name": shard.name, "sha256": "f" * 64, "bytes": shard.stat().st_size + 1}]}
    (feats / "manifest.json").write_text(json.dumps(stale))  # listed for another file size: hashed instead
    assert ablate.feature_checksums(feats, again) == hashed


def test_resolve_models_picks_the_costlier_model_as_expensive():
    assert ablate.resolve_models(None, None, {"small": 1.0, "big": 10.0}) == ("big", "small")
    assert ablate.resolve_models(None, "big", {"small": 1.0, "big": 10.0}) == ("small", "big")
    assert ablate.resolve_models(None, None, {"big": 10.0}) == ("big", "big")
    with pytest.raises(ValueError, match="'huge'"):
        ablate.resolve_models("huge", None, {"small": 1.0, "big": 10.0})
    with pytest.raises(ValueError, match="--expensive"):
        ablate.resolve_models(None, None, {"a": 1.0, "b": 2.0, "c": 3.0})


# ---------------------------------------------------------------------------------------- tables


def _row(agg, clip_len, n, pattern, seed, top1, gflops):
    return {"agg": agg, "clip_len": clip_len, "num_clips": n, "pattern": pattern, "seed": seed, "top1": top1,
            "top5": 1.0, "mean_class_acc": top1, "gflops_per_video": gflops, "num_expensive": 1,
            "num_cheap": n - 1, "expensive": "big", "cheap": "small", "run": f"cells/{agg}-{n}-{seed}"}


def test_markdown_tables_have_the_papers_shapes():
    rows = [_row("avg", 8, 2, "first", 0, 0.5, 11.0), _row("avg", 8, 4, "first", 0, 0.6, 13.0),
            _row("fastgru", 8, 2, "first", 0, 0.7, 11.1), _row("fastgru", 8, 2, "first", 1, 0.8, 11.1),
            _row("fastgru", 8, 4, "1:1", 0, 0.9, 22.2), _row("fastgru", 16, 2, "all-e", 0, 0.95, 40.0)]
    md = ablate.render_markdown(rows, ["L=8: pattern 1:1 at 3 clips skipped"])
    lines = md.splitlines()
    t3 = lines.index("## Table 3 layout: aggregator x number of clips (E = big, C = small, L = 8, pattern first)")
    assert lines[t3 + 2] == "| Model | 2 | 4 |"
    assert lines[t3 + 4] == "| Avg. pool | 50.0 | 60.0 |"
    assert lines[t3 + 5].startswith("| FAST-GRU | 75.0 ± 7.1 |")  # mean and std over two seeds
    t4 = [i for i, line in enumerate(lines) if line.startswith("## Table 4 layout") and "FAST-GRU" in line][0]
    # Columns: each clip length at its largest number of clips (the paper's 8x32, 16x16, 32x8).
    assert lines[t4 + 2] == "| #E:#C | 8-frames x 4-clips V@1 | GFLOPs | 16-frames x 2-clips V@1 | GFLOPs |"
    assert lines[t4 + 4:t4 + 7] == ["| All E |  |  | 95.0 | 40.0 |", "| 1:1 | 90.0 | 22.2 |  |  |", ""]
    assert "- L=8: pattern 1:1 at 3 clips skipped" in lines


def test_plot_file_is_a_png(tmp_path):
    rows = [_row("avg", 8, 2, "first", 0, 0.5, 11.0), _row("gru", 8, 4, "first", 0, 0.6, 13.0)]
    path = ablate.plot_accuracy_vs_gflops(rows, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------ whole grids


FAST = {"epochs": 2, "batch_size": 8, "workers": 0, "device": "cpu"}


@pytest.mark.slow
def test_grid_writes_cells_tables_and_plot_then_reuses_every_cell(tmp_path, monkeypatch):
    feats = write_features(tmp_path / "f8")
    out = tmp_path / "grid"
    cfg = ablate.AblateConfig(feats=[str(feats)], out=str(out), aggs=["avg", "fastgru"], num_clips=[3, 4],
                         patterns=["first", "1:1"], fit=dict(FAST), progress=False)
    summary = ablate.run_ablate(cfg)
    assert (summary["cells"], summary["trained"], summary["reused"], summary["failed"]) == (6, 6, 0, 0)
    assert summary["expensive"] == "big" and summary["cheap"] == "small"
    assert summary["skipped"] == ["pattern 1:1 at 3 clips skipped: x+1 must divide the number of clips"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == set(ablate.CSV_COLUMNS)
    assert {(r["agg"], r["num_clips"], r["pattern"]) for r in rows} >= {("avg", "3", "first"), ("fastgru", "4", "1:1")}
    for r in rows:
        run = out / r["run"]
        assert {"config.json", "checkpoint.pt", "metrics.jsonl", "result.json"} <= {p.name for p in run.iterdir()}
        assert 0.0 <= float(r["top1"]) <= 1.0 and r["clip_len"] == "8"
        ne, nc = int(r["num_expensive"]), int(r["num_cheap"])
        assert float(r["gflops_per_video"]) >= 10 * ne + 1 * nc
    assert (out / "accuracy_vs_gflops.png").stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "pattern first)" in md and "| FAST-GRU |" in md and "Table 4 layout" in md
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}

    from faster.aggregate import fit as fitting

    def no_training(cfg, **kw):
        raise AssertionError(f"fit called again for {cfg.out}")

    monkeypatch.setattr(fitting, "fit", no_training)
    again = ablate.run_ablate(cfg)
    assert (again["trained"], again["reused"], again["failed"]) == (0, 6, 0)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()} == mtimes


@pytest.mark.slow
def test_adding_an_aggregator_trains_only_its_column_and_clip_lengths_accumulate(tmp_path, monkeypatch):
    f8, f16 = write_features(tmp_path / "f8"), write_features(tmp_path / "f16", clip_len=16, num_clips=4)
    out = tmp_path / "grid"
    base = dict(out=str(out), num_clips=[2, 4], patterns=["first"], fit=dict(FAST), progress=False)
    ablate.run_ablate(ablate.AblateConfig(feats=[str(f8)], aggs=["avg"], **base))

    from faster.aggregate import fit as fitting

    real_fit, trained = fitting.fit, []
    monkeypatch.setattr(fitting, "fit", lambda cfg, **kw: trained.append((cfg.agg, cfg.num_clips)) or real_fit(cfg, **kw))
    summary = ablate.run_ablate(ablate.AblateConfig(feats=[str(f8)], aggs=["avg", "gru"], **base))
    assert sorted(trained) == [("gru", 2), ("gru", 4)] and summary["reused"] == 2
    trained.clear()
    ablate.run_ablate(ablate.AblateConfig(feats=[str(f16)], aggs=["gru"], **base))
    assert sorted(trained) == [("gru", 2), ("gru", 4)]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["clip_len"], r["agg"], r["num_clips"]) for r in rows) == [
        ("16", "gru", "2"), ("16", "gru", "4"), ("8", "avg", "2"), ("8", "avg", "4"), ("8", "gru", "2"),
        ("8", "gru", "4")]
    md = (out / "results.md").read_text()
    assert "L = 8, pattern first" in md and "L = 16, pattern first" in md
    assert "8-frames x 4-clips V@1" in md and "16-frames x 4-clips V@1" in md


@pytest.mark.slow
def test_ablate_cli_runs_a_grid_in_parallel(tmp_path):
    feats = write_features(tmp_path / "f8")
    out = tmp_path / "grid"
    args = ["ablate", str(feats), "-o", str(out), "--agg", "avg,gru", "--num-clips", "4", "--pattern",
            "first,all-e", "-j", "2", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| GRU |" in result.output and "4 trained, 0 reused" in result.output
    assert len(os.listdir(out / "cells")) == 4
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "0 trained, 4 reused" in result.output


def test_ablate_cli_names_bad_values(tmp_path):
    feats = write_features(tmp_path / "f8")
    result = CliRunner().invoke(cli, ["ablate", str(feats), "-o", str(tmp_path / "g"), "--agg", "gru",
                                      "--pattern", "1-3"])
    assert result.exit_code == 1 and "'1-3'" in result.output
    result = CliRunner().invoke(cli, ["ablate", str(feats), "-o", str(tmp_path / "g"), "--agg", "gru",
                                      "--num-clips", "2,x"])
    assert result.exit_code == 2 and "2,x" in result.output


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_retried_while_the_others_are_kept(tmp_path, monkeypatch):
    feats = write_features(tmp_path / "f8", num_clips=4)
    out = tmp_path / "grid"
    cfg = ablate.AblateConfig(feats=[str(feats)], out=str(out), aggs=["avg", "gru"], patterns=["first"],
                         fit=dict(FAST), progress=False)
    from faster.aggregate import fit as fitting

    real_fit = fitting.fit

    def gru_breaks(c, **kw):
        if c.agg == "gru":
            raise RuntimeError("out of patience")
        return real_fit(c, **kw)

    monkeypatch.setattr(fitting, "fit", gru_breaks)
    summary = ablate.run_ablate(cfg)
    assert (summary["trained"], summary["failed"]) == (1, 1)
    assert "gru first at 4 clips (seed 0) failed" in (out / "results.md").read_text()
    assert summary["failures"][0].endswith("RuntimeError: out of patience")
    assert [r["agg"] for r in csv.DictReader(open(out / "results.csv"))] == ["avg"]
    monkeypatch.setattr(fitting, "fit", real_fit)
    again = ablate.run_ablate(cfg)
    assert (again["trained"], again["reused"], again["failed"]) == (1, 1, 0)
    assert sorted(r["agg"] for r in csv.DictReader(open(out / "results.csv"))) == ["avg", "gru"]
    assert "failed" not in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------ plot


def _spread_rows(lo, hi):
    """Three aggregators x three patterns over 5 numbers of clips whose costs span lo..hi GFLOPs."""
    import numpy as np

    rows = []
    for j, (agg, pattern) in enumerate([("avg", "first"), ("gru", "1:1"), ("fastgru", "all-e")]):
        for i, g in enumerate(np.geomspace(lo, hi, 5)):
            rows.append(_row(agg, 8, 2 * (i + 1), pattern, 0, 0.3 + 0.1 * i, float(g) * (1 + 0.003 * j)))
    return rows


@pytest.mark.parametrize("lo,hi", [(0.05, 0.09), (1, 1000), (100, 1000), (0.02, 0.4), (0.051, 0.053), (1e-3, 1e5)])
def test_plot_tick_labels_never_overlap_and_the_legend_sits_outside_the_axes(lo, hi):
    fig = ablate.accuracy_vs_gflops_figure(_spread_rows(lo, hi))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in labels]
    texts = [t.get_text() for t in labels]
    assert len(labels) >= 2, texts  # enough values to read the axis by
    assert all("$" not in s and "10^" not in s for s in texts), texts  # plain numbers, not 10^k
    boxes.sort(key=lambda b: b.x0)
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 < b.x0, f"x tick labels overlap: {texts}"
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 > ax.get_window_extent(renderer).x1  # to the right of the points, not over them
    assert not any(legend.overlaps(b) for b in boxes)


def test_readable_log_ticks_thin_out_as_the_axis_shortens():
    wide = ablate.readable_log_ticks(1, 1000, 1000, 10)
    narrow = ablate.readable_log_ticks(1, 1000, 100, 10)
    assert {1, 10, 100, 1000} <= set(wide) and len(wide) > len(narrow) >= 2
    assert ablate.readable_log_ticks(0.05, 0.09, 400, 10) == [0.05, 0.06, 0.07, 0.08, 0.09]


# ------------------------------------------------------------------------------- grids over a cluster


def test_file_lock_claims_are_exclusive_and_taken_over_from_gone_holders(tmp_path):
    import time

    from faster.store.lock import FileLock, LockHeld, _start_time

    path = tmp_path / "cell.claim"
    with FileLock(path, what="the claim of cell x") as held:
        assert not FileLock(path).try_acquire()  # a live holder (this very process, another claim)
        with pytest.raises(LockHeld, match=r"the claim of cell x is held by pid \d+ on "):
            FileLock(path, what="the claim of cell x").acquire()
        assert held.still_held()
    assert not path.exists()
    me = FileLock(path).me
    for record in ({"host": me["host"], "pid": 2 ** 22 + 7, "since": "x"},  # a dead pid on this host
                   {"host": me["host"], "pid": os.getpid(), "start": (_start_time(os.getpid()) or 0) + 1,
                    "since": "x"}):  # this pid, but a process that started at another time: reused
        path.write_text(json.dumps(record))
        lock = FileLock(path)
        assert lock.try_acquire() and lock.still_held()
        lock.release()
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "since": "x"}))
    assert not FileLock(path, stale_after=600).try_acquire()  # another host, heartbeat just now: alive
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = FileLock(path, stale_after=600)
    assert lock.try_acquire()  # silent for an hour: taken over
    lock.release()
    # Two processes judged one stale claim at once; the second looks after the first re-created it:
    # its takeover must put the fresh claim back, not remove it.
    stale = {"host": "some-other-node", "pid": 1, "since": "x"}
    fresh = FileLock(path)
    assert fresh.try_acquire()
    FileLock(path)._take_over(stale, "no heartbeat for 3600 s")
    assert fresh.still_held() and not list(tmp_path.glob("*.takeover-*"))
    fresh.release()


def test_shards_split_the_grid_in_a_fixed_order(tmp_path, monkeypatch):
    feats = write_features(tmp_path / "f8", num_clips=4, videos=8)
    base = dict(feats=[str(feats)], out=str(tmp_path / "grid"), aggs=["avg", "gru", "fastgru"], num_clips=[2, 4],
                patterns=["first"], seeds=[0, 1], progress=False)
    whole = ablate.plan_grid(ablate.AblateConfig(**base))
    names = [run_dir.name for _, run_dir in whole.cells]
    assert len(names) == 12 and [Path(f["out"]).name for f, _ in whole.mine] == names
    parts = [ablate.plan_grid(ablate.AblateConfig(**base, num_shards=3, shard_index=i)) for i in range(3)]
    for i, p in enumerate(parts):
        assert [Path(f["out"]).name for f, _ in p.mine] == names[i::3] and (p.part, p.num_parts) == (i, 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ranked = ablate.plan_grid(ablate.AblateConfig(**base, num_shards=2, shard_index=1))  # torchrun inside a Slurm task
    assert (ranked.part, ranked.num_parts) == (3, 4)
    assert [Path(f["out"]).name for f, _ in ranked.mine] == names[3::4]
    with pytest.raises(ValueError, match="shard_index 2"):
        ablate.plan_grid(ablate.AblateConfig(**base, num_shards=2, shard_index=2))


def _ablate_cmd(feats, out, *extra):
    return [sys.executable, "-m", "faster", "ablate", str(feats), "-o", str(out), "--agg", "avg,gru,fastgru",
            "--num-clips", "2,4", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            *extra]


@pytest.mark.slow
def test_shard_processes_started_together_train_each_cell_once_then_the_closing_run_writes_tables(
        tmp_path, monkeypatch):
    import re
    import subprocess

    feats = write_features(tmp_path / "f8", num_clips=4)
    out = tmp_path / "grid"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Shards 0 and 1 of 2, and shard 0 again (a resubmitted array task whose first run still goes on).
    shards = [("--num-shards", "2", "--shard-index", "0"), ("--num-shards", "2", "--shard-index", "1"),
              ("--num-shards", "2", "--shard-index", "0")]
    procs = [subprocess.Popen(_ablate_cmd(feats, out, *s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for s in shards]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    trained = [int(re.search(r"(\d+) trained", stderr).group(1)) for _, stderr in outputs]
    done = sorted((out / "cells").glob(f"*/{ablate.CELL_DONE}"))
    assert len(done) == 6 and sum(trained) == 6  # every cell trained, and trained once
    trainers = [json.loads(d.read_text())["trained_by"]["pid"] for d in done]
    assert [trainers.count(p.pid) for p in procs] == trained
    for d in done:  # one epoch each: no cell was trained twice into its directory
        assert len((d.parent / "metrics.jsonl").read_text().splitlines()) == 1
    plan = ablate.plan_grid(ablate.AblateConfig(feats=[str(feats)], out=str(out), aggs=["avg", "gru", "fastgru"],
                                      num_clips=[2, 4], fit={"epochs": 1, "batch_size": 8, "workers": 0,
                                                             "device": "cpu"}, progress=False))
    by_shard1 = {d.parent.name for d, pid in zip(done, trainers) if pid == procs[1].pid}
    assert by_shard1 == {run_dir.name for _, run_dir in plan.cells[1::2]}  # every 2nd cell of the fixed order
    assert not list(out.glob("results*")) and not list(out.glob("*.png"))  # parts write no tables
    assert len(json.loads((out / ablate.INDEX).read_text())["cells"]) == 6  # merged, no entry lost
    assert not list((out / ablate.CLAIMS).iterdir())  # every claim released

    from faster.aggregate import fit as fitting

    def no_training(cfg, **kw):
        raise AssertionError(f"fit called again for {cfg.out}")

    monkeypatch.setattr(fitting, "fit", no_training)
    result = CliRunner().invoke(cli, _ablate_cmd(feats, out)[3:])
    assert result.exit_code == 0, result.output
    assert "0 trained, 6 reused" in result.output and "| FAST-GRU |" in result.output
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "accuracy_vs_gflops.png").stat().st_size > 5000


@pytest.mark.slow
def test_a_killed_claim_is_retaken_and_a_live_one_is_left_alone(tmp_path):
    import signal
    import subprocess

    feats = write_features(tmp_path / "f8", num_clips=4)
    out = tmp_path / "grid"
    cfg = ablate.AblateConfig(feats=[str(feats)], out=str(out), aggs=["avg", "gru"], patterns=["first"],
                         fit=dict(FAST), progress=False)
    plan = ablate.plan_grid(cfg)
    (_, avg_dir), (_, gru_dir) = plan.cells
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from faster.store.lock import FileLock; "
         "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
         str(plan.claim_path(avg_dir))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        avg_dir.mkdir()
        (avg_dir / "config.json").write_text("{}")  # the holder's half-written run
        me = json.loads(plan.claim_path(avg_dir).read_text())
        dead = {**me, "pid": 2 ** 22 + 7, "token": "killed"}  # a claim naming a dead pid on this host
        plan.claim_path(gru_dir).write_text(json.dumps(dead))

        first = ablate.run_ablate(cfg)
        assert (first["trained"], first["busy"]) == (1, 1)  # gru retaken; avg's holder is alive
        assert (gru_dir / ablate.CELL_DONE).exists() and not (avg_dir / ablate.CELL_DONE).exists()
        assert f"being trained by pid {holder.pid} on " in (out / "results.md").read_text()
        assert (avg_dir / "config.json").read_text() == "{}"  # a live holder's directory is not touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    again = ablate.run_ablate(cfg)
    assert (again["trained"], again["reused"], again["busy"], again["failed"]) == (1, 1, 0, 0)
    assert json.loads((avg_dir / ablate.CELL_DONE).read_text())["trained_by"]["pid"] == os.getpid()
    assert "being trained" not in (out / "results.md").read_text()
    assert not list((out / ablate.CLAIMS).iterdir())


@pytest.mark.slow
def test_a_taught_grid_gives_its_column_beside_the_untaught_one(tmp_path):
    from faster.aggregate import fit as fitting

    feats = write_features(tmp_path / "feats", videos=32)
    teacher = tmp_path / "teacher"
    fitting.fit(fitting.FitConfig(feats=[str(feats)], out=str(teacher), agg="gru", expensive="big", cheap="small",
                              pattern="all-e", epochs=2, batch_size=8, workers=0, progress=False))
    grid = tmp_path / "grid"
    base = ["ablate", str(feats), "-o", str(grid), "--agg", "gru", "--pattern", "all-c", "--epochs", "2",
            "--batch-size", "8"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    res = CliRunner().invoke(cli, [*base, "--teacher", str(teacher)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(grid / "results.csv")))
    assert sorted(r["agg"] for r in rows) == ["gru", "gru+kd"]
    assert [r["teacher"] for r in rows if r["agg"] == "gru+kd"] == [str(teacher)]
    assert "GRU + KD" in (grid / "results.md").read_text()


def test_corrupt_bookkeeping_is_rebuilt_from_the_cells_and_no_finished_cell_vanishes(tmp_path, monkeypatch, caplog):
    """[24] item 8: a corrupt index.json is rebuilt from the intact cells (not silently reset); a
    corrupt cell.json is rebuilt from its complete run (nothing retrained), its cell retrained when the
    run is incomplete, and a corrupt cell of another grid is named in results.md, never a traceback."""
    from faster.aggregate import fit as fitting

    feats = write_features(tmp_path / "f8", videos=8)
    out = tmp_path / "grid"
    cfg = ablate.AblateConfig(feats=[str(feats)], out=str(out), aggs=["avg"], num_clips=[4],
                              patterns=["first", "1:1"], fit=dict(FAST), progress=False)
    assert ablate.run_ablate(cfg)["trained"] == 2
    index = json.loads((out / "index.json").read_text())
    cells = sorted(index["cells"].values())
    (out / "index.json").write_text("{not json")
    (out / "cells" / cells[0] / "cell.json").write_text('{"agg": "avg", "cut sh')

    def no_training(cfg, **kw):
        raise AssertionError(f"fit called again for {cfg.out}")

    monkeypatch.setattr(fitting, "fit", no_training)
    with caplog.at_level("WARNING"):
        again = ablate.run_ablate(cfg)
    assert (again["trained"], again["reused"], again["failed"], again["rows"]) == (0, 2, 0, 2)
    assert json.loads((out / "index.json").read_text())["cells"] == index["cells"]
    assert len(list(out.glob("index.json.unreadable-*"))) == 1
    assert len(list((out / "cells" / cells[0]).glob("cell.json.unreadable-*"))) == 1
    assert json.loads((out / "cells" / cells[0] / "cell.json").read_text())["rebuilt_from"] == "result.json"
    assert any("index.json was unreadable" in r.message for r in caplog.records)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    # an incomplete run behind an unreadable cell.json: that cell alone is trained again
    monkeypatch.undo()
    (out / "cells" / cells[1] / "cell.json").write_text("[]")
    (out / "cells" / cells[1] / "result.json").unlink()
    assert (ablate.run_ablate(cfg)["trained"], len(list((out / "cells").glob("*/cell.json")))) == (1, 2)

    # another grid's cell left unreadable: named in the summary and results.md, the grid goes on
    (out / "cells" / cells[0] / "cell.json").write_text("")
    other = ablate.run_ablate(dataclasses.replace(cfg, patterns=["all-e"]))
    assert other["trained"] == 1 and other["rows"] == 2
    assert len(other["unreadable"]) == 1 and cells[0] in other["unreadable"][0]
    assert cells[0] in (out / "results.md").read_text()
