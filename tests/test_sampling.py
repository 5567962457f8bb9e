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


def test_sampling_is_validated_once_and_names_the_bad_value():
    from faster.errors import BadValue
    from faster.sampling import Sampling

    s = Sampling(clip_len=8, num_clips=4, size=32, frame_stride=2, positions=[3, 0])
    assert s.positions == (3, 0) and s.clips == 2 and s.shape == (2, 8, 32, 32, 3) and s.span == 15
    assert s.starts(100) == [clip_starts(100, 4, 8, 2)[3], clip_starts(100, 4, 8, 2)[0]]
    assert Sampling(clip_len=8, num_clips=4, size=32).shape == (4, 8, 32, 32, 3)
    with pytest.raises(AttributeError):
        s.size = 64  # frozen: one value, handed to the decoders as it is
    for field, value, match in (("clip_len", 0, "clip_len must be >= 1, got 0"),
                                ("num_clips", -1, "num_clips must be >= 1, got -1"),
                                ("size", 2.5, "size must be an integer >= 1, got 2.5"),
                                ("frame_stride", 0, "frame_stride must be >= 1, got 0"),
                                ("positions", [4], r"clip positions \[4\] must be distinct indices in \[0, 4\)"),
                                ("positions", [1, 1], r"clip positions \[1, 1\] must be distinct"),
                                ("positions", [], r"clip positions \[\] must be distinct")):
        with pytest.raises(BadValue, match=match):
            Sampling(**{"clip_len": 8, "num_clips": 4, "size": 32, field: value})
