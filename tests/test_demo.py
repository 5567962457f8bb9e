"""faster demo --quick: the README's first command, at CI size, end to end (stage 1 included)."""
import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from faster.cli import cli


@pytest.mark.slow
def test_demo_quick_trains_both_backbones_extracts_them_and_prints_the_tables(tmp_path):
    import h5py

    from faster.demo import DemoConfig, run_demo
    from faster.store.files import sha256_file

    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| Model | 4 |" in result.output and "| FAST-GRU |" in result.output and "| Avg. pool |" in result.output
    assert "randomly initialised" not in result.output and "random-init" not in result.output
    assert "## The backbones alone" in result.output
    assert "| r2plus1d50_tiny | E |" in result.output and "| r2d26_tiny | C |" in result.output
    assert f"Plot: {out / 'ablate' / 'accuracy_vs_gflops.png'}" in result.output
    assert (out / "ablate" / "accuracy_vs_gflops.png").stat().st_size > 5000
    with open(out / "ablate" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["agg"], r["pattern"]) for r in rows} == {("avg", "first"), ("avg", "all-e"), ("fastgru", "first"),
                                                         ("fastgru", "all-e")}
    assert all(r["expensive"] == "r2plus1d50_tiny" and r["cheap"] == "r2d26_tiny" for r in rows)
    first = {r["agg"]: float(r["gflops_per_video"]) for r in rows if r["pattern"] == "first"}
    all_e = {r["agg"]: float(r["gflops_per_video"]) for r in rows if r["pattern"] == "all-e"}
    assert all(first[a] < all_e[a] for a in first)  # cheap clips cost less than expensive ones

    # Both backbones were trained (stage 1) and extracted with their trained weights: every shard of
    # both splits records the sha256 of the run's model.pt, not a random init.
    digests = {}
    for name in ("r2plus1d50_tiny", "r2d26_tiny"):
        run = out / "train" / name
        assert (run / "model.pt").is_file() and (run / "result.json").is_file()
        digests[name] = sha256_file(run / "model.pt")
        assert json.loads((run / "config.json").read_text())["flip"] is False  # a flip swaps left and right
    for split in ("train", "val"):
        manifest = json.loads((out / "features" / split / "manifest.json").read_text())
        assert {n: m["weights"] for n, m in manifest["config"]["models"].items()} == digests
        shards = sorted((out / "features" / split).glob("shard-*.h5"))
        assert shards
        for shard in shards:
            with h5py.File(shard) as f:
                assert {n: f[f"features/{n}"].attrs["weights"] for n in digests} == digests

    # Again into the same directory: nothing is retrained, re-extracted or refitted; the summary
    # carries the backbones' own validation accuracies. Other settings there are refused.
    summary = run_demo(DemoConfig(out=str(out), quick=True, progress=False))
    assert summary["trained"] == 0 and summary["reused"] == 4 and summary["random_init"] == []
    assert set(summary["timings"]) == {"videos", "train", "extract", "ablate"}
    for name, b in summary["backbones"].items():
        assert b["trained"] and b["reused"] and b["weights"] == str(out / "train" / name / "model.pt")
        assert 0 <= b["video_top1"] <= 1 and 0 <= b["clip_top1"] <= 1 and b["seconds"] > 0
    assert all(e["extracted"] == 0 for e in summary["extractions"].values())
    refused = CliRunner().invoke(cli, ["demo", "-o", str(out)])
    assert refused.exit_code == 1 and "other settings" in refused.output
    assert json.loads((out / "demo.json").read_text())["size"]["expensive"] == "r2plus1d50_tiny"


class _Stop(Exception):
    """Raised by the stub of the demo's stage-1 training: the test ends there."""


def _stub_training(monkeypatch, stop_at):
    """Replace the demo's backbone training: record each name, return a finished run's result, raise
    _Stop at the ``stop_at``-th backbone. Returns the list of names trained."""
    import faster.demo as demo

    trained = []

    def train(name, *args, **kwargs):
        trained.append(name)
        if len(trained) == stop_at:
            raise _Stop
        return {"weights": "-", "video_top1": 0.5, "clip_top1": 0.5, "seconds": 1.0, "best_epoch": 1, "epochs": 1,
                "reused": False}

    monkeypatch.setattr(demo, "_train_backbone", train)
    return trained


