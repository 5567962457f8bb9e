"""Finding the videos of a collection and decoding the clips FASTER needs from each.

Discovery (README "faster extract"): folder-per-class (``ROOT/<class>/.../<video>``, classes
sorted by name), an annotation CSV (``path,label``, or Kinetics' ``label,youtube_id,time_start,
time_end,split`` whose files are named ``<youtube_id>_<start:06d>_<end:06d>.<ext>``), or
unlabelled. Only video extensions are considered; ids are POSIX paths relative to the root.

Decoding (paper, "Experimental Setups": N clips of L frames uniformly covering the video,
N x L = 256): decord with one thread per reader, and PyAV with the same sampling for what decord
cannot read (``decode_clips(decoder="auto")``, docs/decoding.md); only the sampled frames,
requested in sorted order and in chunks so a worker never holds a whole long video; indices
clamped to the frames that exist (a video shorter than one clip repeats its last frame). Each
frame's short side is resized to ``size * 8/7`` (256 for 224) and the centre ``size x size`` crop
kept, as uint8 RGB: scaling to [0, 1] and the backbone's normalisation happen on the model's
device (``normalise_clips``), which is cheaper than on the decoding CPU.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from faster.errors import BadFile, BadValue, Incompatible
from faster.sampling import Sampling, round_half_up

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ts", ".ogv", ".vob", ".mts", ".m2ts"})
CHUNK_FRAMES = 32  # frames decoded and resized at once: bounds a worker's memory on large videos
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def is_video(path: str | Path) -> bool:
    """A file name with a video extension that is not hidden (``._x.mp4`` AppleDouble files are not videos)."""
    p = PurePosixPath(str(path))
    return p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


@dataclass(frozen=True)
class VideoItem:
    """One video to extract. ``path`` is None when an annotation lists a file that is not under the root."""

    id: str
    path: Path | None
    label: int = -1
    split: str | None = None
    error: str | None = None  # why ``path`` is None
    stage: str = "missing"  # the failure stage it is recorded under when ``path`` is None: missing, or open


@dataclass
class Discovery:
    """What ``discover`` found: the items (sorted by id), the class list and the layout it used."""

    items: list[VideoItem]
    classes: list[str]
    layout: str  # "folders", "csv", "kinetics" or "unlabelled"
    ignored: int = 0  # files without a video extension
    notes: list[str] = field(default_factory=list)


@dataclass
class Walk:
    """The files of a tree that ``walk`` took, refused and ignored."""

    files: dict[str, Path]  # POSIX path relative to the root -> the file as found under the root
    refused: dict[str, str]  # path relative to the root (escaped when not UTF-8) -> why, one line
    ignored: int = 0  # files (not hidden) that were not wanted
    notes: list[str] = field(default_factory=list)  # folders skipped, files found twice


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8 text: the bytes of a file name that is not valid UTF-8 (which Python
    keeps as surrogates) written as ``\\xNN``, e.g. ``caf\\xe9.mp4``; a valid name unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def walk(root: str | Path, want: Callable[[str], bool], *, inside: bool = False, label: str = "the root") -> Walk:
    """The files under ``root`` whose name ``want`` takes (hidden entries skipped), each real file once.

    The real tree is read first, then the folders that links lead to, each real folder once (a
    link back up the tree, ``ln -s .. loop``, is skipped with a note); a file reached under two
    names (a link, a hard link) is one file, kept under its real path (else the first name) with a
    note. Refused before anything opens them, each with its reason: a name that is not valid UTF-8
    (listed escaped, ``printable_name``), a file that is not a regular file (a FIFO, a device, a
    folder named like a video) or cannot be stat'ed (a broken link). With ``inside`` links are
    followed only while they resolve inside ``root``: a file that leaves it is refused, a folder
    skipped with a note (`faster pack`; ``label`` names the root in those lines)."""
    import stat

    root = Path(root)
    real_root = root.resolve()
    out = Walk({}, {})
    seen: set[tuple[int, int]] = set()
    found: dict[tuple[int, int], list[tuple[bool, str, Path]]] = {}  # file identity -> (via a link, rel, path)
    queue: list[tuple[Path, str]] = [(root, "")]  # the real tree first, then the links found in it

    def rel_of(rel_dir: str, name: str) -> str:
        return f"{rel_dir}/{name}" if rel_dir else name

    def unreadable(err: OSError) -> None:
        name = Path(err.filename or "?")
        shown = name.relative_to(root).as_posix() if name.is_relative_to(root) else str(name)
        out.notes.append(f"folder {printable_name(shown)!r} skipped: it cannot be read ({err.strerror})")

    while queue:
        top, top_rel = queue.pop(0)
        via_link = top is not root
        if via_link:
            target = top.resolve()
            if inside and not (target == real_root or real_root in target.parents):
                out.notes.append(f"folder {printable_name(top_rel)!r} skipped: a link to outside {label}")
                continue
        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):  # links are queued, not followed
            here = Path(dirpath)
            rel_dir = here.relative_to(top).as_posix()
            rel_dir = rel_of(top_rel, rel_dir) if rel_dir != "." else top_rel
            try:
                st = here.stat()
            except OSError as err:
                dirnames[:] = []
                out.notes.append(f"folder {printable_name(rel_dir)!r} skipped: it cannot be read ({err.strerror})")
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                out.notes.append(f"folder {printable_name(rel_dir)!r} skipped: a link to a folder read already")
                continue
            seen.add((st.st_dev, st.st_ino))
            real_dirs = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                if (here / d).is_symlink():
                    queue.append((here / d, rel_of(rel_dir, d)))
                else:
                    real_dirs.append(d)
            dirnames[:] = real_dirs
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                if not want(name):
                    out.ignored += 1
                    continue
                rel = rel_of(rel_dir, name)
                shown = printable_name(rel)
                if shown != rel:
                    out.refused[shown] = (f"{shown}: the file name is not valid UTF-8 (its bytes shown as \\xNN); "
                                          "rename it to use it")
                    continue
                path = here / name
                try:
                    fst = path.stat()
                except OSError as err:
                    out.refused[rel] = f"{rel}: cannot be read ({err.strerror})"
                    continue
                link = via_link or path.is_symlink()
                if inside and link:
                    target = path.resolve()
                    if real_root not in target.parents:
                        out.refused[rel] = f"{rel}: a link to outside {label} ({target}); refused"
                        continue
                if not stat.S_ISREG(fst.st_mode):
                    kind = ("a FIFO" if stat.S_ISFIFO(fst.st_mode) else "a folder" if stat.S_ISDIR(fst.st_mode)
                            else "a socket" if stat.S_ISSOCK(fst.st_mode) else "a device")
                    out.refused[rel] = f"{rel}: not a regular file ({kind}); skipped before decoding"
                    continue
                found.setdefault((fst.st_dev, fst.st_ino), []).append((link, rel, path))
    twice = []
    for names in found.values():
        names.sort(key=lambda c: (c[0], c[1]))  # the real path first, else the first name
        _, rel, path = names[0]
        out.files[rel] = path
        twice += [(other, rel) for _, other, _ in names[1:]]
    if twice:
        shown = ", ".join(f"{a!r} is {b!r}" for a, b in sorted(twice)[:3])
        out.notes.append(f"{len(twice)} files are another name (a link) of a file found already, each read once: "
                         f"{shown}" + (", ..." if len(twice) > 3 else ""))
    out.files = dict(sorted(out.files.items()))
    return out


def scan(root: str | Path) -> list[str]:
    """Every video under ``root`` as a sorted list of POSIX paths relative to it (hidden entries skipped;
    each real file once, see ``walk``)."""
    return list(walk(root, is_video).files)


def read_classes(path: str | Path) -> list[str]:
    """One class name per line (blank lines skipped); names must be unique."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise BadFile(f"classes file {str(path)!r} lists no class")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadFile(f"classes file {str(path)!r} repeats {dup[:5]}")
    return names


