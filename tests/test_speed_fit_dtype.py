"""faster fit --dtype (issue [22]): bf16 autocast in the training forward learns what fp32 learns
on the planted tasks (the temporal order of tests/test_fit.py), and the choice is recorded."""
import json

import pytest
import torch

from faster.aggregate.fit import FitConfig, fit
from faster.aggregate.synthetic import write_synthetic
from faster.errors import BadValue

MODELS = {"exp": (1, 2, 2, 16), "chp": (1, 2, 2, 16)}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def order_set(tmp_path_factory):
    return str(write_synthetic(tmp_path_factory.mktemp("order"), num_videos=320, num_clips=8, signal="order",
                               amplitude=3.0, noise=(0.5, 0.5), models=MODELS, seed=0))


def _cfg(feats, out, agg, **kw):
    base = dict(feats=[feats], out=str(out), agg=agg, expensive="exp", cheap="chp", pattern="1:1", epochs=8,
                batch_size=32, lr=1e-2, dropout=0.0, workers=0, threads=1, progress=False)
    return FitConfig(**{**base, **kw})


@pytest.mark.parametrize("agg", ["fastgru", "concat"])
def test_bf16_fit_learns_the_planted_order_as_fp32_does(order_set, tmp_path, agg):
    """Class = whether pulse a comes before pulse b (tests/test_fit.py): fp32 and bf16 both reach
    >= 0.85 top-1, within 0.1 of each other."""
    top1 = {dtype: fit(_cfg(order_set, tmp_path / dtype, agg, dtype=dtype))["top1"] for dtype in ("fp32", "bf16")}
    assert min(top1.values()) >= 0.85, top1
    assert abs(top1["bf16"] - top1["fp32"]) <= 0.1, top1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bf16"


def test_dtype_resolves_to_the_engine_precision():
    cfg = _cfg("x", "y", "fastgru", dtype="bf16")
    assert cfg.settings(torch.device("cpu")).precision == "bf16"
    assert _cfg("x", "y", "fastgru", dtype="fp32").settings().precision == "fp32"
    with pytest.raises(BadValue, match="'fp16'"):
        _cfg("x", "y", "fastgru", dtype="fp16").validate()
