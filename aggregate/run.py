"""The run directory of a fit (../DESIGN.md "Command line"), and the project's one checkpoint loader.

  config.json         the FitConfig (asdict)
  checkpoint.pt       plain containers + tensors (loadable with torch.load(weights_only=True)): the
                      config, the aggregator's name, constructor kwargs and state dict, classes, the
                      expensive/cheap models with their feature shapes and provenance, the extraction
                      configuration, the clip positions used, the pattern and its expensive mask
  metrics.jsonl       one JSON object per epoch
  result.json         written last: a run with result.json is complete
  val_predictions.jsonl   the final epoch's validation predictions (what `faster evaluate` reproduces)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"
VAL_PREDICTIONS = "val_predictions.jsonl"
PREDICTIONS = "predictions.jsonl"
CHECKPOINT_FORMAT = "faster-run"
CHECKPOINT_VERSION = 1


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def append_jsonl(path: str | Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Write JSON lines atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    _replace_atomically(Path(path), write)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save of plain containers, atomically."""
    import torch

    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    _replace_atomically(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run's checkpoint (``path`` is the run directory or the .pt file), loaded with weights_only=True."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{path}: no checkpoint (a run directory holds {CHECKPOINT})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it
        raise ValueError(f"{path}: not a readable checkpoint ({err.__class__.__name__}: {err})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a faster run checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ck.get('version')!r}; this faster reads {CHECKPOINT_VERSION}")
    return ck