def safe_relative(root: Path, value: str, where: str) -> str:
    """``value`` (relative to ``root`` or absolute inside it) as a normalised POSIX path; refuse one that leaves it."""
    if not value:
        raise BadFile(f"{where}: empty path")
    p = Path(value)
    joined = p if p.is_absolute() else root / p
    norm = Path(os.path.normpath(joined))
    root_norm = Path(os.path.normpath(root.absolute()))
    norm_abs = Path(os.path.normpath(norm.absolute()))
    if norm_abs != root_norm and root_norm not in norm_abs.parents:
        raise BadFile(f"{where}: path {value!r} leaves the video root {str(root)!r}; refused")
    rel = norm_abs.relative_to(root_norm).as_posix()
    if rel in ("", "."):
        raise BadFile(f"{where}: path {value!r} is the video root itself, not a video")
    return rel


def _label_index(label: str, classes: list[str], index: dict[str, int], where: str) -> int:
    if label == "":
        return -1
    if label in index:
        return index[label]
    if label.isdigit() and int(label) < len(classes):
        return int(label)  # an index into a --classes file
    raise BadFile(f"{where}: label {label!r} is not in the class list ({len(classes)} classes)")


def _classes_from_labels(labels: list[str]) -> list[str]:
    """Sorted names; integer labels 0..K-1 give the classes '0'..'K-1' so indices keep their meaning."""
    distinct = sorted({lab for lab in labels if lab != ""})
    if distinct and all(lab.isdigit() for lab in distinct):
        return [str(i) for i in range(max(int(lab) for lab in distinct) + 1)]
    return distinct


