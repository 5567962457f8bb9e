"""The training engine (faster/engine.py) and fit on it: the learning-rate schedule, rank shares,
exact resume after a SIGKILL, and torchrun with two CPU ranks against one process."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from faster.aggregate.fit import FitConfig, fit
from faster.aggregate.run import Run
from faster.aggregate.synthetic import write_synthetic
from faster.engine import Distributed, Engine, Settings, lr_factor

MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def order_set(tmp_path_factory):
    """Class = the order of two pulses: recurrent aggregators learn it (tests/test_fit.py)."""
    return str(write_synthetic(tmp_path_factory.mktemp("order"), num_videos=192, num_clips=8, signal="order",
                               amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=0))


def _cfg(feats, out, **kw):
    base = dict(feats=[feats], out=str(out), agg="gru", expensive="exp", cheap="chp", pattern="1:1", epochs=4,
                batch_size=16, lr=1e-2, dropout=0.3, workers=0, threads=1, progress=False)
    return FitConfig(**{**base, **kw})


def test_warmup_then_cosine():
    assert [round(lr_factor(k, 10, 2), 4) for k in (0, 1)] == [0.5, 1.0]  # linear warmup
    assert lr_factor(2, 10, 2) == pytest.approx(1.0) and lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(5, 10, 0) == pytest.approx(0.5)


def test_rank_shares_are_disjoint_equal_and_cover_the_epoch():
    order = np.arange(7)
    shares = [Distributed(rank, 2).shard(order) for rank in range(2)]
    assert [len(s) for s in shares] == [4, 4]  # padded with the order's head: every rank takes as many steps
    assert set(np.concatenate(shares)) == set(range(7))
    assert list(Distributed().shard(order)) == list(order)
    with pytest.raises(ValueError, match="RANK 2"):
        Distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_rank_zeros_decision_and_refusal_reach_every_rank(monkeypatch):
    # two ranks without a process group: the broadcast hands out what rank 0 put in
    sent = []

    def broadcast(self, obj):
        if self.rank == 0:
            sent.append(obj)
        return sent[-1]

    monkeypatch.setattr(Distributed, "broadcast", broadcast)
    monkeypatch.setattr(Distributed, "stop", lambda self: stopped.append(self.rank))
    looked, stopped = [], []

    def look(answer):
        looked.append(answer)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert [Distributed(r, 2).decide(lambda: look("resume"), (ValueError,)) for r in (0, 1)] == ["resume", "resume"]
    assert looked == ["resume"]  # only rank 0 looked
    for r in (0, 1):
        with pytest.raises(ValueError, match="refused"):
            Distributed(r, 2).decide(lambda: look(ValueError("refused")), (ValueError,))
    assert stopped == [0, 1]  # each left the process group before raising
    with pytest.raises(KeyError):  # not a refusal: raised on rank 0 as it is
        Distributed(0, 2).decide(lambda: look(KeyError("bug")), (ValueError,))


def test_engine_resume_continues_exactly(tmp_path):
    """Two epochs and a resume from epoch 1's state end with the weights of three straight epochs."""
    def train(epochs_run, resume):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        engine = Engine(module, Settings(epochs=3, lr=0.1, optimizer="sgd", nesterov=True, warmup_epochs=1,
                                         clip_grad=1.0), device=torch.device("cpu"), steps_per_epoch=4,
                        state_path=tmp_path / "state.pt", metrics_path=tmp_path / "metrics.jsonl", progress=False)
        first = engine.resume()[0] + 1 if resume else 1
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        y = (x[:, 0] > 0).long()
        for epoch in range(first, epochs_run + 1):
            batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
            stats = engine.train_epoch(epoch, batches, lambda m, b: (
                torch.nn.functional.cross_entropy(m(b[0]), b[1]), 4))
            engine.end_epoch(epoch, {"loss": stats["train_loss"], "steps": stats["steps"]})
        return {k: v.clone() for k, v in module.state_dict().items()}

    straight = train(3, False)
    (tmp_path / "state.pt").unlink()
    (tmp_path / "metrics.jsonl").unlink()
    train(1, False)
    resumed = train(3, True)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["steps"] == 4 for r in rows)


KILL_AFTER_EPOCH = textwrap.dedent("""
    import os, signal, sys
    import torch
    from faster import engine
    from faster.aggregate.fit import FitConfig, fit

    torch.set_num_threads(1)
    real = engine.Engine.end_epoch

    def end_epoch(self, epoch, row, extra=None):
        real(self, epoch, row, extra)
        if epoch == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # right after the epoch's state was written

    engine.Engine.end_epoch = end_epoch
    fit(FitConfig(feats=[sys.argv[1]], out=sys.argv[2], agg="gru", expensive="exp", cheap="chp", pattern="1:1",
                  epochs=4, batch_size=16, lr=1e-2, dropout=0.3, workers=0, threads=1, progress=False,
                  train_clips="jitter"))
""")


@pytest.mark.slow
def test_a_fit_killed_after_an_epoch_resumes_to_the_uninterrupted_result(order_set, tmp_path):
    straight = fit(_cfg(order_set, tmp_path / "straight", train_clips="jitter"))
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH, order_set, str(killed), "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout
    assert (killed / "last.pt").is_file() and not (killed / "result.json").exists()
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2

    with pytest.raises(ValueError, match="--resume"):  # an interrupted fit is not overwritten silently
        fit(_cfg(order_set, killed, train_clips="jitter"))
    with pytest.raises(ValueError, match="interrupted fit ran with other settings.*lr"):
        fit(_cfg(order_set, killed, train_clips="jitter", lr=0.5, resume=True))
    resumed = fit(_cfg(order_set, killed, train_clips="jitter", resume=True))

    a, b = Run.load(tmp_path / "straight"), Run.load(killed)
    for key in a.state_dict:
        torch.testing.assert_close(b.state_dict[key], a.state_dict[key], rtol=0, atol=0)
    assert (killed / "val_predictions.jsonl").read_text() == (tmp_path / "straight" / "val_predictions.jsonl").read_text()
    assert resumed["top1"] == straight["top1"] and resumed["best"] == straight["best"]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and not (killed / "last.pt").exists()
    assert resumed["world_size"] == 1 and resumed["global_batch_size"] == 16


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_match_one_process_at_the_same_global_batch(order_set, tmp_path):
    common = ["--agg", "gru", "--expensive", "exp", "--cheap", "chp", "--pattern", "1:1", "--epochs", "8",
              "--lr", "0.01", "--dropout", "0", "--workers", "0", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = fit(_cfg(order_set, tmp_path / "one", epochs=8, batch_size=32, dropout=0.0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "faster", "fit", order_set, "-o", str(tmp_path / "two"), "--batch-size", "16", *common]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (two["world_size"], two["global_batch_size"]) == (2, 32)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    per_rank = math.ceil(two["num_train"] / 2)  # each rank: half of every epoch
    assert all(r["steps"] == math.ceil(per_rank / 16) for r in rows)
    assert one["top1"] >= 0.85 and abs(two["top1"] - one["top1"]) <= 0.05, (one["top1"], two["top1"])
