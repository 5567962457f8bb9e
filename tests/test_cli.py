"""The command line: light `--help`, every command's help, one-line errors."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from faster.cli import cli

COMMANDS = ["extract", "fit", "evaluate", "ablate", "predict", "flops", "verify", "demo", "pack"]
HEAVY = ["torch", "torchvision", "h5py", "decord", "numpy", "av", "matplotlib", "joblib", "transformers"]


def test_help_lists_every_command_without_heavy_imports():
    code = ("import sys, json; from faster.cli import cli\n"
            "try:\n    cli(['--help'], prog_name='faster')\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    help_text, last = out.rsplit("\n", 2)[0], out.strip().splitlines()[-1]
    code, heavy = json.loads(last)
    assert code == 0
    assert heavy == [], f"`faster --help` imported {heavy}"
    for command in COMMANDS:
        assert command in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "faster", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "faster" in out.stdout


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "fit"])
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(command, signame, code, motion_videos, tmp_path):
    """Ctrl-C goes to the whole process group (decode workers and the forkserver included); SIGTERM too."""
    import os
    import signal
    import time

    from faster.aggregate.synthetic import write_synthetic

    feats = write_synthetic(tmp_path / "f", num_videos=64, num_clips=4, signal="static") if command == "fit" else None

    def args(out):
        if command == "extract":
            return ["extract", str(motion_videos), "-o", str(out), "--model", "r2plus1d50_tiny", "--size", "32",
                    "--num-clips", "2", "--workers", "2"]
        return ["fit", str(feats), "-o", str(out), "--agg", "fastgru", "--expensive", "exp", "--cheap", "chp",
                "--pattern", "1:1", "--epochs", "50"]

    for k, delay in enumerate((0.5, 2.5)):
        proc = subprocess.Popen([sys.executable, "-m", "faster", *args(tmp_path / f"out{k}")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, getattr(signal, signame))
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        finished = "top-1" in out or "extracted" in out and "stopped by" not in err
        if proc.returncode == 0 or finished:  # done before the signal (or it came during the exit)
            continue
        assert proc.returncode == code, (delay, err[-3000:])
        assert "Traceback" not in err, (delay, err[-3000:])


def test_an_error_while_unwinding_after_a_signal_still_exits_as_the_signal_asked():
    """SIGTERM that lands inside a lazy import (torch._dynamo's, at a fit's first step) can make the
    clean-up fail with another error ("... already registered"): the signal decides the exit, no traceback."""
    code = (
        "import os, signal, time\n"
        "from faster import cli\n"
        "@cli.cli.command('boom')\n"
        "def boom():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(5)\n"
        "    finally:\n"
        "        raise RuntimeError('operator already registered')\n"
        "cli.main(['boom'])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 143 and "Traceback" not in p.stderr and p.stderr.strip().endswith("terminated")
    quiet = code.replace("os.kill(os.getpid(), signal.SIGTERM)", "pass").replace("time.sleep(5)", "pass")
    bug = subprocess.run([sys.executable, "-c", quiet],
                         capture_output=True, text=True, timeout=60)
    assert bug.returncode == 1 and "RuntimeError: operator already registered" in bug.stderr  # a bug keeps its traceback
