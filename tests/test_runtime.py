"""Where a process runs (faster.runtime): its part of a distributed job, its device, its CPU threads."""
import pytest

from faster.runtime import cpu_threads, placement


def test_placement_combines_torchrun_ranks_and_slurm_array_index():
    p = placement(num_shards=4, shard_index=2, env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (p.part, p.num_parts, p.local_rank) == (2 * 2 + 1, 8, 1)
    assert placement(env={}).part == 0 and placement(env={}).num_parts == 1
    with pytest.raises(ValueError, match="RANK=2"):
        placement(env={"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="shard_index 3"):
        placement(num_shards=3, shard_index=3, env={})
    assert cpu_threads(2, env={"OMP_NUM_THREADS": "3"}) == 3
    assert cpu_threads(0, env={}) >= cpu_threads(2, env={}) >= 1
    # heavy models take every core (decoding is ~1% of the work), light ones leave one to the decoders
    assert cpu_threads(2, env={}, gflops_per_clip=33.1) == cpu_threads(0, env={})
    assert cpu_threads(2, env={}, gflops_per_clip=0.8) == cpu_threads(2, env={})


def test_devices_resolve_and_bad_names_are_refused():
    import torch

    from faster.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_dtype_is_checked_in_one_place():
    import torch

    from faster.errors import BadValue
    from faster.runtime import DTYPES, check_dtype, resolve_dtype

    assert [check_dtype(d) for d in DTYPES] == ["auto", "fp32", "bf16"]
    with pytest.raises(BadValue, match="unknown dtype 'fp16'; expected one of auto, fp32, bf16"):
        check_dtype("fp16")
    with pytest.raises(BadValue, match="unknown dtype 'fp16'"):
        resolve_dtype("fp16", torch.device("cpu"))
    assert resolve_dtype("bf16", torch.device("cpu")) == "bfloat16"
