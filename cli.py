"""The `faster` command line (click). Thin: parse options, build a config, call one library function.

Heavy imports (torch, h5py, decord, torchvision) happen inside the command bodies so that
`faster --help` answers at once; tests/test_cli.py checks sys.modules in a subprocess.
"""
from __future__ import annotations

import sys

import click

from faster import __version__
from faster.errors import UserError

# faster.extract.video.DECODERS and faster.store.schema.COMPRESSIONS, spelled here so --help imports
# neither numpy nor h5py (tests/test_decoding.py checks they agree)
DECODERS = ("auto", "decord", "pyav")
COMPRESSIONS = ("none", "lzf", "gzip", "zstd", "lz4")
DECODER_HELP = "auto: decord, and PyAV (AV1, ...) for a file decord cannot open or decode; or only one of them."
MODEL_HELP = "backbone name (see `faster flops --help` / faster.extract.models.names())"


def _fail(err: Exception) -> None:
    """A faster.errors.UserError (bad value, bad file, incompatible inputs) becomes a one-line click
    error, exit 1; anything else is a bug and keeps its traceback (it is never caught)."""
    raise click.ClickException(str(err)) from err


def _parse_weights(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: expected NAME=PATH", param_hint="--weights")
        out[name] = path
    return out


# Training options shared by `fit` and `ablate` (every cell of a grid is a fit): defined once here.
FIT_OPTIONS = [
    click.option("--val", multiple=True, type=click.Path(exists=True, file_okay=False),
                 help="Validation feature set [default: a held-out fraction of the training videos]."),
    click.option("--epochs", default=10, show_default=True, type=click.IntRange(1)),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1)),
    click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True)),
    click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(min=0)),
    click.option("--dropout", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
    click.option("--optimizer", default="adamw", show_default=True, type=click.Choice(["adamw", "sgd"])),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
                 help="0: one reader thread; W: W DataLoader processes (compressed shards, many cores)."),
    click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 help="Without --val: the fraction of videos held out for validation (chosen by hashing ids)."),
    click.option("--standardize/--no-standardize", default=True, show_default=True,
                 help="Standardise each input channel with training-set statistics (kept in the checkpoint)."),
    click.option("--skip-bad", is_flag=True,
                 help="Leave out (with a warning) shards changed since they were written and videos with NaN/inf."),
]


def _fit_options(command):
    """Apply FIT_OPTIONS to a command, in order."""
    for option in reversed(FIT_OPTIONS):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="faster")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """FASTER: cheap video classification from cached clip features (Zhu et al., AAAI 2020).

    \b
    1. faster extract   decode videos once, run the clip backbones, cache res5 maps in HDF5 shards
    2. faster fit       train an aggregator (FAST-GRU, avg, concat, lstm, gru) on cached features
    3. faster ablate    grids of fits: the paper's Tables 3 and 4 from cached features
    4. faster predict   classify new videos, running the expensive backbone only where the pattern says
    """
    import logging

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("video_root", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Feature-set directory.")
@click.option("--model", "models", multiple=True, required=True, help=MODEL_HELP + "; repeat for several.")
@click.option("--weights", multiple=True, metavar="NAME=PATH", help="Backbone weights file; random init without.")
@click.option("--clip-len", default=8, show_default=True, type=click.IntRange(1))
@click.option("--num-clips", type=click.IntRange(1), help="Clips per video [default: 256 // clip-len].")
@click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Crop size in pixels.")
@click.option("--frame-stride", default=1, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Clips per forward.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Decoding processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="CSV: path,label or Kinetics.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
              help="File with one class name per line (fixes class indices across splits).")
@click.option("--shard-size", default=64, show_default=True, type=click.IntRange(1), help="Videos per shard.")
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(1), help="Slurm array size.")
@click.option("--shard-index", default=0, show_default=True, type=click.IntRange(0), help="Slurm array index.")
@click.option("--compression", default="none", show_default=True, type=click.Choice(COMPRESSIONS),
              help="HDF5 filter of the feature datasets; zstd and lz4 need hdf5plugin to read (docs/storage.md).")
