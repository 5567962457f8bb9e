"""Multiply-adds (faster.macs), per-clip GFLOPs against the paper's Tables 2 and 6, and the `faster flops` command."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from faster.cli import cli
from faster.extract.models import clip_gflops


@pytest.mark.parametrize("name, clip_len, paper", [
    ("r2d26", 8, 3.2), ("r2d26", 16, 6.3), ("r2d26", 32, 12.7),  # Table 2 prints 6.0; Table 4 implies 6.3
    ("r2plus1d50", 8, 30.0), ("r2plus1d50", 16, 60.0), ("r2plus1d50", 32, 119.9),
])
def test_table2_gflops_per_clip(name, clip_len, paper):
    assert clip_gflops(name, clip_len, 224) == pytest.approx(paper, rel=0.015)


def test_r3d50_matches_table6():
    # Table 6: all-E average pooling over 8 clips of 32 frames costs 942.7 GFLOPs (R(2+1)D-50: 959.3)
    assert 8 * clip_gflops("r3d50", 32) == pytest.approx(942.7, rel=0.002)
    assert 8 * clip_gflops("r2plus1d50", 32) == pytest.approx(959.3, rel=0.002)


@pytest.mark.parametrize("name, enum", [("r2plus1d_18", "R2Plus1D_18_Weights"), ("r3d_18", "R3D_18_Weights"),
                                        ("mc3_18", "MC3_18_Weights")])
def test_torchvision_models_match_torchvision_published_ops(name, enum):
    """torchvision documents GFLOPs (multiply-adds) per 16-frame 112 px clip; fc excluded here (0.0002)."""
    from torchvision.models import video

    published = getattr(video, enum).KINETICS400_V1.meta["_ops"]
    assert clip_gflops(name, 16, 112) == pytest.approx(published, rel=0.005)


def test_count_macs_counts_multiply_adds_on_meta_tensors():
    import torch

    from faster.macs import count_macs

    with torch.device("meta"):
        linear, conv = torch.nn.Linear(4, 3), torch.nn.Conv3d(2, 5, (1, 3, 3), padding=(0, 1, 1))
        x, clip = torch.empty(2, 4), torch.empty(1, 2, 4, 6, 6)
    assert count_macs(linear, x) == 2 * 4 * 3
    assert count_macs(conv, clip) == 5 * 4 * 6 * 6 * 2 * 3 * 3  # outputs x (in channels x kernel)


def test_build_on_meta_skips_the_init_and_restores_it():
    import torch

    from faster.extract.models import get
    from faster.extract.models.cost import build_on_meta

    fill = torch.nn.init.kaiming_normal_
    net = build_on_meta(get("r2d26_tiny"))
    assert next(net.parameters()).is_meta and torch.nn.init.kaiming_normal_ is fill


def test_clip_gflops_scales_and_is_cached():
    assert clip_gflops("r2plus1d50_tiny", 16, 64) == pytest.approx(2 * clip_gflops("r2plus1d50_tiny", 8, 64))
    hits = clip_gflops.cache_info().hits
    clip_gflops("r2plus1d50_tiny", 16, 64)
    assert clip_gflops.cache_info().hits == hits + 1
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        clip_gflops("nope", 8)


def test_flops_json_composes_the_pattern():
    result = CliRunner().invoke(cli, ["flops", "--pattern", "1:3", "--clip-len", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["num_expensive"], out["num_cheap"], out["num_clips"], out["clip_len"]) == (8, 24, 32, 8)
    assert out["pattern"] == "1:3"
    e, c = out["clip_gflops"]["r2plus1d50"], out["clip_gflops"]["r2d26"]
    assert e == pytest.approx(30.0, rel=0.015) and c == pytest.approx(3.2, rel=0.015)
    assert out["aggregator_gflops"] >= 0
    assert out["video_gflops"] == pytest.approx(8 * e + 24 * c + out["aggregator_gflops"])
    assert out["feature_shape"] == [2048, 1, 7, 7]


def test_flops_text_output():
    result = CliRunner().invoke(cli, ["flops", "--expensive", "r3d50", "--clip-len", "32", "--pattern", "first"])
    assert result.exit_code == 0, result.output
    assert "8 clips of 32 frames at 224 px, pattern first: 1 expensive, 7 cheap" in result.output
    assert "117.84 GFLOPs/clip" in result.output and "12.67 GFLOPs/clip" in result.output


def test_flops_takes_a_clip_length_per_model():
    # R(2+1)D-50 at 16 frames beside R2D-26 at 8 (as extract's --clip-len NAME=L): each model's own figures
    result = CliRunner().invoke(cli, ["flops", "--clip-len", "8", "--clip-len", "r2plus1d50=16", "--size", "112",
                                      "--pattern", "1:1", "--num-clips", "4", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["clip_lens"] == {"r2plus1d50": 16, "r2d26": 8}
    assert out["clip_gflops"]["r2plus1d50"] == pytest.approx(clip_gflops("r2plus1d50", 16, 112))
    assert out["clip_gflops"]["r2d26"] == pytest.approx(clip_gflops("r2d26", 8, 112))
    text = CliRunner().invoke(cli, ["flops", "--clip-len", "r2plus1d50=16", "--size", "112", "--num-clips", "4"])
    assert "4 clips (r2plus1d50: 16 frames, r2d26: 8 frames) at 112 px" in text.output
    bad = CliRunner().invoke(cli, ["flops", "--clip-len", "nosuch=16"])
    assert bad.exit_code == 2 and "'nosuch' is neither --expensive" in bad.output


@pytest.mark.parametrize("args, named", [
    (["--pattern", "1:5"], "'1:5'"),          # 6 does not divide 32 clips
    (["--pattern", "every-other"], "'every-other'"),
    (["--expensive", "resnet9000"], "'resnet9000'"),
    (["--cheap", "r2d26", "--clip-len", "4"], "r2d26"),  # R2D-26's 8x7x7 conv1 needs 8 frames
])
def test_flops_bad_values_are_one_line_errors(args, named):
    result = CliRunner().invoke(cli, ["flops", *args])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and named in error[0]
