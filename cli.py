"""The `faster` command line (click). Thin: parse options, build a config, call one library function.

Heavy imports (torch, h5py, decord, torchvision) happen inside the command bodies so that
`faster --help` answers at once; tests/test_cli.py checks sys.modules in a subprocess.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from faster import __version__
from faster.errors import UserError

# faster.extract.video.DECODERS and faster.store.schema.COMPRESSIONS, spelled here so --help imports
# neither numpy nor h5py (tests/test_decoding.py checks they agree)
DECODERS = ("auto", "decord", "pyav")
COMPRESSIONS = ("none", "lzf", "gzip", "zstd", "lz4")
DECODER_HELP = ("auto: decord for H.264, HEVC, VP8/9, ProRes in MP4/MOV/MKV/WebM (what it reads exactly), PyAV "
                "for the rest (AV1, MPEG-2, MPEG-4 Part 2, AVI, MPEG-PS/TS), each the other's fallback; or only one.")
ORDERS = ("temporal", "coarse-to-fine")  # faster.aggregate.schedule.ORDERS and EXITS, spelled here for a light --help
EXITS = ("threshold", "gate")
EXIT_BUDGET_HELP = "the mean fraction of a video's clips to read, in (0, 1], e.g. 0.5"
MODEL_HELP = "backbone name, e.g. r2plus1d50 or r2d26 (`faster flops --list` prints every name with its cost)"


def _fail(err: Exception) -> None:
    """A faster.errors.UserError (bad value, bad file, incompatible inputs) becomes a one-line click
    error, exit 1; anything else is a bug and keeps its traceback (it is never caught)."""
    raise click.ClickException(str(err)) from err


_NO_SPACE = re.compile(r"errno = 28|No space left on device|\[Errno 28\]")
_FILENAME = re.compile(r"filename = '([^']+)'")


def _disk_full(err: BaseException) -> str | None:
    """The one-line message of a write that failed because the disk is full (an OSError with errno
    ENOSPC, or h5py's RuntimeError/OSError quoting errno 28), naming the file and the space left; None
    for any other error."""
    import errno
    import shutil

    text = str(err)
    if not (getattr(err, "errno", None) == errno.ENOSPC or _NO_SPACE.search(text)):
        return None
    name = getattr(err, "filename", None) or (m.group(1) if (m := _FILENAME.search(text)) else None)
    where = Path(name).parent if name else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    return (f"no space left on the device writing {name or where} ({free / 2**20:.1f} MiB free there): nothing "
            f"written so far is lost and the file being written was discarded; free space (or write elsewhere) and "
            f"run the same command again to continue")


class _Group(click.Group):
    """The `faster` group: a full disk in any command is one line (exit 1), not an h5py or torch traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (OSError, RuntimeError) as err:
            message = _disk_full(err)
            if message is None:
                raise
            raise click.ClickException(message) from err


def _parse_sizes(values: tuple[str, ...], default: int = 224) -> tuple[int, dict[str, int]]:
    """--size values: PX (every model's crop; the last one given counts, as for any option) and NAME=PX
    for single models."""
    return _parse_per_model(values, "--size", default, unit="PX", minimum=8, too_small="a crop must be >= 8 pixels")


def _parse_per_model(values: tuple[str, ...], option: str, default: int, *, unit: str = "N", minimum: int = 1,
                     too_small: str | None = None) -> tuple[int, dict[str, int]]:
    """Values of an option given for every model or one (--size, --clip-len, --frame-stride): N (every
    model's; the last one given counts, as for any option) and NAME=N for single models."""
    shared, per_model = None, {}
    for v in values:
        name, sep, n = v.rpartition("=")
        try:
            n_int = int(n)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected {unit} or NAME={unit}", param_hint=option) from None
        if sep and not name:
            raise click.BadParameter(f"{v!r}: expected {unit} or NAME={unit}", param_hint=option)
        if n_int < minimum:
            raise click.BadParameter(f"{v!r}: {too_small or f'{unit} must be >= {minimum}'}", param_hint=option)
        if sep:
            per_model[name] = n_int
        else:
            shared = n_int
    return (default if shared is None else shared), per_model


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
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1),
                 help="Videos per step and process; under torchrun the global batch is this x the number of "
                      "processes (scale --lr with it: the linear rule)."),
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
    click.option("--agg-option", "agg_options", multiple=True, metavar="KEY=VALUE", callback=lambda c, p, v: _agg_options(v),
                 help="Aggregator constructor option, e.g. clusters=64 (netvlad); repeat for several; recorded in the run."),
    click.option("--init-centres", is_flag=True,
                 help="netvlad: k-means cluster centres from up to 100k training descriptors (seeded)."),
    click.option("--train-clips", default="uniform", show_default=True, type=click.Choice(["uniform", "jitter"]),
                 help="jitter: each epoch, per video, one random clip per segment of the extracted clips (evaluation: uniform)."),
    click.option("--teacher", type=click.Path(exists=True, file_okay=False),
                 help="A fitted run to distil from (Fewer Frames; frozen, its inputs read from FEATS); unlabelled "
                      "videos train too. In ablate: taught cells get their own rows (+ KD) beside untaught ones."),
    click.option("--distill-weight", default=1.0, show_default=True, type=click.FloatRange(min=0),
                 help="--teacher: A, the weight of T^2 KL(teacher || student)."),
    click.option("--rep-weight", default=0.01, show_default=True, type=click.FloatRange(min=0),
                 help="--teacher: B, the weight of the MSE between final representations."),
    click.option("--temperature", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="--teacher: T, the softening temperature."),
    click.option("--order", type=click.Choice(ORDERS),
                 help="The order the clips are folded in: temporal (a stream) or coarse-to-fine (0, n/2, n/4, 3n/4, ...) "
                      "[default: coarse-to-fine with an early exit, temporal otherwise]."),
    click.option("--exit", "exit_mode", default="threshold", show_default=True, type=click.Choice(EXITS),
                 help="Early exit: threshold (confidence per step, calibrated on the training set to the exit "
                      "budget) or gate (a learned gate, FrameExit)."),
    click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True,
                 help="No progress bar (off a terminal: no progress lines either)."),
]