@click.option("--spatial-pool", is_flag=True,
              help="Store each map's mean over H' x W' (T' kept): ~H'W' times smaller, for pooled aggregators "
                   "(avg, lstm, gru, netvlad, ...) only.")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(DECODERS), help=DECODER_HELP)
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before a video whose decode hangs is recorded as failed.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of random initialisation.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--unlabelled", is_flag=True, help="Ignore folder names and CSV labels: every label is -1.")
@click.option("--wait", is_flag=True, help="If another process writes this part of OUT, wait for it instead of refusing.")
@click.option("--allow-empty", is_flag=True, help="Finding no video is not an error (writes an empty feature set).")
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="No progress bar.")
def extract(**kw) -> None:
    """Decode each video once, run every --model over its clips, write res5 maps to HDF5 shards.

    Re-running the same command resumes: videos in complete shards are skipped, failed ones retried.
    Broken videos are recorded in OUT/failures.jsonl (exit 0; non-zero with --strict). Under
    torchrun each rank takes every WORLD_SIZE-th video; --num-shards/--shard-index split a Slurm array.
    """
    from faster.extract.pipeline import ExtractConfig, run_extract

    strict = kw.pop("strict")
    kw["weights"] = _parse_weights(kw["weights"])
    try:
        cfg = ExtractConfig(**kw)
    except UserError as err:
        raise click.UsageError(str(err)) from err
    try:
        summary = run_extract(cfg, echo=lambda line: click.echo(line, err=True))
    except UserError as err:
        _fail(err)
    failed = summary["failed"]
    click.echo(f"extracted {summary['extracted']}, skipped {summary['skipped']} (done before), failed {failed}"
               + (f" (see {summary['failures_file']})" if failed else "")
               + (f", {summary['short']} shorter than one clip" if summary["short"] else "")
               + f"; {summary['run_seconds']:.1f} s, {summary['clips_per_s']:.1f} clips/s, "
                 f"{summary['videos_per_s']:.2f} videos/s on {summary['device']}")
    if summary["interrupted"]:
        click.echo(f"stopped by {summary['interrupted']}: complete shards are kept; run the same command to resume",
                   err=True)
        sys.exit(130 if summary["interrupted"] == "SIGINT" else 143)
    if strict and failed:
        raise click.ClickException(f"{failed} videos failed (--strict)")


@cli.command()
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True,
              help="First resolve videos held by two shards: keep one copy, never a video's only one.")
def verify(feats: tuple[str, ...], repair: bool) -> None:
    """Check every shard of feature sets against the schema; write the merged manifest and failures."""
    from faster.store.verify import repair_dir, verify as verify_dirs

    if repair:
        for d in feats:
            try:
                actions = repair_dir(d)
            except UserError as err:
                _fail(err)
            for line in actions:
                click.echo(f"{d}: {line}")
            if not actions:
                click.echo(f"{d}: nothing to repair")
    report = verify_dirs(feats)
    for r in report["dirs"]:
        stages = ", ".join(f"{k} {v}" for k, v in r["failed_by_stage"].items())
        click.echo(f"{r['dir']}: {_n(r['shards'], 'shard')}, {_n(r['videos'], 'video')}, {r['failed']} failed"
                   + (f" ({stages})" if stages else "") + f", models {', '.join(r['models']) or '-'}: "
                   + ("ok" if r["ok"] else _n(len(r["problems"]), "problem")))
        for note in r["notes"]:
            click.echo(f"  note: {note}")
    for problem in report["problems"]:
        click.echo(f"  problem: {problem}", err=True)
    if not report["ok"]:
        raise click.ClickException(f"{_n(len(report['problems']), 'problem')} found"
                                   + ("; `faster verify --repair` resolves duplicate videos"
                                      if any("is in both" in p for p in report["problems"]) else ""))


