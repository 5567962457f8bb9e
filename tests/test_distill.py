"""Distillation (Fewer Frames: a see-it-all teacher, a see-little student) and --train-clips jitter."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from faster.aggregate.data import jitter_positions
from faster.aggregate.fit import FitConfig, distillation_loss, fit
from faster.aggregate.synthetic import write_synthetic

COMMON = dict(num_clips=8, signal="static", num_classes=4, amplitude=1.0, noise=(0.5, 4.0), shard_size=512)


def _cfg(feats, out, **kw):
    base = dict(feats=[str(f) for f in feats], out=str(out), agg="gru", expensive="exp", cheap="chp",
                pattern="all-c", epochs=20, batch_size=32, lr=3e-3, dropout=0.0, workers=0, threads=2,
                progress=False)
    return FitConfig(**{**base, **kw})


# -- the loss terms, by hand ----------------------------------------------------------------------

def test_kl_term_is_the_batch_mean_of_the_softened_kl_times_t_squared():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])  # student logits
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # teacher logits
    T = 2.0
    kl = 0.0
    for b in range(2):  # KL(p || q) = sum_k p_k log(p_k / q_k), p the teacher's softened softmax
        p = [math.exp(v / T) for v in t[b].tolist()]
        q = [math.exp(v / T) for v in s[b].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    kl /= 2  # a batch mean, not a sum over the batch
    unlabelled = torch.tensor([-1, -1])
    rep = torch.zeros(2, 3)
    loss, terms = distillation_loss(s, unlabelled, t, rep, rep, distill_weight=0.5, rep_weight=7.0, temperature=T)
    assert terms["ce"] == 0.0 and terms["rep"] == 0.0  # unlabelled videos: only the distillation terms
    assert terms["kl"] == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * T * T * kl, rel=1e-6)


def test_representation_term_is_one_mean_squared_error_and_ce_only_counts_labelled_videos():
    rep = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]])
    teacher_rep = torch.tensor([[0.0, 2.0], [2.0, 1.0], [3.0, 0.0]])
    # squared errors 1, 0, 4, 4, 0, 9: mean over the 3 videos and 2 dims = 18 / 6 = 3
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, -1, 1])
    loss, terms = distillation_loss(logits, labels, logits, rep, teacher_rep, distill_weight=1.0,
                                    rep_weight=0.25, temperature=3.0)
    ce = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2  # videos 0 and 2 only
    assert terms["rep"] == pytest.approx(3.0) and terms["kl"] == pytest.approx(0.0, abs=1e-7)
    assert terms["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(loss) == pytest.approx(ce + 0.25 * 3.0, rel=1e-6)


# -- teaching through unlabelled videos -----------------------------------------------------------

def _sets(root, num_labelled, num_unlabelled, num_val, epochs):
    teach = write_synthetic(root / "teach", num_videos=num_labelled, seed=1, id_prefix="t", **COMMON)
    student = write_synthetic(root / "student", num_videos=num_labelled + num_unlabelled, unlabelled=num_unlabelled,
                              seed=2, id_prefix="s", **COMMON)
    val = write_synthetic(root / "val", num_videos=num_val, seed=3, id_prefix="v", **COMMON)
    teacher = root / "teacher"
    fit(_cfg([teach], teacher, val=[str(val)], pattern="all-e", epochs=epochs))
    return {"student": student, "val": val, "teacher": teacher, "teach": teach}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The quick tests' small version: 40 labelled, 60 unlabelled, 40 validation videos, a 2-epoch teacher."""
    return _sets(tmp_path_factory.mktemp("distill-small"), 40, 60, 40, 2)


@pytest.fixture(scope="module")
def big_sets(tmp_path_factory):
    """A teacher set (100 labelled), a student set (100 labelled + 2,000 unlabelled), a validation set
    (400); 4 classes, a class direction in every clip: clean in exp (noise 0.5), buried in chp (4.0)."""
    return _sets(tmp_path_factory.mktemp("distill"), 100, 2000, 400, 20)


