"""Helpers the tests share (importable as ``helpers``: conftest.py puts this folder on sys.path, so
decode workers started by the tests can import the fault functions below by name too)."""
from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Sequence

from faster.store.header import Header, ModelHeader


def header(models: Sequence[str], *, num_clips: int, clip_len: int = 8, classes: Sequence[str] = ("a", "b"),
           size: int = 32, gflops: float = 1.0, weights: str = "random-init:seed=0", mean: float = 0.5,
           std: float = 0.25, software_version: str = "test") -> Header:
    """A feature-set header with the same provenance for every model."""
    return Header(clip_len=clip_len, num_clips=num_clips, frame_stride=1, size=size, classes=list(classes),
                  software_version=software_version, torch_version="test",
                  models={m: ModelHeader(gflops_per_clip=gflops, layer="res5", weights=weights, mean=[mean] * 3,
                                         std=[std] * 3, compute_dtype="float32") for m in models})


def _faulty_decode(path: Any, *, match: str, action: str, seconds: float, **kw: Any) -> Any:
    """decode_clips, except on a video whose path contains ``match``: sleep first, or kill the process."""
    from faster.extract.video import decode_clips

    if match in str(path):
        if action == "exit":
            os._exit(3)  # a decoder that dies
        time.sleep(seconds)  # a decoder that hangs
    return decode_clips(path, **kw)


def fault(spec: str) -> functools.partial:
    """A decode function with a fault: "SUBSTRING:sleep=SECONDS" or "SUBSTRING:exit"."""
    match, _, action = spec.rpartition(":")
    if action == "exit":
        return functools.partial(_faulty_decode, match=match, action="exit", seconds=0.0)
    if action.startswith("sleep="):
        return functools.partial(_faulty_decode, match=match, action="sleep", seconds=float(action[6:]))
    raise ValueError(f"fault {spec!r}: expected SUBSTRING:sleep=SECONDS or SUBSTRING:exit")


def kill_after_shards(k: int):
    """An ``after_add`` callback: SIGKILL this process inside shard k+1, after k complete shards."""
    def after_add(writer: Any) -> None:
        if writer.shards_written >= k:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_add