def _n(count: int, noun: str) -> str:
    """'1 video', '2 videos'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


@cli.command()
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--agg", required=True, help="Aggregator: avg, concat, lstm, gru, fastgru.")
@click.option("--expensive", required=True, help="Model name of the expensive features.")
@click.option("--cheap", required=True, help="Model name of the cheap features.")
@click.option("--pattern", required=True, help="all-e, all-c, first or 1:x.")
@click.option("--num-clips", type=click.IntRange(1), help="Use n of the extracted clips [default: all].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads [default: torch's choice].")
@click.option("--overwrite", is_flag=True, help="Replace the run already in -o.")
@_fit_options
def fit(feats: tuple[str, ...], val: tuple[str, ...], **kw) -> None:
    """Train an aggregator on cached features for one expensive:cheap pattern.

    \b
    Writes RUN/config.json, checkpoint.pt, metrics.jsonl (one line per epoch), result.json and
    val_predictions.jsonl. Only the model each clip position needs is read; no backbone is loaded.
    e.g. faster fit feats/ -o runs/fg --agg fastgru --expensive r2plus1d50 --cheap r2d26 --pattern 1:3
    """
    from faster.aggregate.train import FitConfig, fit as fit_run

    try:
        r = fit_run(FitConfig(feats=list(feats), val=list(val), **kw))
    except UserError as err:
        _fail(err)
    best = r["best"]
    gflops = "?" if r["gflops_per_video"] is None else f"{r['gflops_per_video']:.1f}"
    click.echo(f"{r['agg']} {r['pattern']} on {r['num_clips']} clips ({r['num_expensive']} E + {r['num_cheap']} C): "
               f"top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}, mean class {r['mean_class_acc']:.4f} "
               f"(best top-1 {best['top1']:.4f} at epoch {best['epoch']}); {gflops} GFLOPs/video; "
               f"{r['num_train']} train / {r['num_val']} val videos; {r['seconds']:.1f} s -> {kw['out']}")


@cli.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Predictions JSONL [default: RUN/predictions.jsonl].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers [default: the run's].")
@click.option("--skip-bad", is_flag=True, help="Leave out changed shards and videos with NaN/inf (with a warning).")
def evaluate(run: str, feats: tuple[str, ...], out: str | None, device: str, workers: int | None,
             skip_bad: bool) -> None:
    """Score a fitted run on feature sets; write per-video predictions.

    Each JSON line: {"id", "label", "probs", "top5": [[class, prob], ...], "gflops"}.
    """
    from faster.aggregate.train import evaluate as evaluate_run

    try:
        r = evaluate_run(run, list(feats), out, device=device, workers=workers, skip_bad=skip_bad)
    except UserError as err:
        _fail(err)
    scores = ("no labelled videos" if r["top1"] is None else
              f"top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}, mean class {r['mean_class_acc']:.4f} "
              f"on {r['num_labelled']} labelled")
    click.echo(f"{r['agg']} {r['pattern']}: {r['num_videos']} videos, {scores}; -> {r['predictions']}")


def _split_list(ctx, param, value: str | None) -> list[str] | None:
    """A comma-separated option value as a list (None stays None)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"{value!r}: expected a comma-separated list", param_hint=param.opts[-1])
    return items


