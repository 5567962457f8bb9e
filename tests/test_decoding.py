"""Decoding one video's clips (faster.extract.video.decode_clips) and many in worker processes
(faster.extract.decoders): sampled frames, resize and crop, short and broken files, timeouts, recycling."""
import numpy as np
import pytest

from faster import sampling
from faster.extract import video as vid

av = pytest.importorskip("av")
from faster import synthetic  # noqa: E402  (needs av)


@pytest.fixture(scope="module")
def root(motion_videos):
    return motion_videos


def test_resize_size_short_side_is_size_times_8_over_7():
    assert vid.resize_size(256, 340, 224) == (256, 340)  # Kinetics 340x256: already 256 on the short side
    assert vid.resize_size(480, 640, 224) == (256, 341)
    assert vid.resize_size(640, 480, 112) == (171, 128)


def test_decoded_clips_start_where_sampling_says_and_hold_those_frames(root):
    import decord
    import torch

    path = root / "left" / "left_000.mp4"
    d = vid.decode_clips(path, num_clips=3, clip_len=4, size=16, frame_stride=2)
    assert d.num_frames == 16 and not d.short and d.fps == pytest.approx(30.0)
    assert d.clip_start == sampling.clip_starts(16, 3, 4, 2) == [0, 5, 9]  # round(4.5) = 5: half up
    assert d.frames.shape == (3, 4, 16, 16, 3) and d.frames.dtype == np.uint8
    vr = decord.VideoReader(str(path), num_threads=1)
    for i, start in enumerate(d.clip_start):
        want = vid.resize_crop(torch.from_numpy(vr.get_batch([start + 2 * j for j in range(4)]).asnumpy()), 16)
        np.testing.assert_array_equal(d.frames[i], want.numpy())


def test_video_shorter_than_a_clip_repeats_its_last_frame(tmp_path):
    path = synthetic.write_video(tmp_path / "short.mp4", synthetic.motion_frames("right", frames=3, size=32))
    d = vid.decode_clips(path, num_clips=2, clip_len=8, size=16)
    assert d.short and d.num_frames == 3 and d.clip_start == [0, 0]
    for j in range(3, 8):
        np.testing.assert_array_equal(d.frames[0, j], d.frames[0, 2])
    assert not np.array_equal(d.frames[0, 0], d.frames[0, 2])  # the square moved


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "audio-only"])
def test_broken_files_raise_decode_error_at_open(tmp_path, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello\n" * 50)
    elif kind == "truncated":
        good = synthetic.write_video(tmp_path / "good.mp4", synthetic.motion_frames("up", frames=8, size=32))
        path.write_bytes(good.read_bytes()[:500])
    else:
        synthetic.write_audio_only(path)
    with pytest.raises(vid.DecodeError) as info:
        vid.decode_clips(path, num_clips=2, clip_len=4, size=16)
    assert info.value.stage == "open"


def test_normalise_clips_layout_and_values():
    import torch

    clips = torch.full((2, 4, 8, 8, 3), 255, dtype=torch.uint8)
    clips[..., 1] = 0
    x = vid.normalise_clips(clips, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert x.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(x[:, 1], torch.tensor(-1.0))
    assert torch.allclose(x[:, 2], torch.tensor(0.5))


def test_positions_decode_a_subset_of_the_clips_exactly(root):
    path = root / "right" / "right_001.mp4"
    full = vid.decode_clips(path, num_clips=4, clip_len=4, size=32)
    part = vid.decode_clips(path, num_clips=4, clip_len=4, size=32, positions=[3, 0])
    assert part.clip_start == [full.clip_start[3], full.clip_start[0]]
    np.testing.assert_array_equal(part.frames, full.frames[[3, 0]])
    with pytest.raises(ValueError, match="positions"):
        vid.decode_clips(path, num_clips=4, clip_len=4, size=32, positions=[4])



def test_decode_pool_recycles_workers_and_returns_every_video(root):
    import queue

    from faster.extract.decoders import Decoded, DecodePool

    items = vid.discover(root).items
    got, pids = [], set()
    with DecodePool(items, workers=2, num_clips=2, clip_len=8, size=32, recycle_every=1) as pool:
        while True:
            try:
                r = pool.get(timeout=0.1)
            except queue.Empty:
                pids.update(s.proc.pid for s in pool.slots if s.proc is not None)
                continue
            if r is None:
                break
            assert isinstance(r, Decoded) and tuple(r.frames.shape) == (2, 8, 32, 32, 3)
            got.append(r.item.id)
            pids.update(s.proc.pid for s in pool.slots if s.proc is not None)
    assert sorted(got) == sorted(it.id for it in items)
    assert len(pids) >= 3  # 4 videos, 1 per worker process: workers were replaced
