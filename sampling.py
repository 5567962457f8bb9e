"""Uniform clip sampling (paper, "Experimental Setups": N clips of L frames spread over the video).

start_i = round(i * (F - span) / (N - 1)) for N > 1 and the centred start for N = 1, where
span = (L - 1) * stride + 1. A video shorter than one span starts every clip at 0 and repeats its
last frame (``frame_indices`` clamps). Rounding is half-up everywhere, so extraction and predict
agree bit for bit.
"""
from __future__ import annotations

import math

from faster.errors import BadValue


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def clip_span(clip_len: int, frame_stride: int = 1) -> int:
    """Frames covered by one clip: (L - 1) * s + 1."""
    return (clip_len - 1) * frame_stride + 1


def clip_starts(num_frames: int, num_clips: int, clip_len: int, frame_stride: int = 1) -> list[int]:
    """First frame of each of ``num_clips`` clips, spread evenly over ``num_frames`` frames."""
    if num_frames < 1:
        raise BadValue(f"num_frames must be >= 1, got {num_frames}")
    if num_clips < 1 or clip_len < 1 or frame_stride < 1:
        raise BadValue(f"num_clips, clip_len and frame_stride must be >= 1, got "
                         f"{num_clips}, {clip_len}, {frame_stride}")
    room = max(num_frames - clip_span(clip_len, frame_stride), 0)
    if num_clips == 1:
        return [room // 2]
    return [round_half_up(i * room / (num_clips - 1)) for i in range(num_clips)]


def frame_indices(starts: list[int], num_frames: int, clip_len: int, frame_stride: int = 1) -> list[list[int]]:
    """Frame index of every frame of every clip, clamped to the last frame that exists."""
    last = num_frames - 1
    return [[min(s + j * frame_stride, last) for j in range(clip_len)] for s in starts]
