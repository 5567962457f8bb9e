"""The command line: light `--help`, every command's help, one-line errors."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from faster.cli import cli

COMMANDS = ["extract", "fit", "evaluate", "ablate", "predict", "flops", "verify", "demo", "pack"]
HEAVY = ["torch", "torchvision", "h5py", "decord", "numpy", "av", "matplotlib", "joblib"]


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
