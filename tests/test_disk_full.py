"""[24] item 10: a disk that fills up during extract is one line naming the path and the space left
(no h5py traceback, no crash), the shard being written is discarded, and the same command resumes once
there is space. Needs a small tmpfs: mounted where the test runs as root, skipped elsewhere."""
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from faster.cli import _disk_full, cli


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount)")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_the_message_names_the_file_and_the_space_left(tmp_path):
    err = RuntimeError(f"Unable to flush file (file write failed: filename = '{tmp_path}/.shard-1.h5.tmp', "
                       "errno = 28, error message = 'No space left on device')")
    line = _disk_full(err)
    assert f"{tmp_path}/.shard-1.h5.tmp" in line and "MiB free there" in line and "\n" not in line
    assert _disk_full(OSError(28, "No space left on device", str(tmp_path / "x"))).startswith("no space left")
    assert _disk_full(RuntimeError("something else")) is None


def test_extract_on_a_full_disk_is_one_line_discards_the_open_shard_and_resumes(small_disk, tmp_path, monkeypatch):
    from faster import synthetic
    from faster.extract import pipeline

    videos = tmp_path / "videos"
    synthetic.make_motion_dataset(videos, classes=("left", "right"), per_class=6, frames=24, size=64)
    # the planning check would refuse (it keeps 64 MiB of headroom): pretend there is room, as when
    # another job fills the disk after extract started
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 0, 2**40))
    out = small_disk / "feats"
    args = ["extract", str(videos), "-o", str(out), "--model", "r2plus1d50_tiny", "--model", "r2d26_tiny",
            "--size", "64", "--num-clips", "8", "--shard-size", "2", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and str(out) in errors[0]
    assert "Traceback" not in result.output
    assert not list(out.glob(".*.tmp")), list(out.iterdir())  # the open shard was discarded
    kept = sorted(p.name for p in out.glob("shard-*.h5"))
    assert kept  # the shards written before the disk filled up stay
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert f"skipped {2 * len(kept)} (done before)" in again.output


def test_fit_on_a_full_disk_is_one_line(small_disk, tmp_path):
    """torch.save's own error ("file write failed") on a full disk is named as one: a line naming the file."""
    from faster.aggregate.synthetic import write_synthetic

    feats = write_synthetic(tmp_path / "f", num_videos=16, num_clips=4, signal="static",
                            models={"exp": (1, 7, 7, 512), "chp": (1, 7, 7, 512)})
    result = CliRunner().invoke(cli, ["fit", str(feats), "-o", str(small_disk / "run"), "--agg", "fastgru",
                                      "--expensive", "exp", "--cheap", "chp", "--pattern", "1:1", "--epochs", "1", "--workers", "0",
                                      "--no-progress"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and str(small_disk / "run") in errors[0]
