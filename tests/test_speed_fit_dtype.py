"""faster fit --dtype (issue [22]): bf16 autocast in the training forward learns what fp32 learns
on the planted tasks (the temporal order of tests/test_fit.py), and the choice is recorded."""
import json

import pytest
import test_fit
import torch
from test_fit import _cfg  # fit's test settings

from faster.aggregate.fit import fit
from faster.errors import BadValue

pytestmark = pytest.mark.usefixtures("torch_one_thread")
order_set = test_fit.order_set  # the planted temporal order (its module-scoped fixture)


@pytest.mark.parametrize("agg", ["fastgru", "concat"])
def test_bf16_fit_learns_the_planted_order_as_fp32_does(order_set, tmp_path, agg):
    """Class = whether pulse a comes before pulse b (tests/test_fit.py): fp32 and bf16 both reach
    >= 0.85 top-1, within 0.1 of each other."""
    top1 = {dtype: fit(_cfg(order_set, tmp_path / dtype, agg, epochs=8, batch_size=32, dtype=dtype))["top1"]
            for dtype in ("fp32", "bf16")}
    assert min(top1.values()) >= 0.85, top1
    assert abs(top1["bf16"] - top1["fp32"]) <= 0.1, top1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bf16"


def test_dtype_resolves_to_the_engine_precision():
    cfg = _cfg("x", "y", "fastgru", dtype="bf16")  # the settings need no data
    assert cfg.settings(torch.device("cpu")).precision == "bf16"
    assert _cfg("x", "y", "fastgru", dtype="fp32").settings().precision == "fp32"
    with pytest.raises(BadValue, match="'fp16'"):
        _cfg("x", "y", "fastgru", dtype="fp16").validate()


def test_cli_fit_takes_dtype_and_records_it(order_set, tmp_path):
    from click.testing import CliRunner

    from faster.cli import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", order_set, "-o", str(out), "--agg", "gru", "--expensive", "exp", "--cheap",
                                   "chp", "--pattern", "1:1", "--epochs", "1", "--threads", "1", "--dtype", "fp32",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "fp32"
    res = CliRunner().invoke(cli, ["fit", order_set, "-o", str(tmp_path / "x"), "--agg", "gru", "--expensive", "exp",
                                   "--cheap", "chp", "--pattern", "1:1", "--dtype", "fp16"])
    assert res.exit_code == 2 and "fp16" in res.output


def test_evaluate_in_bf16_agrees_with_fp32_and_fp32_is_the_default(order_set, tmp_path):
    """faster evaluate --dtype bf16: the aggregator's forward under bf16 autocast; the predictions
    match fp32's (the default, as predict runs it) to bf16's rounding."""
    from click.testing import CliRunner

    from faster.aggregate.evaluation import evaluate
    from faster.cli import cli

    fit(_cfg(order_set, tmp_path / "run", "fastgru", epochs=4, batch_size=32))
    ref = evaluate(tmp_path / "run", [order_set], str(tmp_path / "fp32.jsonl"), progress=False)
    low = evaluate(tmp_path / "run", [order_set], str(tmp_path / "bf16.jsonl"), progress=False, dtype="bf16")
    assert (ref["precision"], low["precision"]) == ("fp32", "bf16")
    p32, p16 = ([json.loads(s)["probs"] for s in (tmp_path / f"{d}.jsonl").read_text().splitlines()]
                for d in ("fp32", "bf16"))
    diff = max(abs(a - b) for r32, r16 in zip(p32, p16) for a, b in zip(r32, r16))
    assert 0 < diff < 0.05, diff  # bf16 computed (not fp32 again), and close
    assert abs(low["top1"] - ref["top1"]) <= 0.02
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "run"), order_set, "-o", str(tmp_path / "cli.jsonl"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "fp32.jsonl").read_text()  # fp32 by default
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "run"), order_set, "--dtype", "fp16"])
    assert res.exit_code == 2 and "fp16" in res.output
