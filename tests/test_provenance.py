"""[24] item 2: features of other backbone weights never mix silently. Training sets joined from
several directories, a validation set, the features a run is evaluated on and a teacher's features
must all come from the same weights (each shard's ``weights`` provenance); otherwise one line naming
both provenances, exit status 1, nothing written."""
import pytest
from click.testing import CliRunner

from helpers import small_fit as _cfg

from faster.aggregate.evaluation import evaluate
from faster.aggregate.fit import fit
from faster.aggregate.synthetic import write_synthetic
from faster.cli import cli
from faster.errors import Incompatible

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """16 videos' features from two extractions, recorded as of weights synthetic:seed=0 and synthetic:seed=1."""
    base = tmp_path_factory.mktemp("provenance")
    a = write_synthetic(base / "seed0", num_videos=16, num_clips=4, signal="static", weights="synthetic:seed=0")
    b = write_synthetic(base / "seed1", num_videos=16, num_clips=4, signal="static", seed=1, weights="synthetic:seed=1")
    run = base / "run"
    fit(_cfg([a], run))
    return {"a": str(a), "b": str(b), "run": run, "base": base}


def test_joined_training_sets_of_other_weights_are_refused(sets, tmp_path):
    with pytest.raises(Incompatible, match="synthetic:seed=1.*synthetic:seed=0|synthetic:seed=0.*synthetic:seed=1"):
        fit(_cfg([sets["a"], sets["b"]], tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_validation_set_of_other_weights_is_refused(sets, tmp_path):
    with pytest.raises(Incompatible, match="validation set.*extracted with weights synthetic:seed=1, not "
                                           "synthetic:seed=0 as in the training set"):
        fit(_cfg([sets["a"]], tmp_path / "r", val=[sets["b"]]))
    assert not (tmp_path / "r").exists()


def test_evaluate_on_features_of_other_weights_is_refused(sets, tmp_path):
    with pytest.raises(Incompatible, match="weights synthetic:seed=1, not synthetic:seed=0 as in the run"):
        evaluate(sets["run"], [sets["b"]], str(tmp_path / "e.jsonl"), workers=0, progress=False)
    assert not (tmp_path / "e.jsonl").exists()
    result = CliRunner().invoke(cli, ["evaluate", str(sets["run"]), sets["b"], "-o", str(tmp_path / "e.jsonl")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "synthetic:seed=1" in result.output and "synthetic:seed=0" in result.output


def test_a_teacher_fitted_on_other_weights_is_refused(sets, tmp_path):
    with pytest.raises(Incompatible, match="--teacher.*weights synthetic:seed=1, not synthetic:seed=0"):
        fit(_cfg([sets["b"]], tmp_path / "student", teacher=str(sets["run"])))  # 1:1 without --num-clips
    assert not (tmp_path / "student").exists()


def test_the_same_weights_still_join(sets, tmp_path):
    again = write_synthetic(tmp_path / "again", num_videos=16, num_clips=4, signal="static", seed=2,
                            weights="synthetic:seed=0")  # other videos, the same weights
    r = fit(_cfg([sets["a"]], tmp_path / "r", val=[str(again)]))
    assert 0 <= r["top1"] <= 1