def test_demo_with_given_weights_does_not_train_that_backbone(tmp_path, monkeypatch):
    import faster.demo as demo

    trained = _stub_training(monkeypatch, stop_at=1)
    weights = tmp_path / "e.pt"
    weights.write_bytes(b"read by the extraction, which the stub never reaches")
    with pytest.raises(_Stop):  # the cheap backbone is trained: the stub stops the demo there
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "d"), quick=True, progress=False,
                                      weights={"r2plus1d50_tiny": str(weights)}))
    assert trained == ["r2d26_tiny"]


def test_demo_rejects_weights_for_models_it_does_not_use(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(tmp_path / "d"), "--weights", "r3d50=x.pt"])
    assert result.exit_code == 1 and "r3d50" in result.output
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(tmp_path / "d"), "--weights",
                                      "r2d26_tiny=/nonexistent.pt"])
    assert result.exit_code == 1 and "/nonexistent.pt" in result.output
    assert not (tmp_path / "d").exists()  # refused before any video was written
    assert "64 px" in CliRunner().invoke(cli, ["demo", "--help"]).output


def test_demo_trains_the_backbones_it_is_given_and_rejects_unknown_ones(tmp_path, monkeypatch):
    import faster.demo as demo

    trained = _stub_training(monkeypatch, stop_at=2)
    with pytest.raises(_Stop):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "d"), quick=True, progress=False,
                                      expensive="vared_r2plus1d50_tiny", cheap="r3d50_tiny"))
    assert trained == ["vared_r2plus1d50_tiny", "r3d50_tiny"]
    assert json.loads((tmp_path / "d" / "demo.json").read_text())["size"]["expensive"] == "vared_r2plus1d50_tiny"
    for args, name in ((["--expensive", "nosuch"], "nosuch"), (["--cheap", "r2plus1d50_tiny"], "both"),
                       (["--cheap", "mvit_v2_s"], "16-frame")):
        result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(tmp_path / "e"), *args])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert (name or args[1]) in result.output
    assert not (tmp_path / "e").exists()


def test_plain_motion_videos_differ_only_by_the_square_and_reject_unknown_styles():
    from faster import synthetic

    a = synthetic.motion_frames("left", frames=6, size=64, seed=1, style="plain")
    b = synthetic.motion_frames("up", frames=6, size=64, seed=2, style="plain")
    # The same grey background and white square (side 2/5 of the frame) in every video: colours carry no class.
    assert set(np.unique(a)) == set(np.unique(b)) == {64, 224}
    assert (a[0, :, :, 0] == 224).sum() == (64 * 2 // 5) ** 2
    # The square moves left by 1-2 px per frame in "left" videos.
    assert any(np.array_equal(a[1], np.roll(a[0], -k, axis=1)) for k in (1, 2))
    with pytest.raises(ValueError, match="unknown style 'noisy'"):
        synthetic.motion_frames("left", style="noisy")
    with pytest.raises(ValueError, match="speed"):
        synthetic.motion_frames("left", speed=(2.0, 1.0))


def test_motion_dataset_is_deterministic_and_classes_are_directions():
    from faster import synthetic

    a = synthetic.motion_frames("left", frames=8, size=64, seed=3)
    np.testing.assert_array_equal(a, synthetic.motion_frames("left", frames=8, size=64, seed=3))
    # Frame t+1 is frame t's square shifted k >= 0 pixels to the left (wrapping at the border).
    mask = a.min(axis=-1) >= 180
    shifts = []
    for t in range(len(mask) - 1):
        ks = [k for k in range(5) if np.array_equal(np.roll(mask[t], -k, axis=1), mask[t + 1])]
        assert ks, f"frame {t + 1} is not frame {t} moved left"
        shifts.append(ks[0])
    assert sum(shifts) >= len(shifts)  # 1-2 px per frame at 64 px
    with pytest.raises(ValueError, match="sideways"):
        synthetic.motion_frames("sideways")