@pytest.mark.slow
def test_a_teacher_teaches_a_cheap_student_through_unlabelled_videos(big_sets, tmp_path):
    """Measured: teacher (all-e, 100 labelled) 0.96; the cheap-only student alone (the 100 labelled)
    0.36, taught through the 2,000 unlabelled videos 0.57 (T = 2, A = 1, B = 0.01); about 10 s."""
    sets = big_sets
    teacher = json.loads((sets["teacher"] / "result.json").read_text())
    assert teacher["top1"] >= 0.8, teacher
    plain = fit(_cfg([sets["student"]], tmp_path / "plain", val=[str(sets["val"])]))
    taught = fit(_cfg([sets["student"]], tmp_path / "taught", val=[str(sets["val"])], teacher=str(sets["teacher"])))
    assert plain["num_train"] == 100 and taught["num_train"] == 2100 and taught["num_unlabelled_train"] == 2000
    assert taught["top1"] >= plain["top1"] + 0.10, (plain["top1"], taught["top1"])
    # the student's cost is its own: 8 cheap clips + its aggregator, nothing of the teacher's
    assert taught["gflops_per_video"] == pytest.approx(plain["gflops_per_video"])
    assert taught["num_expensive"] == 0


def test_the_run_records_its_teacher_and_the_weights(sets, tmp_path):
    sha = hashlib.sha256((sets["teacher"] / "checkpoint.pt").read_bytes()).hexdigest()
    out = tmp_path / "taught"
    result = fit(_cfg([sets["student"]], out, val=[str(sets["val"])], teacher=str(sets["teacher"]), epochs=1,
                      agg="avg", distill_weight=0.5, rep_weight=0.0, temperature=3.0))
    config = json.loads((out / "config.json").read_text())
    for record in (config, result):
        assert record["teacher"] == {"path": str(sets["teacher"]), "sha256": sha}
        assert (record["distill_weight"], record["rep_weight"], record["temperature"]) == (0.5, 0.0, 3.0)
    from faster.aggregate.run import Run

    r = Run.load(out)
    assert r.config["teacher"]["sha256"] == sha
    assert not any(k.startswith("teacher") or "proj" in k for k in r.state_dict)  # the projection is not saved
    # avg's representation (4 class scores) differs from the gru teacher's (16): projected, and it trains
    assert r.agg == "avg" and r.model()({"cheap": torch.zeros(1, 8, 1, 2, 2, 16)}, [False] * 8).shape == (1, 4)


def test_a_teacher_teaches_a_student_trained_on_per_video_draws(sets, tmp_path):
    # the student's per-video positions never alias the teacher's fixed ones: the teacher reads its own
    result = fit(_cfg([sets["student"]], tmp_path / "j", val=[str(sets["val"])], teacher=str(sets["teacher"]),
                      epochs=1, agg="avg", num_clips=4, train_clips="jitter"))
    row = json.loads((tmp_path / "j" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["train_clips"] == "jitter" and row["train_positions_distinct"] > 1 and math.isfinite(row["train_loss"])


def test_teachers_it_cannot_feed_are_refused(sets, tmp_path):
    other = write_synthetic(tmp_path / "other", num_videos=40, models={"chp": (1, 2, 2, 16)}, seed=4,
                            **{k: v for k, v in COMMON.items()})
    with pytest.raises(Exception, match="lack the teacher's model"):
        fit(_cfg([other], tmp_path / "x", teacher=str(sets["teacher"])))
    fewer = write_synthetic(tmp_path / "fewer", num_videos=40, seed=4, **{**COMMON, "num_clips": 4})
    with pytest.raises(Exception, match="--teacher .*extraction"):
        fit(_cfg([fewer], tmp_path / "y", teacher=str(sets["teacher"])))
    with pytest.raises(ValueError, match="adaptive is not supported"):
        fit(_cfg([sets["student"]], tmp_path / "z", teacher=str(sets["teacher"]), pattern="adaptive", budget=0.5))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_fit_with_a_teacher(sets, tmp_path):
    from faster.cli import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", str(sets["student"]), "-o", str(out), "--agg", "gru", "--expensive", "exp",
                                   "--cheap", "chp", "--pattern", "all-c", "--num-clips", "2", "--epochs", "1",
                                   "--val", str(sets["val"]), "--teacher", str(sets["teacher"]),
                                   "--temperature", "4", "--rep-weight", "0.1"])
    assert res.exit_code == 0, res.output
    assert f"taught by {sets['teacher']}, 60 unlabelled" in res.output
    result = json.loads((out / "result.json").read_text())
    assert (result["num_clips"], result["temperature"], result["rep_weight"]) == (2, 4.0, 0.1)


