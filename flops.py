"""FLOPs as the paper counts them: multiply-adds (Tables 2, 4, 6).

torch.utils.flop_counter counts 2 FLOPs per multiply-add; we halve it. Counting runs on meta
tensors, so a full-size backbone costs no real compute. Shared by extract (backbones) and
aggregate (aggregators); it imports neither.
"""
from __future__ import annotations

from typing import Any, Callable


def count_macs(fn: Callable[..., Any], *inputs: Any) -> int:
    """Multiply-adds of ``fn(*inputs)`` (convolutions and matrix products, as the paper counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() // 2
