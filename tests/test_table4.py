"""Every GFLOPs cell of the paper's Table 4 (R(2+1)D-50 expensive, R2D-26 cheap, FAST-GRU), within 1.5%,
from `faster flops --json`: #E x E-GFLOPs/clip + #C x C-GFLOPs/clip + the counted FAST-GRU share."""
import json

import pytest
from click.testing import CliRunner

from faster.cli import cli

# (clip length, pattern) -> GFLOPs of Table 4; N = 256 / L clips. Empty cells are infeasible patterns.
TABLE4 = {
    (8, "all-e"): 982.4, (16, "all-e"): 980.2, (32, "all-e"): 979.2,
    (8, "1:1"): 553.6, (16, "1:1"): 552.0, (32, "1:1"): 550.4,
    (8, "1:3"): 339.2, (16, "1:3"): 337.6, (32, "1:3"): 336.0,
    (8, "1:7"): 230.4, (16, "1:7"): 230.4, (32, "1:7"): 228.8,
    (8, "1:15"): 176.0, (16, "1:15"): 176.0,
    (8, "1:31"): 150.4,
}


@pytest.mark.parametrize(("clip_len", "pattern"), list(TABLE4))
def test_table4_gflops(clip_len, pattern):
    res = CliRunner().invoke(cli, ["flops", "--clip-len", str(clip_len), "--pattern", pattern, "--agg", "fastgru",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["num_clips"] == 256 // clip_len
    assert out["video_gflops"] == pytest.approx(TABLE4[clip_len, pattern], rel=0.015)
    assert out["aggregator_gflops"] > 0  # the FAST-GRU share is part of every cell


def test_table4_empty_cells_are_refused():
    res = CliRunner().invoke(cli, ["flops", "--clip-len", "32", "--pattern", "1:15", "--json"])
    assert res.exit_code == 2 and "multiple of 16, got 8" in res.output
