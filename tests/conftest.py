"""Shared pytest fixtures; functions the tests share live in helpers.py (this folder is put on sys.path)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """faster's per-user cache (checksums of shards) in a temporary folder, not in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTER_CACHE_DIR", str(tmp_path_factory.mktemp("faster-cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core box are far faster without OpenMP barriers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def motion_videos(tmp_path_factory):
    """ROOT/<class>/<class>_<i>.mp4: two motion classes (left, right), two 16-frame 32 px videos each."""
    pytest.importorskip("av")
    from faster import synthetic

    root = tmp_path_factory.mktemp("motion")
    synthetic.make_motion_dataset(root, classes=("left", "right"), per_class=2, frames=16, size=32)
    return root


@pytest.fixture
def torch_one_thread():
    """Tiny models: one torch thread is several times faster on a busy 2-core box (restored after)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def static_feats(tmp_path_factory):
    """16 synthetic videos of 4 clips whose class every clip shows (models "exp" and "chp"): read-only."""
    from faster.aggregate.synthetic import write_synthetic

    return str(write_synthetic(tmp_path_factory.mktemp("static16"), num_videos=16, num_clips=4, signal="static"))
