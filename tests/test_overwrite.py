"""[24] item 6: an interrupted `fit --overwrite` never destroys the run it replaces. Before the new
fit has a resumable state the old run is put back as it was; after, it stays intact in
OUT/.previous (evaluate says so) until the new fit completes (--resume), which removes it."""
import pytest
from click.testing import CliRunner

from helpers import small_fit as _cfg

from faster import engine
from faster.aggregate.evaluation import evaluate
from faster.aggregate.fit import fit
from faster.cli import cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _interrupt_at(monkeypatch, epoch):
    real, calls = engine.Engine.train_epoch, []

    def train_epoch(*args, **kw):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine.Engine, "train_epoch", train_epoch)


def test_an_overwrite_interrupted_before_its_first_epoch_puts_the_old_run_back(static_feats, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(_cfg(static_feats, run))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(static_feats, run, agg="fastgru", overwrite=True, epochs=2))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # as it was, nothing aside
    assert evaluate(run, [static_feats], str(tmp_path / "e.jsonl"), workers=0, progress=False)["agg"] == "avg"


def test_an_overwrite_interrupted_later_keeps_the_old_run_until_the_new_one_completes(static_feats, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(_cfg(static_feats, run))
    old = (run / "checkpoint.pt").read_bytes()
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(static_feats, run, agg="gru", overwrite=True, epochs=3))
    kept = run / ".previous"
    assert (kept / "result.json").is_file() and (kept / "checkpoint.pt").read_bytes() == old
    assert (run / "last.pt").is_file() and not (run / "result.json").exists()
    res = CliRunner().invoke(cli, ["evaluate", str(run), static_feats])
    assert res.exit_code == 1 and str(kept) in res.output and "--resume" in res.output
    assert evaluate(kept, [static_feats], str(tmp_path / "e.jsonl"), workers=0, progress=False)["agg"] == "avg"
    monkeypatch.undo()
    assert fit(_cfg(static_feats, run, agg="gru", epochs=3, resume=True))["agg"] == "gru"
    assert not kept.exists() and (run / "result.json").is_file()


def test_a_fit_interrupted_before_dtype_existed_still_resumes(static_feats, tmp_path, monkeypatch):
    import json

    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(static_feats, run, epochs=2))
    config = json.loads((run / "config.json").read_text())
    del config["dtype"]  # written before fit --dtype existed
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.undo()
    assert fit(_cfg(static_feats, run, epochs=2, resume=True))["best"]["epoch"] >= 1
