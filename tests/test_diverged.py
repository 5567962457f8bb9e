"""[24] item 7: a diverged fit stops with an error naming the epoch and step (the last good training
state kept), and a run with non-finite weights is refused by evaluate instead of scoring NaN."""
import pytest
import torch
from click.testing import CliRunner

from helpers import small_fit

from faster.aggregate.evaluation import evaluate
from faster.aggregate.fit import fit
from faster.cli import cli
from faster.errors import BadFile, Diverged

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _cfg(feats, out, **kw):
    return small_fit(feats, out, **{"agg": "fastgru", "epochs": 2, "batch_size": 4, **kw})


def test_a_non_finite_loss_stops_the_fit_naming_epoch_and_step(static_feats, tmp_path):
    with pytest.raises(Diverged, match=r"loss nan at epoch 1, step \d+ .*no epoch had finished.*lower --lr"):
        fit(_cfg(static_feats, tmp_path / "run", lr=1e308))
    assert not (tmp_path / "run" / "result.json").exists()
    result = CliRunner().invoke(cli, ["fit", static_feats, "-o", str(tmp_path / "cli"), "--agg", "fastgru", "--expensive",
                                      "exp", "--cheap", "chp", "--pattern", "1:1", "--epochs", "2", "--lr", "1e308",
                                      "--workers", "0"])
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(error) == 1 and "Traceback" not in result.output, result.output
    assert "training diverged: loss" in error[0] and "lower --lr" in error[0]


def test_a_run_with_non_finite_weights_is_refused(static_feats, tmp_path):
    run = tmp_path / "run"
    fit(_cfg(static_feats, run, epochs=1))
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    key = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][key] = torch.full_like(ck["state_dict"][key], float("nan"))
    torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(BadFile, match=f"not finite \\({key}.*diverged"):
        evaluate(run, [static_feats], str(tmp_path / "e.jsonl"), workers=0, progress=False)
    assert not (tmp_path / "e.jsonl").exists()