def _read_csv(path: Path) -> tuple[str, list[dict[str, str]]]:
    """("kinetics" | "csv", rows as dicts with at least a path or a youtube_id column)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t ")
        except csv.Error:
            dialect = csv.excel
        rows = [r for r in csv.reader(f, dialect) if r and any(c.strip() for c in r)]
    if not rows:
        raise BadFile(f"annotations {str(path)!r} are empty")
    header = [c.strip().lower() for c in rows[0]]
    if all(c in header for c in KINETICS_COLUMNS):
        kind = "kinetics"
    elif "path" in header:
        kind = "csv"
    elif len(header) in (1, 2) and is_video(rows[0][0].strip()):
        header = ["path", "label"][: len(header)]  # no header row: path[,label]
        rows = [header] + rows
        kind = "csv"
    else:
        raise BadFile(f"annotations {str(path)!r}: header {rows[0]!r} has neither a 'path' column nor "
                         f"Kinetics' {','.join(KINETICS_COLUMNS)}")
    out = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise BadFile(f"annotations {str(path)!r} line {n}: {len(row)} fields, header has {len(header)}")
        out.append({k: v.strip() for k, v in zip(header, row)})
    return kind, out


def _kinetics_stem(row: dict[str, str], where: str) -> str:
    try:
        start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    except ValueError as err:
        raise BadFile(f"{where}: time_start/time_end {row['time_start']!r}/{row['time_end']!r} are not numbers") from err
    return f"{row['youtube_id']}_{start:06d}_{end:06d}"


def discover(root: str | Path, annotations: str | Path | None = None, classes_file: str | Path | None = None,
             unlabelled: bool = False, files: dict[str, Path] | None = None) -> Discovery:
    """Find the videos under ``root`` and their labels.

    Without ``annotations``: folder-per-class when every video lies in a sub-folder of the root
    (the first path component is the class), unlabelled when some lie directly in the root or
    ``unlabelled`` is set. With ``annotations``: each row names a file by its path (``path,label``)
    or by Kinetics' ``<youtube_id>_<start>_<end>``; a row matches the file at that path, else the
    file with that stem and any video extension anywhere under the root. A listed file that is not
    found becomes an item with ``path=None`` (recorded as failure stage ``missing``).
    ``classes_file`` fixes the class list (and so the indices) whatever subset is present.
    ``files`` (id -> file) replaces the scan for videos: `faster pack` passes its ``.npy`` files.
    """
    root = Path(root)
    if not root.is_dir():
        raise BadFile(f"video root {str(root)!r} is not a directory")
    refused: dict[str, str] = {}
    ignored = 0
    if files is None:
        found = walk(root, is_video)
        path_of, refused, ignored = found.files, found.refused, found.ignored
        for note in found.notes:
            log.warning("%s: %s", root, note)
    else:
        path_of = dict(files)
    # refused before decoding (a name that is not UTF-8, a FIFO, a broken link): failures of stage open
    unusable = [VideoItem(rel, None, error=why, stage="open") for rel, why in sorted(refused.items())]
    files = sorted(path_of)
    fixed = read_classes(classes_file) if classes_file else None
    if annotations is None:
        if unlabelled or not files or any("/" not in f for f in files):
            classes = fixed or []
            items = [VideoItem(f, path_of[f]) for f in files]
            return Discovery(sorted(items + unusable, key=lambda it: it.id), classes, "unlabelled", ignored)
        folder_of = {f: f.split("/", 1)[0] for f in files}
        classes = fixed or sorted(set(folder_of.values()))
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(folder_of.values()) - set(index))
        if unknown:
            raise Incompatible(f"class folders {unknown[:5]} are not in the classes file {str(classes_file)!r}")
        items = [VideoItem(f, path_of[f], index[folder_of[f]]) for f in files]
        return Discovery(sorted(items + unusable, key=lambda it: it.id), classes, "folders", ignored)

    annotations = Path(annotations)
    kind, rows = _read_csv(annotations)
    by_path = set(files)
    by_noext: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for f in files:
        p = PurePosixPath(f)
        by_noext.setdefault(str(p.with_suffix("")), []).append(f)
        by_stem.setdefault(p.stem, []).append(f)

    labels = [r.get("label", "") for r in rows]
    classes = fixed or ([] if unlabelled else _classes_from_labels(labels))
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, VideoItem] = {}
    missing = 0
    for n, row in enumerate(rows, start=2):
        where = f"{annotations.name} line {n}"
        if kind == "kinetics":
            stem, rel, candidates = _kinetics_stem(row, where), None, None
        else:
            rel = safe_relative(root, row["path"], where)
            stem = PurePosixPath(rel).stem
            candidates = [rel] if rel in by_path else by_noext.get(str(PurePosixPath(rel).with_suffix("")))
        if not candidates:
            candidates = by_stem.get(stem, [])
        label = -1 if unlabelled else _label_index(row.get("label", ""), classes, index, where)
        split = row.get("split") or None
        if len(candidates) > 1:
            log.warning("%s: %d files match %r (%s); using %s", where, len(candidates), stem,
                        ", ".join(candidates[:3]), candidates[0])
        if candidates:
            video_id = candidates[0]
            item = VideoItem(video_id, path_of[video_id], label, split)
        else:
            video_id = rel or stem
            item = VideoItem(video_id, None, label, split,
                             error=f"listed in {annotations.name} line {n} but no video named {stem}.* under the root")
            missing += 1
        if video_id in items:
            log.warning("%s: %s is listed again; keeping its first row", where, video_id)
            continue
        items[video_id] = item
    notes = [f"{missing} listed videos are missing"] if missing else []
    unlisted = len(by_path - set(items))
    if unlisted:
        notes.append(f"{unlisted} videos under the root are not in the annotations and are skipped")
    items.update((it.id, it) for it in unusable)  # a listed file refused says why, not just "missing"
    return Discovery(sorted(items.values(), key=lambda it: it.id), classes, kind, ignored, notes)


# ----------------------------------------------------------------------------------------------
# Decoding

DECODERS = ("auto", "decord", "pyav")  # --decoder; auto: see decode_clips


# What decord 0.6 reads exactly (PyAV's frames, after its seeks, on a loaded machine: docs/decoding.md
# "Which decoder auto uses"): these codecs in these containers, by PyAV's names. ``--decoder auto``
# reads anything else with PyAV first: after a seek decord gave other frames of MPEG-4 Part 2 (Xvid,
# DivX) and MPEG-2 files with B-frames, every frame of an MPEG-2 transport stream wrong, and now and
# then another last frame from AVI files, all without an error; it cannot open AV1.
DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "prores", "mjpeg", "wmv2", "msmpeg4v2"})
DECORD_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "flv", "asf"})


def auto_order(path: str | Path) -> tuple[str, str]:
    """The order ``--decoder auto`` tries the decoders in for ``path``: decord first for a codec of
    DECORD_CODECS in a container of DECORD_CONTAINERS, PyAV first for any other; decord first when
    PyAV cannot open the file, so both decoders' errors are recorded. PyAV reads the header, its
    stream probe decoding no frame where the format allows (a 720p H.264 file: 17 -> 1 ms; VP9
    decoders take ~40 ms to open at 720p whatever the options: docs/decoding.md)."""
    try:
        import av
    except ImportError:
        return ("decord", "pyav")

    def probe(**options: Any) -> tuple[str, str]:
        with av.open(str(path), mode="r", **options) as container:
            stream = container.streams.best("video")
            return container.format.name, stream.codec_context.name

    try:
        try:
            fmt, codec = probe(stream_options=[{"skip_frame": "all"}])
        except ValueError:  # a format whose streams appear only in the probe (MPEG-PS) takes no stream options
            fmt, codec = probe()
    except Exception:  # not a video, no video stream: the decoders report it
        return ("decord", "pyav")
    return ("decord", "pyav") if fmt in DECORD_CONTAINERS and codec in DECORD_CODECS else ("pyav", "decord")


def check_decoder(name: str) -> str:
    """``name`` if it is one of DECODERS; BadValue naming it otherwise (the one check of --decoder)."""
    if name not in DECODERS:
        raise BadValue(f"unknown decoder {name!r}; expected one of {', '.join(DECODERS)}")
    return name


@dataclass
class DecodedVideo:
    """Sampled clips of one video: ``frames`` is (N, L, size, size, 3) uint8 RGB."""

    frames: np.ndarray
    num_frames: int
    fps: float
    clip_start: list[int]
    short: bool  # shorter than one clip span: the last frame is repeated
    decoder: str = "decord"  # which decoder read it: "decord" or "pyav"
    fallback: str | None = None  # with --decoder auto: the first decoder's error when the other read the file


class DecodeError(Exception):
    """A video that cannot be decoded; ``stage`` is "open" (not a readable video) or "decode".

    ``errors`` holds each decoder's own message when several were tried (``--decoder auto``).
    """

    def __init__(self, stage: str, message: str, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.stage = stage
        self.errors = errors or {}


def resize_size(height: int, width: int, size: int, short: int | None = None) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``short`` (default round(size * 8 / 7)), keeping the aspect ratio."""
    short = round_half_up(size * 8 / 7) if short is None else short
    if height <= width:
        return short, max(short, round_half_up(width * short / height))
    return max(short, round_half_up(height * short / width)), short


