"""Helpers the tests share (importable as ``helpers``: conftest.py puts this folder on sys.path, so
decode workers started by the tests can import the fault functions below by name too).

Faults are injected from here, by patching faster's module-level functions (inject_decode_fault,
kill_after_shards); faster itself has no parameter for them."""
from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faster.store.header import Header, ModelHeader


def header(models: Sequence[str], *, num_clips: int, clip_len: int = 8, classes: Sequence[str] = ("a", "b"),
           size: int = 32, gflops: float = 1.0, weights: str = "random-init:seed=0", mean: float = 0.5,
           std: float = 0.25, software_version: str = "test") -> Header:
    """A feature-set header with the same provenance for every model."""
    return Header(clip_len=clip_len, num_clips=num_clips, frame_stride=1, size=size, classes=list(classes),
                  software_version=software_version, torch_version="test",
                  models={m: ModelHeader(gflops_per_clip=gflops, layer="res5", weights=weights, mean=[mean] * 3,
                                         std=[std] * 3, compute_dtype="float32") for m in models})


def _faulty_decode(path: Any, *args: Any, match: str, action: str, seconds: float, decode: Any,
                  only_decoder: str | None = None, until: str | None = None, **kw: Any) -> Any:
    """``decode`` (the real decode_clips), except on a video whose path contains ``match`` (and, with
    ``only_decoder``, decoded with that --decoder): sleep first, wait until the file ``until`` exists
    (at most ``seconds``), or kill the process."""
    if match in str(path) and (only_decoder is None or kw.get("decoder", "auto") == only_decoder):
        if action == "exit":
            os._exit(3)  # a decoder that dies
        if action == "wait":  # a decoder held until the test releases it
            deadline = time.monotonic() + seconds
            while not Path(until).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            time.sleep(seconds)  # a decoder that hangs
    return decode(path, *args, **kw)


def _parse_fault(spec: str) -> dict[str, Any]:
    """"SUBSTRING:sleep=SECONDS", "SUBSTRING:wait=PATH" (until PATH exists, at most 300 s) or
    "SUBSTRING:exit", optionally "@DECODER" (only a decode with that --decoder), as _faulty_decode's
    keywords."""
    match, _, action = spec.rpartition(":")
    action, _, decoder = action.partition("@")
    only = {"only_decoder": decoder} if decoder else {}
    if action == "exit":
        return {"match": match, "action": "exit", "seconds": 0.0, **only}
    if action.startswith("sleep="):
        return {"match": match, "action": "sleep", "seconds": float(action[6:]), **only}
    if action.startswith("wait="):
        return {"match": match, "action": "wait", "seconds": 300.0, "until": action[5:], **only}
    raise ValueError(f"fault {spec!r}: expected SUBSTRING:sleep=SECONDS, SUBSTRING:wait=PATH or SUBSTRING:exit, "
                     f"then optionally @DECODER")


def _patch_decode(spec: str) -> None:
    """In this process: faster.extract.video.decode_clips, which every decoder calls, gets the fault."""
    from faster.extract import video

    video.decode_clips = functools.partial(_faulty_decode, **_parse_fault(spec), decode=video.decode_clips)


def _worker_with_fault(*args: Any, spec: str) -> None:
    """A decode worker process (the target DecodePool starts) that first gives its own decode_clips
    the fault, then runs the real worker."""
    from faster.extract import decoders

    _patch_decode(spec)
    decoders._decode_worker(*args)


def inject_decode_fault(monkeypatch: Any, spec: str) -> None:
    """Decode with a fault, "SUBSTRING:sleep=SECONDS" or "SUBSTRING:exit", from now on (``monkeypatch``:
    pytest's fixture, or a pytest.MonkeyPatch). In this process (--workers 0) decode_clips is
    patched; the decode worker processes, which a forkserver starts with their own fresh modules,
    run _worker_with_fault instead of the worker (DecodePool looks its target up when it starts
    one, and pickles it by name: this module is importable there, conftest.py puts it on sys.path)."""
    from faster.extract import decoders, video

    decode = video.decode_clips
    while isinstance(decode, functools.partial) and decode.func is _faulty_decode:  # a fault injected before
        decode = decode.keywords["decode"]
    monkeypatch.setattr(video, "decode_clips", functools.partial(_faulty_decode, **_parse_fault(spec), decode=decode))
    monkeypatch.setattr(decoders, "_decode_worker", functools.partial(_worker_with_fault, spec=spec))


def kill_after_shards(monkeypatch: Any, k: int) -> None:
    """SIGKILL this process inside shard k+1 of a new feature set: right after its first video is added
    (FeatureSetWriter.add, patched through ``monkeypatch``), with k complete shards written."""
    from faster.store.writer import FeatureSetWriter

    add = FeatureSetWriter.add

    def add_then_kill(self: FeatureSetWriter, **kw: Any) -> None:
        add(self, **kw)
        if self.added > k * self.shard_size:
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(FeatureSetWriter, "add", add_then_kill)


def fit_evaluate_predict(videos: Any, feats: Any, out: Any, expensive: str, cheap: str, agg: str = "fastgru",
                         epochs: int = 2) -> None:
    """Fit ``agg`` 1:1 on ``feats`` into ``out``/run, evaluate it there and predict ``videos``; assert
    predict == evaluate video by video (probs within float16 rounding)."""
    import json
    from pathlib import Path

    import numpy as np

    from faster.aggregate.evaluation import evaluate
    from faster.aggregate.fit import FitConfig, fit
    from faster.predict import PredictConfig, predict

    out = Path(out)
    run = out / "run"
    fit(FitConfig([str(feats)], str(run), agg, expensive, cheap, "1:1", epochs=epochs, batch_size=4, workers=0,
                  progress=False, val_fraction=0.5))
    evaluate(run, [str(feats)], str(out / "eval.jsonl"), workers=0, progress=False)
    predict(PredictConfig(videos=[str(videos)], run=str(run), out=str(out / "pred.jsonl"), workers=0))

    def lines(path: Path) -> dict[str, Any]:
        return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}

    ev, pred = lines(out / "eval.jsonl"), lines(out / "pred.jsonl")
    assert set(pred) == set(ev) and ev
    for vid, e in ev.items():
        np.testing.assert_allclose(pred[vid]["probs"], e["probs"], atol=1e-2, err_msg=vid)


def small_fit(feats: Any, out: Any, **kw: Any) -> Any:
    """A FitConfig for a small write_synthetic set (its models "exp" and "chp"): avg at 1:1, one epoch,
    batch 8, in-process loading, no progress; ``kw`` overrides. ``feats``: one directory or several."""
    from faster.aggregate.fit import FitConfig

    dirs = [str(f) for f in feats] if isinstance(feats, (list, tuple)) else [str(feats)]
    return FitConfig(**{"feats": dirs, "out": str(out), "agg": "avg", "expensive": "exp", "cheap": "chp",
                        "pattern": "1:1", "epochs": 1, "batch_size": 8, "workers": 0, "progress": False, **kw})


def held_values(folder: Any, model: str = "m", index: int = 0) -> dict[str, float]:
    """Video id -> one value of its features (flat ``index``) over every shard in ``folder``; asserts
    that no video is held twice (what verify --repair must leave)."""
    import h5py

    from faster.store import schema

    held: dict[str, float] = {}
    for path in sorted(Path(folder).glob(schema.SHARD_GLOB)):
        with h5py.File(path) as f:
            for k, i in enumerate(f["videos/id"].asstr()[()]):
                assert i not in held, f"{i} twice"
                held[i] = float(f[schema.features_key(model)][k].flat[index])
    return held
