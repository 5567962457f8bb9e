"""[24] item 16: progress that suits a Slurm log. Off a terminal no carriage-return updates: a plain
line at most every N seconds and one at the end, with the count, rate and ETA; --no-progress: none."""
import io
import time

from click.testing import CliRunner

from faster.aggregate.synthetic import write_synthetic
from faster.cli import cli
from faster.progress import Progress, track


def test_off_a_terminal_lines_come_at_most_every_n_seconds_and_at_the_end():
    out = io.StringIO()
    with Progress(1000, "extract", unit="video", every=3600, stream=out) as p:
        for _ in range(1000):
            p.update(1, loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert "extract: 1000/1000 videos (100%)" in lines[0] and "videos/s" in lines[0] and "done in" in lines[0]
    assert "loss 0.5000" in lines[0]

    out = io.StringIO()
    p = Progress(4, "epoch 1/3", unit="step", every=0.0, stream=out)
    for _ in range(2):
        time.sleep(0.01)
        p.update(1)
    p.close()
    p.close()  # once
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "epoch 1/3: 1/4 steps (25%)" in lines[0] and "ETA" in lines[0]
    assert "2/4 steps" in lines[1] and "done in" in lines[2]


def test_disabled_or_empty_writes_nothing():
    out = io.StringIO()
    with Progress(10, "x", enabled=False, every=0.0, stream=out) as p:
        p.update(5)
    with Progress(0, "y", every=0.0, stream=out) as p:
        pass
    assert out.getvalue() == ""
    assert list(track(range(3), "z", enabled=False)) == [0, 1, 2]


def test_fit_in_a_log_file_writes_lines_not_a_bar(tmp_path):
    feats = write_synthetic(tmp_path / "f", num_videos=16, num_clips=4, signal="static")
    args = ["fit", str(feats), "--agg", "avg", "--expensive", "exp", "--cheap", "chp", "--pattern", "1:1",
            "--epochs", "2", "--workers", "0"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "epoch 2/2:" in result.output and "steps/s" in result.output and "done in" in result.output
    quiet = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "quiet"), "--no-progress"])
    assert quiet.exit_code == 0 and "steps/s" not in quiet.output and "\r" not in quiet.output