def resize_crop(frames: Any, size: int, short: int | None = None) -> np.ndarray:
    """(k, H, W, 3) uint8 frames (an array, or anything ``np.asarray`` takes) -> (k, size, size, 3)
    uint8: short side to ``short`` (default size*8/7; antialiased bilinear), centre crop.

    Pillow's bilinear filter, which widens with the scale factor as torch's ``interpolate(...,
    antialias=True)`` does, in torch's order (along the width, rounded to uint8, then along the
    height): the frames the decoders gave with torch's resize, within 1 level per pixel (2 at a few
    pixels of sharp edges when upscaling; tests/test_decoding.py), and the decode workers need no
    torch. Only the crop is computed (Pillow's ``box``: the crop's rectangle in source pixels, the
    filter still reading the pixels around it; 1.5-2x faster than resizing whole frames); an axis
    already at its size is only cropped.
    """
    from PIL import Image

    frames = np.asarray(frames)
    k, h, w, _ = frames.shape
    rh, rw = resize_size(h, w, size, short)
    top, left = (rh - size) // 2, (rw - size) // 2
    if (rh, rw) == (h, w):
        return frames[:, top:top + size, left:left + size]
    sy, sx = h / rh, w / rw  # source pixels per resized pixel
    if rh == h:
        r0, r1 = top, top + size
    else:  # the rows the vertical filter reads for the crop's rows (support: 1 resized pixel each side)
        r0 = max(0, int(np.floor(top * sy - max(sy, 1.0))) - 1)
        r1 = min(h, int(np.ceil((top + size) * sy + max(sy, 1.0))) + 1)
    out = np.empty((k, size, size, 3), dtype=np.uint8)
    for i in range(k):
        rows = frames[i, r0:r1]  # (r1 - r0, W, 3)
        if rw == w:
            wide = Image.fromarray(np.ascontiguousarray(rows[:, left:left + size]))
        else:  # horizontal pass only (Pillow filters rows first when its box also crops rows: not torch's order)
            wide = Image.fromarray(np.ascontiguousarray(rows)).resize(
                (size, r1 - r0), Image.Resampling.BILINEAR, box=(left * sx, 0, (left + size) * sx, r1 - r0))
        if rh != h:  # vertical pass only
            wide = wide.resize((size, size), Image.Resampling.BILINEAR,
                               box=(0, top * sy - r0, size, (top + size) * sy - r0))
        out[i] = np.asarray(wide)
    return out


