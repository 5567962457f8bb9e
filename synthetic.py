"""Synthetic test videos (H.264 mp4 via PyAV; HEVC, VP9, AV1, ProRes, MPEG-2, MPEG-4 Part 2 on request):
small labelled sets whose class is a motion direction.

A square moves across a static textured background in one of several directions. A single frame
cannot tell the class; the order of frames can, so a temporal backbone (R(2+1)D, paper Table 1)
and a temporal aggregator (FAST-GRU, paper Eq. 3-6) have something to learn that a per-frame
model does not. ``make_motion_dataset`` writes the folder-per-class layout that ``faster extract``
reads; ``write_kinetics_like`` writes 340x256, 30 fps clips shaped like Kinetics videos for the
benchmarks; ``write_audio_only`` writes an mp4 with no video stream (a failure case).

PyAV (a runtime dependency: the second decoder) is imported lazily, inside the writers.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from faster.errors import BadValue

# Unit velocity (dx, dy) per direction, image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}
DEFAULT_CLASSES = ("left", "right", "up", "down")
STYLES = ("textured", "plain")


def _av():
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("faster.synthetic writes videos with PyAV: pip install av (or pip install 'faster[test]')") from err
    return av


# Codecs write_video encodes (PyAV's FFmpeg): name -> (encoder, pixel format, encoder options).
# Pick the container by the file name (.mp4 for h264/hevc/mpeg2/mpeg4, .avi, .webm for vp9, .mkv for av1, .mov
# for prores); fast settings, since these are test inputs, not archives.
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    "h264": ("libx264", "yuv420p", {"crf": "{crf}", "preset": "veryfast"}),
    "hevc": ("libx265", "yuv420p", {"crf": "{crf}", "preset": "ultrafast", "x265-params": "log-level=none"}),
    "vp9": ("libvpx-vp9", "yuv420p", {"crf": "{crf}", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "av1": ("libsvtav1", "yuv420p", {"crf": "{crf}", "preset": "10"}),
    "prores": ("prores_ks", "yuv422p10le", {"profile": "0"}),
    "mpeg2": ("mpeg2video", "yuv420p", {"qscale": "3"}),
    "mpeg4": ("mpeg4", "yuv420p", {"qscale": "3", "bf": "2"}),  # MPEG-4 Part 2 (Xvid/DivX: UCF101, HMDB51)
}
_ENCODERS = {enc: name for name, (enc, _, _) in CODECS.items()}


def write_video(path: str | Path, frames: np.ndarray, fps: int = 30, codec: str = "h264", crf: int = 23) -> Path:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB into ``path``; H and W must be even.

    ``codec``: a name of ``CODECS`` (h264, hevc, vp9, av1 through libsvtav1, prores, mpeg2, mpeg4) or its
    encoder's name ("libx264"); ``crf`` is the quality of the encoders that take one.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise BadValue(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise BadValue(f"need >= 1 frame and even height/width for yuv420p, got {t} frames of {h}x{w}")
    name = _ENCODERS.get(codec, codec)
    if name not in CODECS:
        raise BadValue(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    encoder, pix_fmt, options = CODECS[name]
    av = _av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {k: v.format(crf=crf) for k, v in options.items()}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def motion_frames(direction: str, frames: int = 32, size: int = 64, seed: int = 0, style: str = "textured",
                  speed: tuple[float, float] = (1.0, 2.0)) -> np.ndarray:
    """(frames, size, size, 3) uint8: a square moving in ``direction`` (wrapping at the borders).

    ``style``: "textured" (a per-video random blocky background and square colour, side size/5) or
    "plain" (the same mid-grey background and white square in every video, side 2*size/5), where
    only the start, the speed and the direction differ between videos. ``speed``: the range of
    the per-video speed in pixels per frame at 64 px (scaled with ``size``).
    Use size 32, 40 or >= 64 for videos decord will read: it misreads frames 8-24, 48 or 72 px wide.
    """
    if direction not in DIRECTIONS:
        raise BadValue(f"unknown direction {direction!r}; expected one of {sorted(DIRECTIONS)}")
    if frames < 1 or size < 8 or size % 2:
        raise BadValue(f"need frames >= 1 and an even size >= 8, got frames={frames}, size={size}")
    if style not in STYLES:
        raise BadValue(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if not 0 < speed[0] <= speed[1]:
        raise BadValue(f"speed must be a range 0 < low <= high, got {speed!r}")
    rng = np.random.default_rng(seed)
    if style == "textured":
        # A smooth static background texture (blocky noise, upsampled) in muted colours.
        coarse = rng.integers(40, 140, size=(size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
        background = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:size, :size]
        side = max(size // 5, 3)
        colour = rng.integers(180, 256, size=3, dtype=np.uint8)
    else:
        background = np.full((size, size, 3), 64, dtype=np.uint8)
        side = max(2 * size // 5, 3)
        colour = np.full(3, 224, dtype=np.uint8)
    dx, dy = DIRECTIONS[direction]
    speed = rng.uniform(*speed) * size / 64  # pixels per frame
    x0, y0 = rng.uniform(0, size, size=2)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    rows = np.arange(size)
    for t in range(frames):
        x = int(x0 + dx * speed * t) % size
        y = int(y0 + dy * speed * t) % size
        frame = background.copy()
        ys = (y + rows[:side]) % size
        xs = (x + rows[:side]) % size
        frame[np.ix_(ys, xs)] = colour
        out[t] = frame
    return out


def make_motion_dataset(root: str | Path, classes: Iterable[str] = DEFAULT_CLASSES, per_class: int = 4,
                        frames: int = 32, size: int = 64, seed: int = 0, fps: int = 30, style: str = "textured",
                        speed: tuple[float, float] = (1.0, 2.0)) -> list[Path]:
    """Write ``root/<class>/<class>_<i>.mp4`` for every class (a direction) and return the paths, sorted.

    Videos are deterministic given ``seed``; each video gets its own start and speed (and colours
    with ``style="textured"``); ``style`` and ``speed`` as in :func:`motion_frames`.
    """
    classes = list(classes)
    if not classes:
        raise BadValue("classes is empty")
    if per_class < 1:
        raise BadValue(f"per_class must be >= 1, got {per_class}")
    root = Path(root)
    paths = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            video_seed = seed * 1_000_003 + c * 10_007 + i
            paths.append(write_video(root / name / f"{name}_{i:03d}.mp4",
                                     motion_frames(name, frames=frames, size=size, seed=video_seed, style=style,
                                                   speed=speed), fps=fps))
    return sorted(paths)


def write_kinetics_like(path: str | Path, seconds: float = 10.0, fps: int = 30, width: int = 340, height: int = 256,
                        seed: int = 0, codec: str = "h264") -> Path:
    """A Kinetics-shaped clip (340x256, 30 fps, H.264 or ``codec``): a scrolling textured background and a moving square.

    Camera-like global motion keeps the encoder (and so the decoder) busy as real footage does.
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    coarse = rng.integers(0, 256, size=(height // 4 + 1, 2 * width // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((4, 4, 1), dtype=np.uint8))[:height, : 2 * width]
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    side = height // 5
    for t in range(n):
        shift = (3 * t) % width
        out[t] = texture[:, shift:shift + width]
        x = (5 * t) % (width - side)
        y = (height - side) // 2 + int(40 * np.sin(t / 15))
        out[t, y:y + side, x:x + side] = (250, 40, 40)
    return write_video(path, out, fps=fps, codec=codec)


def write_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """An mp4 holding one AAC audio stream and no video: a file with a video extension that has no frames."""
    av = _av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = int(seconds * rate)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)).astype(np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        step = 1024
        for start in range(0, samples, step):
            chunk = tone[None, start:start + step]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
