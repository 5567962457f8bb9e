"""Uniform clip sampling (faster.sampling), as docs/format.md "Clip sampling" defines it."""
import pytest

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