def open_reader(path: str | Path):
    """A decord VideoReader with one decoding thread (more fail on some files and are rarely faster)."""
    try:
        import decord
    except ImportError as err:
        raise DecodeError("open", f"decord is not installed ({err}); use --decoder pyav") from None
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises RuntimeError or DECORDError for anything it cannot open
        raise DecodeError("open", short_error(err)) from None
    if len(vr) < 1:
        raise DecodeError("open", "no video frames")
    return vr


def short_error(err: BaseException) -> str:
    """An exception as one short line: its type and the last non-empty line of its message."""
    text = str(err).strip().splitlines()
    msg = next((line for line in reversed(text) if line.strip()), type(err).__name__) if text else type(err).__name__
    return f"{type(err).__name__}: {msg[:300]}"


class _Frames:
    """The frames one video's clips need (docs/format.md "Clip sampling") and the buffer they fill.

    ``unique`` are the needed frame indices, sorted (decoders seek forward only); ``put`` resizes
    and crops a chunk of decoded frames ``unique[a:b]`` and writes it to every clip slot using it.
    """

    def __init__(self, num_frames: int, sampling: Sampling, out: np.ndarray | None):
        starts = sampling.starts(num_frames)
        flat = np.asarray(sampling.frame_indices(starts, num_frames), dtype=np.int64).reshape(-1)
        self.unique, self.inverse = np.unique(flat, return_inverse=True)
        shape = sampling.shape
        if out is None:
            out = np.empty(shape, dtype=np.uint8)
        elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise BadValue(f"out buffer is {out.shape} {out.dtype}, need {shape} uint8, contiguous")
        self.out, self.starts, self.size, self.num_frames = out, starts, sampling.size, num_frames
        self.short_side = sampling.resize_short
        self.short = num_frames < sampling.span
        self._dest = out.reshape(sampling.clips * sampling.clip_len, sampling.size, sampling.size, 3)  # a view

    def put(self, a: int, b: int, chunk: np.ndarray) -> None:
        """``chunk`` (b - a, H, W, 3) uint8: the decoded frames ``unique[a:b]``."""
        small = resize_crop(chunk, self.size, self.short_side)  # (k, size, size, 3)
        mask = (self.inverse >= a) & (self.inverse < b)
        self._dest[np.nonzero(mask)[0]] = small[self.inverse[mask] - a]

    def result(self, fps: float, decoder: str) -> DecodedVideo:
        return DecodedVideo(self.out, self.num_frames, fps, self.starts, self.short, decoder)


