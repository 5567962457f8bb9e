"""Where a process runs: its part of a distributed job, its device, its precision, its CPU threads.

Shared by extract, fit, predict and ablate. Placement reads torchrun's RANK / WORLD_SIZE /
LOCAL_RANK / LOCAL_WORLD_SIZE and the Slurm-array options (README "Many GPUs, many nodes"):
part = shard_index * WORLD_SIZE + RANK of num_shards * WORLD_SIZE parts.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from faster.errors import BadValue

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    part: int  # shard_index * world_size + rank
    num_parts: int  # num_shards * world_size


def placement(num_shards: int = 1, shard_index: int = 0, env: dict[str, str] | None = None) -> Placement:
    """This process's part from torchrun's RANK/WORLD_SIZE/LOCAL_RANK and the Slurm-array options."""
    env = os.environ if env is None else env

    def geti(name: str, default: int) -> int:
        value = env.get(name, "")
        try:
            return int(value) if value != "" else default
        except ValueError:
            raise BadValue(f"environment variable {name}={value!r} is not an integer") from None

    world, rank = geti("WORLD_SIZE", 1), geti("RANK", 0)
    local_rank, local_world = geti("LOCAL_RANK", rank), geti("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise BadValue(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if not 0 <= shard_index < num_shards:
        raise BadValue(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
    return Placement(rank, world, local_rank, max(local_world, 1), shard_index * world + rank, num_shards * world)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK; "cuda:N", "cpu"."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        name = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadValue(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadValue(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"device {name!r} requested but CUDA is not available")
    return dev


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as its flags in /proc/cpuinfo say;
    False where they cannot be read (bf16 would be emulated, slower than fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


DTYPES = ("auto", "fp32", "bf16")  # --dtype of extract and predict


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of DTYPES; BadValue naming it otherwise (the one check of --dtype)."""
    if dtype not in DTYPES:
        raise BadValue(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"float32" or "bfloat16" for --dtype auto|fp32|bf16 on ``device``: auto is bf16 on a CUDA
    device that supports it and on a CPU with native bf16 (faster than fp32 there: see
    BENCHMARKS.md), else fp32."""
    import torch

    if check_dtype(dtype) == "fp32":
        return "float32"
    if dtype == "bf16":
        return "bfloat16"
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if native_bf16_cpu() else "float32"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


HEAVY_GFLOPS = 5.0  # models costing more per clip than this leave the decoders no core of their own


def cpu_threads(workers: int, local_world_size: int = 1, env: dict[str, str] | None = None,
                gflops_per_clip: float | None = None) -> int:
    """Intra-op threads for a CPU model: OMP_NUM_THREADS when set (torchrun sets 1), else this process's
    share of the cores, less one core left to the decode workers when there are any and the models
    are light (``gflops_per_clip``, all models together, below HEAVY_GFLOPS; unknown counts as light).

    OpenMP barriers stall whenever another process takes a core from one of their threads, so a
    light model runs faster with a core fewer next to busy decoders. Heavy models are the other
    case: they spend little of the time decoding, and a core left to the decoders idles (figures:
    BENCHMARKS.md "CPU threads").
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    share = max(1, cores() // max(local_world_size, 1))
    heavy = gflops_per_clip is not None and gflops_per_clip >= HEAVY_GFLOPS
    return max(1, share - 1) if workers > 0 and not heavy else share


_warned: set[str] = set()
received_signals: list[str] = []  # SIGINT / SIGTERM this process has handled (the CLI's exit code follows the first)


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning the first time this process says it (a command that extracts
    twice, like the demo, warns once)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)