# -- training clips -------------------------------------------------------------------------------

def test_jitter_positions_are_one_per_segment_in_order():
    rng = np.random.default_rng(0)
    draws = [jitter_positions(32, 4, rng) for _ in range(50)]
    for d in draws:
        assert [p // 8 for p in d] == [0, 1, 2, 3]  # segment k of 8 clips each, order kept
    assert len({tuple(d) for d in draws}) > 40
    assert jitter_positions(5, 5, rng) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="between 1 and the 7"):
        jitter_positions(7, 8, rng)
    table = jitter_positions(32, 4, rng, videos=200)  # one independent draw per video
    assert table.shape == (200, 4) and ((table // 8) == [0, 1, 2, 3]).all()
    assert len(np.unique(table, axis=0)) > 190


@pytest.fixture(scope="module")
def order_set(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("jitter"), num_videos=60, num_clips=8, signal="static",
                           num_classes=2, seed=0)


def test_per_video_positions_read_each_videos_own_clips(order_set):
    from faster.store.reader import FeatureSet, ThreadedLoader

    fs = FeatureSet([order_set])
    model = sorted(fs.models)[0]
    idx = np.arange(5, 25)
    table = jitter_positions(8, 3, np.random.default_rng(3), videos=len(idx))
    ds = fs.dataset({"x": (model, table)}, idx)
    for i, row in enumerate(table):
        alone = fs.dataset({"x": (model, row.tolist())}, idx[i:i + 1])
        assert np.array_equal(ds[i]["x"].numpy(), alone[0]["x"].numpy())
        alone.close()
    read = [b["x"].numpy().copy() for b in ThreadedLoader(ds, 8)]  # the in-process loader reads the same rows
    assert np.array_equal(np.concatenate(read), np.stack([ds[i]["x"] for i in range(20)]))
    ds.close()
    with pytest.raises(ValueError, match="one ascending row per video"):
        fs.dataset({"x": (model, table[:3])}, idx)
    with pytest.raises(ValueError, match=r"clip positions \[8, 9\] outside the 8 extracted"):
        fs.dataset({"x": (model, table + 2)}, idx)


def _jitter_fit(feats, out, seed):
    fit(_cfg([feats], out, agg="avg", num_clips=3, pattern="first", train_clips="jitter", epochs=4, seed=seed))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_clips_jitter_draws_ordered_positions_per_video_and_epoch_deterministic_in_the_seed(order_set, tmp_path):
    rows = _jitter_fit(order_set, tmp_path / "a", 0)
    firsts = [r["train_positions_first"] for r in rows]
    assert len({tuple(d) for d in firsts}) > 1  # the first video's draw changes across epochs
    for d in firsts:  # 3 segments of the 8 clips: [0, 2), [2, 5), [5, 8)
        assert 0 <= d[0] < 2 <= d[1] < 5 <= d[2] < 8
    assert all(r["train_positions_distinct"] > 8 for r in rows)  # ~48 videos, 18 possible draws: per video
    keys = ("train_positions_first", "train_positions_distinct", "train_loss")
    again = _jitter_fit(order_set, tmp_path / "b", 0)
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]  # same seed, same draws
    assert [r["train_positions_first"] for r in _jitter_fit(order_set, tmp_path / "c", 1)] != firsts
    from faster.aggregate.run import Run

    r = Run.load(tmp_path / "a")  # evaluation and predict: the uniform positions, always
    assert r.positions == [0, 4, 7] and r.config["train_clips"] == "jitter"
    from faster.aggregate.evaluation import evaluate

    val = {row["id"]: row["probs"] for row in map(json.loads, (tmp_path / "a" / "val_predictions.jsonl").open())}
    evaluate(tmp_path / "a", [str(order_set)], str(tmp_path / "p.jsonl"), progress=False)
    again = {row["id"]: row["probs"] for row in map(json.loads, (tmp_path / "p.jsonl").open())}
    assert val and all(np.allclose(again[i], p, atol=1e-6) for i, p in val.items())  # validation used uniform too


def test_uniform_training_clips_record_no_draws(order_set, tmp_path):
    result = fit(_cfg([order_set], tmp_path / "u", agg="avg", num_clips=3, pattern="first", epochs=1))
    rows = [json.loads(line) for line in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert "train_positions_first" not in rows[0] and result["train_clips"] == "uniform"
