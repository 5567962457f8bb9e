"""Counting multiply-adds, the paper's FLOPs (Tables 2, 4, 6), and caching the counts per user.

``count_macs`` runs a forward under a dispatch mode that sums torch.utils.flop_counter's formulas
(its ``flop_registry``: convolutions, matrix products, attention), which count 2 FLOPs per
multiply-add; we halve them. Counting runs on meta tensors, so a full-size backbone costs no real
compute. ``cached_count`` keeps a count in the per-user cache. Used by the backbones' cost
(extract/models/cost.py) and the aggregators' (aggregate/flops.py); it imports neither.

The counting mode is ours, not ``FlopCounterMode``: since torch 2.9 every TorchDispatchMode's
``__torch_dispatch__`` is wrapped so that its first call imports torch._dynamo, most of `faster
flops`'s and an extraction's start-up (BENCHMARKS.md "Start-up"). A mode that only counts needs
none of it, so it opts out (``_should_skip_dynamo``). FlopCounterMode's per-module breakdown is not
needed: we count one total.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MODE: Any = None


def _counting_mode() -> Any:
    """The TorchDispatchMode class that sums torch's FLOP formulas (built once, on first use)."""
    global _MODE
    if _MODE is not None:
        return _MODE
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten  # metadata queries: left to the default implementation, as FlopCounterMode does
    metadata = {aten.sym_is_contiguous.default, aten.is_contiguous.default, aten.is_contiguous.memory_format,
                aten.is_strides_like_format.default, aten.is_non_overlapping_and_dense.default,
                aten.size.default, aten.sym_size.default, aten.stride.default, aten.sym_stride.default,
                aten.storage_offset.default, aten.sym_storage_offset.default, aten.numel.default,
                aten.sym_numel.default, aten.dim.default, torch.ops.prim.layout.default}

    class _Count(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:  # no torch._dynamo import: we compile nothing
            return False

        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in metadata:
                return NotImplemented
            # No decomposition of unregistered ops (FlopCounterMode's fallback): the counted ones
            # (convolutions, mm/addmm/bmm, attention) reach the mode as they are, composite ops such
            # as linear and matmul arrive decomposed already, and decomposing the rest (batch norm,
            # elementwise ops) would import torch._dynamo through torch._refs for nothing.
            packet = func._overloadpacket
            out = func(*args, **kwargs)
            if packet in flop_registry:
                self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
            return out

    _MODE = _Count
    return _MODE


def count_macs(fn: Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of ``fn(*inputs)`` (convolutions and matrix products, as the paper counts)."""
    with _counting_mode()() as counter:
        fn(*inputs)
    return counter.flops // 2


def cached_count(key: str, sources: list[str], compute: Callable[[], Any]) -> Any:
    """``compute()`` (JSON-able), kept in the per-user cache ($FASTER_CACHE_DIR/flops.json) under
    ``key`` plus the versions of faster and torch and the size and mtime of each file in ``sources``
    (the modules that define the network): counting runs on meta tensors, whose first use costs
    torch's import of torch._dynamo (BENCHMARKS.md "Start-up"); a count already made costs nothing."""
    import os

    import torch

    import faster
    from faster.store.files import user_cache

    stamp = [faster.__version__, str(torch.__version__)]
    for path in sources:
        try:
            st = os.stat(path)
            stamp.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            stamp.append(f"{path}:?")
    full = key + "|" + "|".join(stamp)
    cache = user_cache("flops.json")
    hit = cache.entries.get(full)
    if hit is not None:
        return hit["value"]
    value = compute()
    cache.entries[full] = {"value": value}
    cache.dirty = True
    cache.save()
    return value