def _agg_options(values: tuple[str, ...]) -> dict:
    """KEY=VALUE strings as a dict; VALUE an int, a float or else the string itself."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--agg-option")
        value: object = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def _fit_options(command):
    """Apply FIT_OPTIONS to a command, in order."""
    for option in reversed(FIT_OPTIONS):
        command = option(command)
    return command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="faster")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """FASTER: cheap video classification from cached clip features (Zhu et al., AAAI 2020).

    \b
    1. faster extract   decode videos once, run the clip backbones, cache res5 maps in HDF5 shards
    2. faster fit       train an aggregator (fastgru, avg, concat, lstm, gru, netvlad, nextvlad, tam) on cached features
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
@click.option("--clip-len", "clip_lens", multiple=True, metavar="L|NAME=L",
              help="Frames per clip [8]; NAME=L gives one model its own (its clip covers the same span, "
                   "L x stride frames, as every model's).")
@click.option("--num-clips", type=click.IntRange(1), help="Clips per video [default: 256 // clip-len].")
@click.option("--size", "sizes", multiple=True, metavar="PX|NAME=PX",
              help="Crop size in pixels [224]; NAME=PX gives one model its own (e.g. --size 112 --size r2d26=224).")
@click.option("--frame-stride", "frame_strides", multiple=True, metavar="S|NAME=S",
              help="Frame step inside a clip [1]; NAME=S gives one model its own (e.g. --clip-len x=4 "
                   "--frame-stride x=16 beside --clip-len 16 --frame-stride 4).")
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
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Backbone precision. auto: bf16 on a GPU or a CPU with native bf16 (or what OUT already holds).")
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
    from faster.extract.pipeline import ExtractConfig, extract_videos

    strict = kw.pop("strict")
    kw["weights"] = _parse_weights(kw["weights"])
    kw["size"], kw["sizes"] = _parse_sizes(kw.pop("sizes"))
    kw["clip_len"], kw["clip_lens"] = _parse_per_model(kw.pop("clip_lens"), "--clip-len", 8)
    kw["frame_stride"], kw["frame_strides"] = _parse_per_model(kw.pop("frame_strides"), "--frame-stride", 1)
    try:
        cfg = ExtractConfig(**kw)
    except UserError as err:
        raise click.UsageError(str(err)) from err
    try:
        summary = extract_videos(cfg, echo=lambda line: click.echo(line, err=True))
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


@cli.command("train-clip")
@click.argument("video_root", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--model", required=True, help=MODEL_HELP + ".")
@click.option("--init", type=click.Path(exists=True, dir_okay=False),
              help="Start the backbone from this weights file (a zoo file or ours); the head is always new.")
@click.option("--val", type=click.Path(exists=True, file_okay=False),
              help="Validation videos [default: the annotations' val split, else --val-fraction of VIDEO_ROOT].")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
              help="CSV: path,label or Kinetics (its split column chooses train / val).")
@click.option("--val-annotations", type=click.Path(exists=True, dir_okay=False), help="CSV for --val.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line (fixes the label indices).")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without --val or a split column: the fraction of videos held out (chosen by hashing ids).")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Clips per step and process: under torchrun the global batch is this x the number of processes; "
                   "batch-norm statistics see the per-process batch.")
@click.option("--lr", default=0.0125, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak SGD rate, used as given at the global batch the job runs with (no automatic scaling). "
                   "Scale it linearly with the global batch: 0.1 at 64 (PySlowFast's Kinetics recipe) is 0.0125 at 8.")
