"""Shared pytest fixtures; functions the tests share live in helpers.py (this folder is put on sys.path)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core box are far faster without OpenMP barriers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
