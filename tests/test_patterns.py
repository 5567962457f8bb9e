"""E:C patterns (faster.aggregate.patterns, docs/format.md "Patterns"): masks, subsets, the sources a
pattern reads, and its cost: every GFLOPs cell of the paper's Table 4 (R(2+1)D-50 expensive, R2D-26
cheap, FAST-GRU) within 1.5%, from `faster flops --json`: #E x E-GFLOPs/clip + #C x C-GFLOPs/clip +
the counted FAST-GRU share."""
import json

import pytest
from click.testing import CliRunner

from faster.aggregate import patterns
from faster.cli import cli


def test_pattern_positions():
    assert patterns.expensive_mask("first", 4) == [True, False, False, False]
    assert patterns.expensive_mask("all-c", 3) == [False] * 3
    assert patterns.expensive_mask("1:0", 3) == patterns.expensive_mask("all-e", 3) == [True] * 3
    assert patterns.expensive_mask("1:1", 4) == [True, False, True, False]
    assert patterns.counts("1:3", 16) == (4, 12)  # Table 4's example
    assert patterns.counts("1:31", 32) == (1, 31)


@pytest.mark.parametrize("pattern,n", [("1:2", 8), ("1:7", 4), ("1:15", 8)])
def test_pattern_needs_divisible_clip_count(pattern, n):
    assert not patterns.is_valid(pattern, n)
    with pytest.raises(ValueError, match=repr(pattern)):
        patterns.expensive_mask(pattern, n)


@pytest.mark.parametrize("bad", ["2:1", "1:x", "all", "", "1:-1"])
def test_unknown_pattern_names_the_value(bad):
    with pytest.raises(ValueError, match="unknown pattern"):
        patterns.check(bad)


def test_subset_positions():
    assert patterns.subset_positions(32, 4) == [0, 10, 21, 31]  # round(i*31/3), half up
    assert patterns.subset_positions(8, 8) == list(range(8))
    assert patterns.subset_positions(8, 1) == [0]
    with pytest.raises(ValueError, match="--num-clips"):
        patterns.subset_positions(8, 9)


def test_sources_read_each_model_only_at_its_positions():
    positions, mask = [0, 3, 5, 7], [True, False, True, False]
    assert patterns.sources(positions, mask, "e", "c") == {"expensive": ("e", [0, 5]), "cheap": ("c", [3, 7])}
    assert patterns.sources(positions, [True] * 4, "e", "c") == {"expensive": ("e", positions)}
    assert patterns.video_gflops(2, 6, 30.0, 3.0, 1.5) == pytest.approx(2 * 30 + 6 * 3 + 1.5)


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