@click.option("--momentum", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--nesterov/--no-nesterov", default=True, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Not applied to norm and bias parameters.")
@click.option("--warmup-epochs", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Linear warmup from 0, then cosine to 0.")
@click.option("--dropout", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--sync-bn", is_flag=True, help="Synchronise batch-norm statistics over the processes (CUDA only).")
@click.option("--clip-len", default=8, show_default=True, type=click.IntRange(1), help="L, frames per clip.")
@click.option("--frame-stride", default=1, show_default=True, type=click.IntRange(1))
@click.option("--size", default=224, show_default=True, type=click.IntRange(8),
              help="Crop side; the short side is jittered in [256, 320] x size / 224.")
@click.option("--no-flip", "flip", is_flag=True, flag_value=False, default=True,
              help="No horizontal flips (classes a flip changes, e.g. left/right motion).")
@click.option("--val-clips", type=click.IntRange(1), help="Uniform clips per validation video [default: 256 // clip-len].")
@click.option("--flops-target", type=click.FloatRange(0, 1, min_open=True),
              help="For a backbone whose cost depends on the clip (vared_*): the mean fraction of its full GFLOPs "
                   "per clip its gates are trained toward [default: the backbone's, 0.6 for vared_r2plus1d50, 0.75 for its _tiny].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast on CUDA devices that support it, else fp32.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="Decoding processes per process.")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(DECODERS), help=DECODER_HELP)
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before a hung decode is killed and the video replaced.")
@click.option("--save-every", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Minutes between training-state saves inside an epoch (also saved after every epoch).")
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads [default: torch's choice].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in -o where its last save left it.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in -o.")
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="No progress bar.")
def train_clip(**kw) -> None:
    """Train a clip backbone and a new head on labelled videos (the paper's first stage).

    \b
    Writes RUN/config.json, metrics.jsonl (a line per epoch: val video@1 and clip@1, data wait),
    last.pt (the training state: --resume), model.pt (the best weights by val video@1, read by
    `faster extract --weights NAME=RUN/model.pt`), failures.jsonl and result.json. Under torchrun
    the processes train one model with DDP (--batch-size is per process).
    e.g. faster train-clip videos/ -o runs/r2d26 --model r2d26 --epochs 30 --lr 0.0125
    """
    from faster.engine import Distributed
    from faster.train.clip import TrainClipConfig, train_clip as run_train

    try:
        dist = Distributed.from_env()
        r = run_train(TrainClipConfig(**kw), dist=dist, echo=lambda line: click.echo(line, err=True))
    except UserError as err:
        _fail(err)
    if not dist.main:
        return
    top = "-" if r["video_top1"] is None else f"{r['video_top1']:.4f}"
    clip = "-" if r["clip_top1"] is None else f"{r['clip_top1']:.4f}"
    if r.get("flops_target") is not None and r.get("gflops_per_clip") is not None:
        clip += (f", {r['gflops_per_clip']:.4g} GFLOPs/clip ({100 * r['gflops_per_clip'] / r['full_gflops_per_clip']:.0f}% "
                 f"of full, target {100 * r['flops_target']:.0f}%)")
    click.echo(f"{r['model']}: val video@1 {top}, clip@1 {clip} (epoch {r['best_epoch']} of {r['epochs']}); "
               f"{r['num_train']} train / {r['num_val']} val videos, {r['num_classes']} classes, "
               f"{r['failures']} failed; global batch {r['global_batch_size']}; {r['seconds']:.1f} s -> {r['weights']}")


@cli.command()
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True,
              help="First resolve videos held by two shards: keep the copy that passes the checks, never a "
                   "video's only one.")
@click.option("--accept", "accepted", multiple=True, metavar="SHARD",
              help="Record SHARD (a path, or a name in FEATS) as it is now: its changed sha256 becomes the "
                   "listed one; a listed shard that is gone is forgotten. Repeat for several.")
def verify(feats: tuple[str, ...], repair: bool, accepted: tuple[str, ...]) -> None:
    """Check every shard of feature sets against the schema; write the merged manifest and failures.

    A shard changed after it was written is reported and never recorded as good; only --accept
    records it as it is now.
    """
    from faster.store.verify import accept, repair_dir, verify as verify_dirs

    for value in accepted:
        target = Path(value)
        if target.parent != Path():  # a path: its folder must be one of FEATS
            dirs = [d for d in feats if Path(d).resolve() == target.parent.resolve()]
        else:  # a name: the FEATS holding it, or the only one
            dirs = [d for d in feats if (Path(d) / value).exists()] or (list(feats) if len(feats) == 1 else [])
        if len(dirs) != 1:
            raise click.BadParameter(f"{value!r} is not a shard of {', '.join(feats)}"
                                     + ("; give its path" if len(dirs) > 1 or len(feats) > 1 else ""),
                                     param_hint="--accept")
        try:
            click.echo(f"{dirs[0]}: {accept(dirs[0], target.name)}")
        except UserError as err:
            _fail(err)
        except OSError as err:
            raise click.ClickException(f"{dirs[0]}: cannot accept {target.name}: {err.strerror or err}") from None
    if repair:
        for d in feats:
            try:
                actions = repair_dir(d)
            except UserError as err:
                _fail(err)
            except OSError as err:
                raise click.ClickException(f"{d}: cannot repair: {err.strerror or err}") from None
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
@click.option("--agg", required=True, help="Aggregator: avg, concat, lstm, gru, fastgru, netvlad, nextvlad, tam.")
@click.option("--expensive", required=True, help="Model name of the expensive features.")
@click.option("--cheap", required=True, help="Model name of the cheap features.")
@click.option("--pattern", required=True,
              help="all-e, all-c, first, 1:N (N >= 0; 1:0 is all-e), or adaptive: a learned gate (needs --budget).")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True),
              help="adaptive: the fraction of clips that also get the expensive backbone, e.g. 0.125.")
@click.option("--num-clips", type=click.IntRange(1), help="Use n of the extracted clips [default: all].")
@click.option("--early-exit", is_flag=True,
              help="Stop reading a video once its prediction is sure enough (needs --exit-budget; see --exit, --order).")
@click.option("--exit-budget", type=click.FloatRange(0, 1, min_open=True), help="--early-exit: " + EXIT_BUDGET_HELP + ".")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads [default: torch's choice].")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Training forward precision: bf16 autocast (weights and optimiser fp32) or fp32. auto: bf16 on "
                   "a GPU or a CPU with native bf16.")
@click.option("--overwrite", is_flag=True, help="Replace the run (or interrupted fit) already in -o.")
@click.option("--resume", is_flag=True, help="Continue the interrupted fit in -o after its last finished epoch "
              "(the same arguments; exact: it ends as an uninterrupted fit would).")
@_fit_options
def fit(feats: tuple[str, ...], val: tuple[str, ...], **kw) -> None:
    """Train an aggregator on cached features for one expensive:cheap pattern.

    \b
    Writes RUN/config.json, metrics.jsonl (one line per finished epoch) and last.pt (the training
    state, for --resume) while it trains, then checkpoint.pt, val_predictions.jsonl and result.json.
    Only the model each clip position needs is read; no backbone is loaded. Under torchrun
    (torchrun --nproc_per_node 2 -m faster fit ...) the processes train one model with DDP.
    e.g. faster fit feats/ -o runs/fg --agg fastgru --expensive r2plus1d50 --cheap r2d26 --pattern 1:3
    """
    from faster.aggregate.fit import FitConfig, fit as fit_run
    from faster.engine import Distributed

    try:
        dist = Distributed.from_env()
        r = fit_run(FitConfig(feats=list(feats), val=list(val), **kw), dist=dist)
    except UserError as err:
        _fail(err)
    if not dist.main:
        return
    best = r["best"]
    gflops = "?" if r["gflops_per_video"] is None else f"{r['gflops_per_video']:.1f}"
    counts = (f"{r['num_expensive']} E + {r['num_cheap']} C" if r["budget"] is None else
              f"budget {r['budget']:g}: {r['num_expensive_mean']:.2f} E per video + {r['num_cheap']} C")
    if r.get("exit_budget") is not None:
        counts = (f"early exit at {r['exit_budget']:g}, {r['order']}: {r['clips_seen_mean']:.2f} clips read per video, "
                  f"{r['num_expensive_mean']:.2f} E + {r['num_cheap']:.2f} C")
    click.echo(f"{r['agg']} {r['pattern']} on {r['num_clips']} clips ({counts}): "
               f"top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}, mean class {r['mean_class_acc']:.4f} "
               f"(best top-1 {best['top1']:.4f} at epoch {best['epoch']}); {gflops} GFLOPs/video; "
               f"{r['num_train']} train / {r['num_val']} val videos"
               + (f" (taught by {r['teacher']['path']}, {r['num_unlabelled_train']} unlabelled)" if r["teacher"] else "")
               + (f"; {r['world_size']} processes x batch {kw['batch_size']}" if r["world_size"] > 1 else "")
               + f"; {r['seconds']:.1f} s -> {kw['out']}")


@cli.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Predictions JSONL [default: RUN/predictions.jsonl].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(0), help="DataLoader workers [default: the run's].")
@click.option("--skip-bad", is_flag=True, help="Leave out changed shards and videos with NaN/inf (with a warning).")
@click.option("--order", type=click.Choice(ORDERS),
              help="Fold the clips in this order [default: the run's; an early-exit run keeps its own].")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="The aggregator's forward: fp32 (as predict: the same probabilities) or bf16 autocast (2.3x "
                   "faster on an AVX512-BF16 CPU, BENCHMARKS.md; auto: where native).")
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="No progress bar.")
def evaluate(run: str, feats: tuple[str, ...], out: str | None, device: str, workers: int | None,
             skip_bad: bool, order: str | None, dtype: str, progress: bool) -> None:
    """Score a fitted run on feature sets; write per-video predictions.

    Each JSON line: {"id", "label", "probs", "top5": [[class, prob], ...], "gflops", "clips_seen", ...};
    a video's gflops count only the clips it read (an early exit leaves it before its last clip).
    """
    from faster.aggregate.evaluation import evaluate as evaluate_run

    try:
        r = evaluate_run(run, list(feats), out, device=device, workers=workers, skip_bad=skip_bad, order=order,
                         progress=progress, dtype=dtype)
    except UserError as err:
        _fail(err)
    scores = ("no labelled videos" if r["top1"] is None else
              f"top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f}, mean class {r['mean_class_acc']:.4f} "
              f"on {r['num_labelled']} labelled")
    cost = ("" if r["gflops_per_video"] is None else
            f"; {r['gflops_per_video']:.4g} GFLOPs/video, {r['clips_seen_mean']:.2f} clips read/video")
    click.echo(f"{r['agg']} {r['pattern']}: {r['num_videos']} videos, {scores}{cost}; -> {r['predictions']}")