def _finite(fps: float) -> float:
    return fps if np.isfinite(fps) and fps > 0 else 0.0


def decode_clips_decord(path: str | Path, sampling: Sampling, *, out: np.ndarray | None = None) -> DecodedVideo:
    """``decode_clips`` with decord: ``get_batch`` of the needed frames, ``CHUNK_FRAMES`` at a time."""
    vr = open_reader(path)
    num_frames = len(vr)
    try:
        fps = _finite(float(vr.get_avg_fps()))
    except Exception:  # some containers have no rate
        fps = 0.0
    plan = _Frames(num_frames, sampling, out)
    unique = plan.unique
    for a in range(0, len(unique), CHUNK_FRAMES):
        b = min(a + CHUNK_FRAMES, len(unique))
        try:
            chunk = vr.get_batch(unique[a:b].tolist()).asnumpy()  # (k, H, W, 3) uint8
        except Exception as err:
            raise DecodeError("decode", f"frames {int(unique[a])}-{int(unique[b - 1])} of {num_frames}: "
                                        f"{short_error(err)}") from None
        if chunk.ndim != 4 or chunk.shape[0] != b - a or chunk.shape[-1] != 3:  # decord misreads some
            raise DecodeError("decode", f"decoder returned frames of shape {chunk.shape} for {b - a} frames "
                                        f"(decord misreads frames narrower than 80 px of some widths)")
        plan.put(a, b, chunk)
    del vr
    return plan.result(fps, "decord")


