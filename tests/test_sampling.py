"""Clip sampling and E:C patterns, as DESIGN.md defines them."""
import pytest

from faster.aggregate import patterns
from faster.sampling import clip_span, clip_starts, frame_indices


def test_starts_follow_the_formula():
    # F=100, L=8, N=4: room = 92, starts = round(i * 92 / 3) = 0, 30.67->31, 61.33->61, 92
    assert clip_starts(100, 4, 8) == [0, 31, 61, 92]
    # the last clip ends exactly on the last frame
    starts = clip_starts(257, 32, 8)
    assert starts[0] == 0 and starts[-1] + 8 == 257


def test_rounding_is_half_up_not_bankers():
    # room = 5, N = 3: 2.5 -> 3 (Python's round would give 2)
    assert clip_starts(9, 3, 4) == [0, 3, 5]


def test_single_clip_is_centred_and_stride_widens_the_span():
    assert clip_starts(100, 1, 8) == [46]
    assert clip_span(8, 2) == 15
    assert clip_starts(100, 2, 8, frame_stride=2) == [0, 85]


def test_short_video_repeats_its_last_frame():
    starts = clip_starts(5, 3, 8)
    assert starts == [0, 0, 0]
    assert frame_indices(starts[:1], 5, 8) == [[0, 1, 2, 3, 4, 4, 4, 4]]


@pytest.mark.parametrize("bad", [(0, 4, 8), (10, 0, 8), (10, 4, 0)])
def test_bad_sampling_arguments(bad):
    with pytest.raises(ValueError):
        clip_starts(*bad)


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