def _split_list(ctx, param, value: str | None) -> list[str] | None:
    """A comma-separated option value as a list (None stays None)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter(f"{value!r}: expected a comma-separated list", param_hint=param.opts[-1])
    return items


def _split_as(cast, what: str):
    """A click callback: a comma-separated list of ``cast`` values, a one-line error naming the value."""
    def parse(ctx, param, value: str | None) -> list | None:
        items = _split_list(ctx, param, value)
        try:
            return None if items is None else [cast(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected comma-separated {what}", param_hint=param.opts[-1]) from None
    return parse


_split_ints = _split_as(int, "integers")
_split_floats = _split_as(float, "numbers")


@cli.command()
@click.argument("feats", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Grid directory.")
@click.option("--agg", "aggs", required=True, callback=_split_list, help="Aggregators, e.g. avg,gru,fastgru.")
@click.option("--num-clips", callback=_split_ints, help="Numbers of clips, e.g. 2,4,8 [default: all extracted].")
@click.option("--pattern", "patterns", default="first", show_default=True, callback=_split_list,
              help="Patterns, e.g. first,1:1,all-e.")
@click.option("--seeds", default="0", show_default=True, callback=_split_ints, help="Seeds, e.g. 0,1,2.")
@click.option("--budget", "budgets", callback=_split_floats,
              help="For pattern adaptive: budgets, e.g. 0.0625,0.125,0.25 (one policy cell each).")
@click.option("--exit-budget", "exit_budgets", callback=_split_floats,
              help="Early-exit cells beside every pattern and policy: exit budgets (mean fractions of the clips "
                   "read), e.g. 0.25,0.5.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1), help="Cells trained at once.")
@click.option("--expensive", help="Expensive model [default: the one with more GFLOPs per clip].")
@click.option("--cheap", help="Cheap model [default: the one with fewer GFLOPs per clip].")
@click.option("--num-shards", default=1, show_default=True, type=click.IntRange(1),
              help="Processes sharing the grid (Slurm array size); each trains every S-th cell, no tables.")
@click.option("--shard-index", default=0, show_default=True, type=click.IntRange(0), help="Slurm array index.")
@_fit_options
def ablate(feats, out, aggs, num_clips, patterns, seeds, budgets, exit_budgets, jobs, expensive, cheap, num_shards,
           shard_index, **fit_kw) -> None:
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
                       num_shards=num_shards, shard_index=shard_index, budgets=budgets, exit_budgets=exit_budgets,
                       progress=fit_kw.get("progress", True))
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
@click.option("--online", is_flag=True, help="Also write the running prediction after every clip, and print it "
              "to stderr as it comes, with where the video was left (an early-exit run).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Clips per backbone forward (within one video).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0),
              help="Decoding processes (0: decode in this process, no timeout).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before a video whose decode hangs is reported as failed.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="Backbone precision. auto: the one the run's features were extracted in.")
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(DECODERS), help=DECODER_HELP)
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--order", type=click.Choice(ORDERS),
              help="Fold the clips in this order [default: the run's; an early-exit run keeps its own].")
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="No progress bar.")
def predict(videos, run, weights, out, online, device, batch_size, workers, timeout, dtype, decoder, strict,
            order, progress) -> None:
    """Classify videos with a fitted run, calling the expensive backbone only where the pattern says.

    VIDEOS are files or directories (searched for video files; ids are paths relative to them).
    Writes one JSON line per video: id, probs, top5, gflops, seconds (and, with --online, the
    running prediction after every clip); a broken video is a line with "error" and "stage".
    An early-exit run decodes and runs the backbones only up to where it leaves each video
    ("clips_seen", "exit_clip").
    """
    from faster.predict import PredictConfig, predict as run_predict

    cfg = PredictConfig(videos=list(videos), run=run, weights=_parse_weights(weights), out=out, online=online,
                        device=device, batch_size=batch_size, workers=workers, timeout=timeout, decoder=decoder,
                        dtype=dtype, strict=strict, order=order, echo=online, progress=progress)
    try:
        summary = run_predict(cfg)
    except (UserError, FileNotFoundError) as err:
        _fail(err)
    click.echo(summary.line(), err=True)


@cli.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Feature-set directory.")
@click.option("--model", required=True, help="Name to store the features under (fit's --expensive/--cheap).")
@click.option("--clip-len", required=True, type=click.IntRange(1), help="Frames per clip of the tool that made them.")
@click.option("--gflops-per-clip", type=click.FloatRange(min=0),
              help="That tool's backbone cost [default: 0, with a warning].")
@click.option("--strip-suffix", default="", help="Removed from file names to give ids, e.g. _i3d; other files ignored.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
              help="CSV: path (the id),label or Kinetics.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
              help="File with one class name per line (fixes class indices across splits).")
@click.option("--shard-size", default=64, show_default=True, type=click.IntRange(1), help="Videos per shard.")
@click.option("--channels-first", is_flag=True, help="5-d arrays are (N, C, T', H', W') [default: (N, T', H', W', C)].")
@click.option("--strict", is_flag=True, help="Exit non-zero if any file could not be packed.")
@click.option("--no-progress", "progress", is_flag=True, flag_value=False, default=True, help="No progress bar.")
def pack(strict: bool, **kw) -> None:
    """Store clip features another tool computed (one .npy per video under SRC) as a feature set.

    \b
    Ids are paths relative to SRC without .npy and --strip-suffix; labels come from class folders
    or --annotations, as in extract. (N, C) arrays become (N, 1, 1, 1, C) maps. Unusable files are
    listed in OUT/failures.jsonl (exit 0; 1 with --strict); the same command again packs only what
    is missing. e.g. faster pack i3d/ -o feats/ --model i3d --clip-len 16 --strip-suffix _rgb
    """
    from faster.pack import PackConfig, run_pack

    try:
        summary = run_pack(PackConfig(**kw))
    except UserError as err:
        _fail(err)
    failed = summary["failed"]
    click.echo(f"packed {summary['packed']}, skipped {summary['skipped']} (done before), failed {failed}"
               + (f" (see {summary['failures_file']})" if failed else "")
               + f"; {summary['num_clips']} clips of {' x '.join(map(str, summary['feature_shape']))} "
                 f"(T' x H' x W' x C), {summary['classes']} classes [{summary['layout']}]; "
                 f"{summary['run_seconds']:.1f} s"
               + (f", {summary['mib_per_s']:.1f} MiB/s" if summary["packed"] else "") + f" -> {summary['out']}")
    if strict and failed:
        raise click.ClickException(f"{failed} files could not be packed (--strict)")


@cli.command()
@click.option("--expensive", default="r2plus1d50", show_default=True, help=MODEL_HELP)
@click.option("--cheap", default="r2d26", show_default=True, help=MODEL_HELP)
@click.option("--clip-len", "clip_lens", multiple=True, metavar="L|NAME=L",
              help="Frames per clip [8]; NAME=L for one model (as extract takes it, e.g. --clip-len pv_x3d_xs=4).")
@click.option("--num-clips", type=click.IntRange(1), help="[default: 256 // clip-len]")
@click.option("--size", "sizes", multiple=True, metavar="PX|NAME=PX",
              help="Crop size [224]; NAME=PX for one model (a big-little pair).")
@click.option("--pattern", default="all-e", show_default=True,
              help="all-e, all-c, first, 1:N (N >= 0; 1:0 is all-e) or adaptive (with --budget).")
@click.option("--agg", default="fastgru", show_default=True, help="Aggregator whose cost is added.")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True),
              help="Pattern adaptive: the expected fraction of clips that also get the expensive backbone.")
@click.option("--early-exit", is_flag=True, help="The expected cost of an early-exit run (needs --exit-budget).")
@click.option("--exit-budget", type=click.FloatRange(0, 1, min_open=True), help="--early-exit: " + EXIT_BUDGET_HELP + ".")
@click.option("--exit", "exit_mode", default="threshold", show_default=True, type=click.Choice(EXITS),
              help="--early-exit: threshold or gate (whose decisions are counted).")
@click.option("--order", type=click.Choice(ORDERS),
              help="The order clips are read in [default: coarse-to-fine with an early exit, temporal otherwise].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--list", "list_models", is_flag=True, help="List every backbone with its GFLOPs per clip and map shape.")
def flops(expensive: str, cheap: str, clip_lens: tuple[str, ...], num_clips: int | None, sizes: tuple[str, ...], pattern: str,
          agg: str, budget: float | None, early_exit: bool, exit_budget: float | None, exit_mode: str,
          order: str | None, as_json: bool, list_models: bool) -> None:
    """GFLOPs (multiply-adds, the paper's convention) per clip and per video for a pattern.

    \b
    video GFLOPs = #E * E-GFLOPs/clip + #C * C-GFLOPs/clip + aggregator GFLOPs
    e.g. faster flops --clip-len 16 --pattern 1:7   (FASTER16 of the paper, Table 4)
         faster flops --list --clip-len 8 --size 112
         faster flops --pattern all-e --early-exit --exit-budget 0.5   (the clips read count: F x n)
    """
    import json

    from faster.extract import models

    size, per_model = _parse_sizes(sizes)
    clip_len, per_model_len = _parse_per_model(clip_lens, "--clip-len", 8)
    if list_models:
        for hint, given, unit in (("--size", per_model, "PX"), ("--clip-len", per_model_len, "L")):
            if given:
                raise click.BadParameter(f"{next(iter(given))}={next(iter(given.values()))}: --list takes one "
                                         f"value for every backbone ({hint} {unit})", param_hint=hint)
        _list_backbones(models, clip_len, size)
        return
    px = {m: per_model.get(m, size) for m in (expensive, cheap)}
    frames = {m: per_model_len.get(m, clip_len) for m in (expensive, cheap)}
    where = (f"at {size} px" if len(set(px.values())) == 1 else
             "(" + ", ".join(f"{m} at {p} px" for m, p in px.items()) + ")")
    clips = (f"of {clip_len} frames" if len(set(frames.values())) == 1 else
             "(" + ", ".join(f"{m}: {f} frames" for m, f in frames.items()) + ")")

    n = num_clips or max(1, 256 // clip_len)
    for hint, name in (("--expensive", expensive), ("--cheap", cheap)):
        if name not in models.names() and not name.startswith(models.HF_PREFIX):  # hf:PATH as extract takes it
            raise click.BadParameter(f"unknown backbone {name!r}; expected one of {', '.join(models.names())} "
                                     f"or {models.HF_PREFIX}PATH", param_hint=hint)
    for hint, given in (("--size", per_model), ("--clip-len", per_model_len)):
        unknown = sorted(set(given) - set(px))
        if unknown:  # as extract refuses a --size NAME=PX whose NAME is not a --model
            raise click.BadParameter(f"{unknown[0]}={given[unknown[0]]}: {unknown[0]!r} is neither --expensive "
                                     f"({expensive}) nor --cheap ({cheap})", param_hint=hint)
    from faster.aggregate import schedule

    if exit_budget is not None and not early_exit:
        raise click.BadParameter("--exit-budget is for --early-exit", param_hint="--exit-budget")
    if early_exit and exit_budget is None:
        raise click.BadParameter("--early-exit needs --exit-budget F (" + EXIT_BUDGET_HELP + ")",
                                 param_hint="--exit-budget")
    try:
        plan = schedule.create(pattern, n, budget, order=order, exit_budget=exit_budget, exit_mode=exit_mode)
    except UserError as err:
        raise click.BadParameter(str(err), param_hint="--pattern" if budget is None else "--budget") from None
    model_of = {"expensive": expensive, "cheap": cheap}
    roles = plan.roles()
    gflops, shapes = {}, {}
    for hint, m in (("--expensive", expensive), ("--cheap", cheap)):
        try:
            gflops[m], shapes[m] = (models.clip_gflops(m, frames[m], px[m]),
                                    models.feature_shape(m, frames[m], px[m]))
        except UserError as err:
            raise click.BadParameter(str(err), param_hint=hint) from None
    try:
        kwargs = {"num_classes": 400, "sources": {src: list(shapes[model_of[src]]) for src in roles}, "dropout": 0.0}
        costs = plan.costs(agg, kwargs, {src: gflops[model_of[src]] for src in roles})
    except UserError as err:
        raise click.BadParameter(str(err), param_hint="--agg") from None
    num_e, num_c = plan.expected_counts()
    video = costs["per_video"]
    read = n if plan.exit_budget is None else plan.exit_budget * n  # clips read per video (expected)
    gate = costs.get("gate")
    if gate is not None:
        gate *= read / n  # the policy's gate decides at every clip read
    exit_cost = None
    if "exit_readout" in costs:  # a readout after every clip read but the last, and the exit gate's decisions
        exit_cost = costs["exit_readout"] * max(read - 1, 0) + costs["exit_gate"] * read
    agg_gflops = video - num_e * gflops[expensive] - num_c * gflops[cheap] - (gate or 0.0) - (exit_cost or 0.0)
    used = [model_of[src] for src in roles]
    C, T, H, W = shapes[used[0]]
    note = None if len({shapes[m] for m in used}) == 1 else (
        f"{cheap}'s {list(shapes[cheap])} maps are aligned to {expensive}'s {list(shapes[expensive])}: "
        "the projection is counted")
    if as_json:
        out = {"clip_gflops": gflops, "aggregator_gflops": agg_gflops, "video_gflops": video,
               "num_expensive": num_e, "num_cheap": num_c, "pattern": pattern, "num_clips": n,
               "clip_len": clip_len, "clip_lens": frames, "size": size, "sizes": px, "expensive": expensive, "cheap": cheap, "agg": agg,
               "feature_shape": [C, T, H, W]}
        if gate is not None:
            out.update(gate_gflops=gate, budget=plan.budget)
        if exit_cost is not None:
            out.update(exit_gflops=exit_cost, exit_budget=plan.exit_budget, clips_read=read, order=plan.order,
                       exit=exit_mode)
        if note:
            out["note"] = note
        click.echo(json.dumps(out))
        return
    click.echo(f"{n} clips {clips} {where}, pattern {plan.describe()}: {num_e:g} expensive, "
               f"{num_c:g} cheap; features {C} x {T} x {H} x {W} (C x T' x H' x W')")
    whole = isinstance(num_e, int) and isinstance(num_c, int)
    count_e = f"{num_e:3d}" if whole else f"{num_e:5.2f}"
    count_c = f"{num_c:3d}" if whole else f"{num_c:5.2f}"
    pad = 24 + len(count_e)
    click.echo(f"  expensive  {expensive:<16} {gflops[expensive]:9.2f} GFLOPs/clip x {count_e} = "
               f"{num_e * gflops[expensive]:9.2f}")
    click.echo(f"  cheap      {cheap:<16} {gflops[cheap]:9.2f} GFLOPs/clip x {count_c} = "
               f"{num_c * gflops[cheap]:9.2f}")
    click.echo(f"  aggregator {agg:<16} {'':>{pad}} = {agg_gflops:9.2f}" + (f"  ({note})" if note else ""))
    if gate is not None:
        click.echo(f"  gate       {'':<16} {'':>{pad}} = {gate:9.4f}")
    if exit_cost is not None:
        click.echo(f"  exit       {exit_mode:<16} {'':>{pad}} = {exit_cost:9.4f}")
    expected = [why for why, yes in (("the budget's rate", plan.budget is not None),
                                     (f"{read:g} of {n} clips read", plan.exit_budget is not None)) if yes]
    click.echo(f"  video      {'':<16} {'':>{pad}} = {video:9.2f} GFLOPs"
               + (f" (expected at {' and '.join(expected)})" if expected else ""))


def _list_backbones(models, clip_len: int, size: int) -> None:
    """One line per registered backbone: name, GFLOPs per clip and res5 map shape at clip_len x size."""
    click.echo(f"backbones at {clip_len} frames x {size} px: GFLOPs/clip, map C x T' x H' x W'")
    for name in models.names():
        try:
            g, shape = models.clip_gflops(name, clip_len, size), models.feature_shape(name, clip_len, size)
            click.echo(f"  {name:<18} {g:9.2f}   {' x '.join(map(str, shape))}")
        except UserError as err:  # e.g. too few frames, or the zoo extra is not installed
            click.echo(f"  {name:<18} {'-':>9}   {str(err).splitlines()[0][:90]}")


@cli.command()
@click.option("-o", "--out", default="faster-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A reduced size for CI: one training epoch, fewer and smaller videos.")
@click.option("--weights", multiple=True, metavar="NAME=PATH",
              help="Backbone weights to extract with instead of training that backbone.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("-j", "--jobs", type=click.IntRange(1),
              help="Grid cells trained at once, each with cores / jobs torch threads [default: 2; 1 with --quick].")
@click.option("--expensive", metavar="NAME", help="The expensive backbone to train and extract [r2plus1d50_tiny], "
              "e.g. vared_r2plus1d50_tiny (VA-RED²: its cost depends on the clip).")
@click.option("--cheap", metavar="NAME", help="The cheap backbone [r2d26_tiny]. Full-width networks train "
              "for hours on a CPU at the demo's size: the tiny ones are made for it.")
def demo(out, quick, weights, device, jobs, expensive, cheap) -> None:
    """Make a small labelled video set, train both backbones, extract, fit a small grid and print
    the accuracy/GFLOPs tables beside the backbones' own accuracies.

    The videos' classes are motion directions (one frame cannot tell them apart). Full size:
    narrow R(2+1)D-50 and R2D-26 trained at 32 px on 64 px videos, a few minutes on a 2-core CPU;
    --quick: seconds. Running it again into the same directory reuses what is already there.
    """
    from faster.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, quick=quick, weights=_parse_weights(weights), device=device, jobs=jobs,
                     expensive=expensive, cheap=cheap, echo=lambda line: click.echo(line, err=True))
    try:
        summary = run_demo(cfg)
    except (UserError, FileNotFoundError) as err:
        _fail(err)
    _echo_ablate(summary)
    _echo_backbones(summary)
    _check_cells(summary)
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items())
    click.echo(f"Demo in {out} ({timings}). Plot: {summary['plot']}")
    if summary["random_init"]:
        click.echo(f"Note: {' and '.join(summary['random_init'])} were randomly initialised, so these accuracies only "
                   "show that the pipeline works, not what FASTER reaches with trained backbones.")
    if quick:
        click.echo("Note: --quick trains the backbones for one epoch on a handful of videos: its accuracies only "
                   "show that the pipeline works; the full demo (without --quick) trains them for real.")


def _echo_backbones(summary: dict) -> None:
    """The backbones' own validation accuracies (stage 1: each clip head's scores averaged over the
    clips), in the tables' units, beside the grid."""
    rows = summary["backbones"]
    click.echo("## The backbones alone (stage 1, faster train-clip; V@1 and clip@1 on the same validation videos)\n")
    click.echo("| Backbone | role | V@1 | clip@1 | GFLOPs/clip | epochs | train s | weights |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        role = "E" if name == summary["expensive"] else "C"
        pct = ("-" if r.get(k) is None else f"{100 * r[k]:.1f}" for k in ("video_top1", "clip_top1"))
        if r["trained"]:
            epochs = f"{r['best_epoch']}/{r['epochs']}"
            secs = f"{r['seconds']:.0f}" + (" (reused)" if r.get("reused") else "")
        else:
            epochs, secs = "given", "-"
        click.echo(f"| {name} | {role} | {' | '.join(pct)} | {r['gflops_per_clip']:.4g} | {epochs} | {secs} | "
                   f"{r['weights']} |")
    clips = {r.get("val_clips") for r in rows.values() if r["trained"]}
    if clips:
        click.echo(f"\nV@1: the backbone's own head, softmax averaged over {'/'.join(map(str, sorted(clips)))} uniform "
                   "clips per video; epochs: the best epoch (its weights are extracted) of those trained.\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds (temporary files removed) like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    from faster import runtime

    runtime.received_signals.append("SIGTERM")
    raise Terminated()


def _on_sigint(signum, frame) -> None:
    from faster import runtime

    runtime.received_signals.append("SIGINT")
    raise KeyboardInterrupt


TORCH_COMMANDS = {"extract", "fit", "evaluate", "ablate", "predict", "flops", "demo"}


def _import_torch_shielded() -> None:
    """Import torch with SIGINT and SIGTERM held until it is done, then act on them.

    A KeyboardInterrupt raised inside torch's import can land in C++ code that cannot unwind it
    (pybind11: "terminate called after throwing ... KeyboardInterrupt", the process aborts with
    SIGABRT). Holding the signal for the second the import takes turns that into a clean 130/143.
    """
    import signal

    pending: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        import torch  # noqa: F401
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in pending:
        _on_sigterm(signal.SIGTERM, None)
    if pending:
        raise KeyboardInterrupt


def _exit_now(code: int) -> None:
    """Exit with ``code`` after an interrupt, once every with-block has unwound (temporary files gone).

    os._exit, not sys.exit: a KeyboardInterrupt that landed inside an extension's embedded
    PyRun_String (torch's import does some) makes CPython re-raise SIGINT at shutdown whatever the
    exit code, and the shell would then see -2, not 130."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """The `faster` entry point: Ctrl-C exits 130 and SIGTERM 143 at any moment, without a traceback;
    click's other errors print their one line (exit 1, or 2 for usage)."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        command = next((a for a in args if not a.startswith("-")), None)
        if command in TORCH_COMMANDS and not {"-h", "--help"} & set(args):
            _import_torch_shielded()
        rc = cli.main(args=argv, prog_name="faster", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click turns KeyboardInterrupt into Abort
        from faster import runtime

        cause = err if isinstance(err, KeyboardInterrupt) else (err.__cause__ or err.__context__)
        # a SIGTERM is what stopped us even when the exception that unwound is another one (the stop
        # it asked for can meet a decode worker it killed too: the whole process group gets it)
        terminated = isinstance(cause, Terminated) or runtime.received_signals[:1] == ["SIGTERM"]
        click.echo("\nterminated" if terminated else "\ninterrupted", err=True)
        _exit_now(143 if terminated else 130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except Exception:
        from faster import runtime

        if not runtime.received_signals:
            raise  # a bug: its traceback
        # an error while unwinding after SIGINT/SIGTERM: e.g. the signal landed inside a lazy import of
        # torch._dynamo and the clean-up imported the half-initialised module again ("... already
        # registered"). The signal is what stopped the command: exit as it asked, the details at -vv.
        import logging

        logging.getLogger("faster").debug("after %s", runtime.received_signals[0], exc_info=True)
        terminated = runtime.received_signals[0] == "SIGTERM"
        click.echo("\nterminated" if terminated else "\ninterrupted", err=True)
        _exit_now(143 if terminated else 130)
    # The command is done (outputs written and closed, atomically) and the process ends here: the
    # interpreter's last garbage collections at exit would walk every object torch created (0.4-0.5 s
    # of a short command's 2-3 s, BENCHMARKS.md "Start-up"); frozen, they are skipped. atexit handlers
    # and weakref finalizers (the decode pool's, logging's) still run.
    import gc

    gc.freeze()
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