def _pyav_open(path: str | Path):
    try:
        import av
    except ImportError as err:
        raise DecodeError("open", f"PyAV is not installed ({err}): pip install av") from None
    try:
        container = av.open(str(path), mode="r")
    except Exception as err:  # av.error.FFmpegError subclasses (InvalidDataError, ...) and OSError
        raise DecodeError("open", short_error(err)) from None
    stream = container.streams.best("video")  # av_find_best_stream, decord's choice: not a cover picture
    if stream is None:
        container.close()
        raise DecodeError("open", "no video stream")
    stream.thread_count = 1  # one thread per reader, as decord: parallelism comes from the workers
    return container, stream


def _pyav_count(path: str | Path) -> int:
    """Frames of the video stream, by decoding them all (a container without a frame count)."""
    container, stream = _pyav_open(path)
    with container:
        try:
            return sum(1 for _ in container.decode(stream))
        except Exception as err:
            raise DecodeError("decode", f"counting frames: {short_error(err)}") from None


def decode_clips_pyav(path: str | Path, sampling: Sampling, *, out: np.ndarray | None = None,
                      num_frames: int | None = None) -> DecodedVideo:
    """``decode_clips`` with PyAV (FFmpeg with dav1d: AV1, VP9, HEVC, ProRes, MPEG-2, ...).

    Frame i is the i-th frame the decoder outputs (decode order of presentation, as decord counts);
    the frame count is the container's, or a counted decode when the header has none (WebM, MKV,
    MPEG-PS) or overstates it. A frame the container says to show rotated (a phone's portrait video:
    its display matrix) is turned as shown, as decord does (counter-clockwise by ``frame.rotation``).
    The file is decoded sequentially up to the last needed frame; only needed frames are converted
    to RGB, resized and cropped, ``CHUNK_FRAMES`` at a time.
    """
    container, stream = _pyav_open(path)
    if num_frames is None and not stream.frames:
        container.close()
        counted = _pyav_count(path)
        if counted < 1:
            raise DecodeError("open", "no video frames")
        return decode_clips_pyav(path, sampling, out=out, num_frames=counted)
    num_frames = int(num_frames or stream.frames)
    with container:
        rate = stream.average_rate or stream.guessed_rate
        fps = _finite(float(rate)) if rate else 0.0
        plan = _Frames(num_frames, sampling, out)
        unique = plan.unique.tolist()
        chunk: list[np.ndarray] = []
        a = k = 0  # chunk start in unique; next needed position in unique
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if k >= len(unique):
                    break
                if index != unique[k]:
                    continue
                rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8, as stored
                turns = round(getattr(frame, "rotation", 0) / 90) % 4  # the display matrix (PyAV >= 13)
                chunk.append(np.rot90(rgb, turns) if turns else rgb)  # as shown, and as decord gives it
                k += 1
                if len(chunk) == CHUNK_FRAMES or k == len(unique):
                    _put_frames(plan, a, chunk)
                    a, chunk = k, []
        except DecodeError:
            raise
        except Exception as err:
            raise DecodeError("decode", f"frame {index + 1} of {num_frames}: {short_error(err)}") from None
    if k < len(unique):  # the header overstated the frame count: resample on the frames that exist
        counted = index + 1
        if not 0 < counted < num_frames:
            raise DecodeError("decode", f"the decoder gave {counted} of the {num_frames} frames")
        log.debug("%s: the container says %d frames, %d decoded", path, num_frames, counted)
        return decode_clips_pyav(path, sampling, out=out, num_frames=counted)
    return plan.result(fps, "pyav")