def _split_ints(ctx, param, value: str | None) -> list[int] | None:
    items = _split_list(ctx, param, value)
    try:
        return None if items is None else [int(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers", param_hint=param.opts[-1]) from None


@cli.command()
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Grid directory.")
@click.option("--agg", "aggs", required=True, callback=_split_list, help="Aggregators, e.g. avg,gru,fastgru.")
@click.option("--num-clips", callback=_split_ints, help="Numbers of clips, e.g. 2,4,8 [default: all extracted].")
@click.option("--pattern", "patterns", default="first", show_default=True, callback=_split_list,
              help="Patterns, e.g. first,1:1,all-e.")
@click.option("--seeds", default="0", show_default=True, callback=_split_ints, help="Seeds, e.g. 0,1,2.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Cells trained at once.")
@click.option("--expensive", help="Expensive model [default: the one with more GFLOPs per clip].")
@click.option("--cheap", help="Cheap model [default: the one with fewer GFLOPs per clip].")
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(1),
              help="Processes sharing the grid (Slurm array size); each trains every S-th cell, no tables.")
@click.option("--shard-index", default=0, show_default=True, type=click.IntRange(0), help="Slurm array index.")
@_fit_options
def ablate(feats, out, aggs, num_clips, patterns, seeds, jobs, expensive, cheap, num_shards, shard_index,
           **fit_kw) -> None:
    """Run a grid of fits (aggregators x clips x patterns); reuse finished cells; write tables and a plot.

    Each cell is a run directory OUT/cells/<key>/; running the grid again trains only new cells, and
    grids over feature sets of other clip lengths run into the same OUT fill Table 4's columns.
    Writes OUT/results.csv, OUT/results.md (Tables 3 and 4) and OUT/accuracy_vs_gflops.png.
    On a cluster (--num-shards/--shard-index, or torchrun ranks) each process trains its share of
    the cells into the shared OUT and writes no tables; the same command without the shard options,
    run afterwards, trains what is missing and writes them (docs/ablate-cluster.md).
    """
    from faster.aggregate.ablate import AblateConfig, run_ablate

    fit_kw["val"] = list(fit_kw["val"])
    cfg = AblateConfig(feats=list(feats), out=out, aggs=aggs, num_clips=num_clips, patterns=patterns,
                       seeds=seeds, jobs=jobs, expensive=expensive, cheap=cheap, fit=fit_kw,
                       num_shards=num_shards, shard_index=shard_index)
    try:
        summary = run_ablate(cfg)
    except (UserError, FileNotFoundError) as err:
        _fail(err)
    if summary["num_parts"] == 1:
        _echo_ablate(summary)
        _check_cells(summary)
        return
    for line in summary["failures"] + summary["in_progress"]:
        click.echo(line, err=True)
    click.echo(f"part {summary['part']} of {summary['num_parts']}: {summary['assigned']} of {summary['cells']} cells "
               f"(L={summary['clip_len']}, E={summary['expensive']}, C={summary['cheap']}): {summary['trained']} "
               f"trained, {summary['reused']} reused, {summary['busy']} trained elsewhere, {summary['failed']} "
               f"failed in {summary['seconds']:.1f}s; the tables come from `faster ablate` without "
               f"--num-shards/--shard-index once every part is done", err=True)
    if summary["failed"]:
        raise click.ClickException(f"{summary['failed']} cell(s) failed; running this part again retries them")


def _echo_ablate(summary: dict) -> None:
    """Print results.md's tables and a one-line summary of the grid."""
    click.echo(open(summary["results_md"]).read())
    click.echo(f"{summary['cells']} cells (L={summary['clip_len']}, E={summary['expensive']}, C={summary['cheap']}): "
               f"{summary['trained']} trained, {summary['reused']} reused, {summary['failed']} failed "
               f"({len(summary['skipped'])} pattern/clips pairs skipped) in {summary['seconds']:.1f}s; "
               f"{summary['results_csv']}, plot {summary['plot']}", err=True)


def _check_cells(summary: dict) -> None:
    """Exit 1 when cells failed (the tables hold the others; running again retries them)."""
    if summary["failed"]:
        raise click.ClickException(f"{summary['failed']} cell(s) failed: see {summary['results_md']}")


@cli.command()
@click.argument("videos", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--run", required=True, type=click.Path(exists=True, file_okay=False), help="A fitted run directory.")
@click.option("--weights", multiple=True, metavar="NAME=PATH", help="Backbone weights the features were made with.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Predictions JSONL [default: stdout].")
@click.option("--online", is_flag=True, help="Also write the running prediction after every clip.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Clips per backbone forward (within one video).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0),
              help="Decoding processes (0: decode in this process, no timeout).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before a video whose decode hangs is reported as failed.")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(DECODERS), help=DECODER_HELP)
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
def predict(videos, run, weights, out, online, device, batch_size, workers, timeout, decoder, strict) -> None:
    """Classify videos with a fitted run, calling the expensive backbone only where the pattern says.

    VIDEOS are files or directories (searched for video files; ids are paths relative to them).
    Writes one JSON line per video: id, probs, top5, gflops, seconds (and, with --online, the
    running prediction after every clip); a broken video is a line with "error" and "stage".
    """
    from faster.predict import PredictConfig, predict as run_predict

    cfg = PredictConfig(videos=list(videos), run=run, weights=_parse_weights(weights), out=out, online=online,
                        device=device, batch_size=batch_size, workers=workers, timeout=timeout, decoder=decoder,
                        strict=strict)
    try:
        summary = run_predict(cfg)
    except (UserError, FileNotFoundError) as err:
        _fail(err)
    click.echo(summary.line(), err=True)


@cli.command()
@click.option("--expensive", default="r2plus1d50", show_default=True, help=MODEL_HELP)
@click.option("--cheap", default="r2d26", show_default=True, help=MODEL_HELP)
@click.option("--clip-len", default=8, show_default=True, type=click.IntRange(1))
@click.option("--num-clips", type=click.IntRange(1), help="[default: 256 // clip-len]")
@click.option("--size", default=224, show_default=True, type=click.IntRange(8))
@click.option("--pattern", default="all-e", show_default=True, help="all-e, all-c, first or 1:x.")
@click.option("--agg", default="fastgru", show_default=True, help="Aggregator whose cost is added.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def flops(expensive: str, cheap: str, clip_len: int, num_clips: int | None, size: int, pattern: str, agg: str,
          as_json: bool) -> None:
    """GFLOPs (multiply-adds, the paper's convention) per clip and per video for a pattern.

    \b
    video GFLOPs = #E * E-GFLOPs/clip + #C * C-GFLOPs/clip + aggregator GFLOPs
    e.g. faster flops --clip-len 16 --pattern 1:7   (FASTER16 of the paper, Table 4)
    """
    import json

    from faster.aggregate import patterns
    from faster.extract import models

    n = num_clips or max(1, 256 // clip_len)
    for hint, name in (("--expensive", expensive), ("--cheap", cheap)):
        if name not in models.names():
            raise click.BadParameter(f"unknown backbone {name!r}; expected one of {', '.join(models.names())}",
                                     param_hint=hint)
    try:
        num_e, num_c = patterns.counts(pattern, n)
    except UserError as err:
        raise click.BadParameter(str(err), param_hint="--pattern") from None
    try:
        gflops = {m: models.clip_gflops(m, clip_len, size) for m in (expensive, cheap)}
        shapes = {m: models.feature_shape(m, clip_len, size) for m in (expensive, cheap)}
    except UserError as err:
        raise click.UsageError(str(err)) from None
    used = [m for m, k in ((expensive, num_e), (cheap, num_c)) if k]
    C, T, H, W = shapes[used[0]]
    note = None if len({shapes[m] for m in used}) == 1 else (
        f"{cheap}'s {list(shapes[cheap])} maps are aligned to {expensive}'s {list(shapes[expensive])}: "
        "the projection is counted")
    from faster.aggregate.flops import count_gflops

    sources = {src: list(shapes[m]) for src, m, k in (("expensive", expensive, num_e), ("cheap", cheap, num_c)) if k}
    try:
        agg_gflops = count_gflops(agg, {"num_classes": 400, "sources": sources, "dropout": 0.0},
                                  patterns.expensive_mask(pattern, n))
    except UserError as err:
        raise click.BadParameter(str(err), param_hint="--agg") from None
    video = patterns.video_gflops(num_e, num_c, gflops[expensive], gflops[cheap], agg_gflops)
    if as_json:
        out = {"clip_gflops": gflops, "aggregator_gflops": agg_gflops, "video_gflops": video,
               "num_expensive": num_e, "num_cheap": num_c, "pattern": pattern, "num_clips": n,
               "clip_len": clip_len, "size": size, "expensive": expensive, "cheap": cheap, "agg": agg,
               "feature_shape": [C, T, H, W]}
        if note:
            out["note"] = note
        click.echo(json.dumps(out))
        return
    click.echo(f"{n} clips of {clip_len} frames at {size} px, pattern {pattern}: {num_e} expensive, {num_c} cheap; "
               f"features {C} x {T} x {H} x {W} (C x T' x H' x W')")
    click.echo(f"  expensive  {expensive:<16} {gflops[expensive]:9.2f} GFLOPs/clip x {num_e:3d} = "
               f"{num_e * gflops[expensive]:9.2f}")
    click.echo(f"  cheap      {cheap:<16} {gflops[cheap]:9.2f} GFLOPs/clip x {num_c:3d} = "
               f"{num_c * gflops[cheap]:9.2f}")
    click.echo(f"  aggregator {agg:<16} {'':>27} = {agg_gflops:9.2f}" + (f"  ({note})" if note else ""))
    click.echo(f"  video      {'':<16} {'':>27} = {video:9.2f} GFLOPs")


@cli.command()
@click.option("-o", "--out", default="faster-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A reduced size for CI: tiny backbones, fewer and smaller videos.")
@click.option("--weights", multiple=True, metavar="NAME=PATH", help="Backbone weights (random init without).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Grid cells trained at once.")
def demo(out, quick, weights, device, jobs) -> None:
    """Make a small labelled video set, extract, fit a small grid and print the accuracy/GFLOPs table.

    The videos' classes are motion directions (one frame cannot tell them apart). Full size: the
    paper's R(2+1)D-50 and R2D-26 at 112 px, a few minutes on a 2-core CPU; --quick: seconds.
    Running it again into the same directory reuses what is already there.
    """
    from faster.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, quick=quick, weights=_parse_weights(weights), device=device, jobs=jobs)
    if not cfg.weights:
        click.echo("faster demo: the backbones are randomly initialised (no --weights given).", err=True)
    try:
        summary = run_demo(cfg)
    except (UserError, FileNotFoundError) as err:
        _fail(err)
    _echo_ablate(summary)
    _check_cells(summary)
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items())
    click.echo(f"Demo in {out} ({timings}). Plot: {summary['plot']}")
    if summary["random_init"]:
        click.echo(f"Note: {' and '.join(summary['random_init'])} were randomly initialised (no --weights), so "
                   "these accuracies only show that the pipeline works, not what FASTER reaches with trained "
                   "backbones.")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds (temporary files removed) like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """The `faster` entry point: Ctrl-C exits 130 and SIGTERM 143 at any moment, without a traceback;
    click's other errors print their one line (exit 1, or 2 for usage)."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = cli.main(args=argv, prog_name="faster", standalone_mode=False)
    except click.exceptions.Abort as err:  # click turns KeyboardInterrupt into Abort
        terminated = isinstance(err.__context__, Terminated) or isinstance(err.__cause__, Terminated)
        click.echo("\nterminated" if terminated else "\ninterrupted", err=True)
        sys.exit(143 if terminated else 130)
    except KeyboardInterrupt as err:
        click.echo("\nterminated" if isinstance(err, Terminated) else "\ninterrupted", err=True)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