def _put_frames(plan: _Frames, a: int, chunk: list[np.ndarray]) -> None:
    """Frames of one shape go through ``put`` together; a stream that changes size mid-way, one by one."""
    if all(f.shape == chunk[0].shape for f in chunk):
        plan.put(a, a + len(chunk), np.stack(chunk))
    else:
        for j, f in enumerate(chunk):
            plan.put(a + j, a + j + 1, f[None])


def decode_clips(path: str | Path, sampling: Sampling, *, out: np.ndarray | None = None,
                 decoder: str = "auto") -> DecodedVideo:
    """Decode the clips ``sampling`` names (its ``num_clips`` uniformly sampled clips, or only those
    at its ``positions``) of one video (docs/format.md "Clip sampling").

    ``decoder``: "decord", "pyav", or "auto": the first decoder of :func:`auto_order` (decord for the
    codecs and containers it reads exactly, PyAV for the rest), and the other in the same process
    when it cannot open or decode the file. Only the needed frames are read, in sorted order,
    ``CHUNK_FRAMES`` at a time, each chunk resized and cropped before the next is decoded. ``out``
    (``sampling.shape``: n, L, size, size, 3) uint8, when given, receives the frames (a decode
    worker's shared buffer).
    Raises DecodeError with stage "open" or "decode"; after both decoders failed its ``errors``
    holds each one's message (stage "open" only when neither could open the file).
    """
    check_decoder(decoder)
    if decoder != "auto":
        return _DECODE[decoder](path, sampling, out=out)
    order = auto_order(path)
    try:
        return _DECODE[order[0]](path, sampling, out=out)
    except DecodeError as first:
        try:
            d = _DECODE[order[1]](path, sampling, out=out)
        except DecodeError as second:
            stage = "open" if first.stage == second.stage == "open" else "decode"
            errors = {order[0]: str(first), order[1]: str(second)}
            raise DecodeError(stage, f"{order[0]}: {first}; {order[1]}: {second}", errors) from None
        d.fallback = str(first)
        return d


_DECODE = {"decord": decode_clips_decord, "pyav": decode_clips_pyav}


def normalise_clips(clips: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """(B, L, H, W, 3) uint8 -> (B, 3, L, H, W) float: scaled to [0, 1], minus mean, over std (per channel)."""
    import torch

    x = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, L, H, W)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    return x.sub_(m).div_(s)
