"""Decoding one video's clips (faster.extract.video.decode_clips) and many in worker processes
(faster.extract.decoders): sampled frames, resize and crop, short and broken files, timeouts, recycling."""
import numpy as np
import pytest

from faster import sampling
from faster.extract import video
from faster.sampling import Sampling

av = pytest.importorskip("av")
from faster import synthetic  # noqa: E402  (needs av)


@pytest.fixture(scope="module")
def root(motion_videos):
    return motion_videos


def test_resize_size_short_side_is_size_times_8_over_7():
    assert video.resize_size(256, 340, 224) == (256, 340)  # Kinetics 340x256: already 256 on the short side
    assert video.resize_size(480, 640, 224) == (256, 341)
    assert video.resize_size(640, 480, 112) == (171, 128)


def test_decoded_clips_start_where_sampling_says_and_hold_those_frames(root):
    import decord

    path = root / "left" / "left_000.mp4"
    d = video.decode_clips(path, Sampling(num_clips=3, clip_len=4, size=16, frame_stride=2))
    assert d.num_frames == 16 and not d.short and d.fps == pytest.approx(30.0)
    assert d.clip_start == sampling.clip_starts(16, 3, 4, 2) == [0, 5, 9]  # round(4.5) = 5: half up
    assert d.frames.shape == (3, 4, 16, 16, 3) and d.frames.dtype == np.uint8
    vr = decord.VideoReader(str(path), num_threads=1)
    for i, start in enumerate(d.clip_start):
        want = video.resize_crop(vr.get_batch([start + 2 * j for j in range(4)]).asnumpy(), 16)
        np.testing.assert_array_equal(d.frames[i], want)


def _resize_crop_torch(frames, size: int):
    """The resize and crop decoding did before the workers dropped torch: antialiased bilinear interpolate."""
    import torch
    from torch.nn import functional

    rh, rw = video.resize_size(frames.shape[1], frames.shape[2], size)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (k, 3, H, W), channels-last: the uint8 path
    x = functional.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - size) // 2, (rw - size) // 2
    return x[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("hw,size", [((256, 340), 112), ((256, 340), 224), ((240, 320), 112), ((480, 640), 224),
                                     ((360, 202), 112), ((32, 32), 16), ((64, 48), 64), ((100, 100), 112)])
def test_resize_crop_agrees_with_torch_antialiased_interpolate(hw, size):
    """Pillow in the workers gives torch's frames: within 1 level when downscaling (2 at a few pixels of
    the sharp edges of the ramps when upscaling), the decoders' own tolerance (2 levels, above)."""
    rng = np.random.default_rng(hw[0] * size)
    noise = rng.integers(0, 256, (3, *hw, 3), dtype=np.uint8)
    smooth = np.cumsum(noise // 16, axis=2, dtype=np.uint16).astype(np.uint8)  # edges and ramps
    frames = np.concatenate([noise, smooth])
    got, want = video.resize_crop(frames, size), _resize_crop_torch(frames, size)
    assert got.shape == want.shape == (6, size, size, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= (1 if min(hw) > size else 2) and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_video_shorter_than_a_clip_repeats_its_last_frame(tmp_path):
    path = synthetic.write_video(tmp_path / "short.mp4", synthetic.motion_frames("right", frames=3, size=32))
    d = video.decode_clips(path, Sampling(num_clips=2, clip_len=8, size=16))
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
    with pytest.raises(video.DecodeError) as info:
        video.decode_clips(path, Sampling(num_clips=2, clip_len=4, size=16))
    assert info.value.stage == "open"


def test_normalise_clips_layout_and_values():
    import torch

    clips = torch.full((2, 4, 8, 8, 3), 255, dtype=torch.uint8)
    clips[..., 1] = 0
    x = video.normalise_clips(clips, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert x.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(x[:, 1], torch.tensor(-1.0))
    assert torch.allclose(x[:, 2], torch.tensor(0.5))


def test_positions_decode_a_subset_of_the_clips_exactly(root):
    path = root / "right" / "right_001.mp4"
    full = video.decode_clips(path, Sampling(num_clips=4, clip_len=4, size=32))
    part = video.decode_clips(path, Sampling(num_clips=4, clip_len=4, size=32, positions=[3, 0]))
    assert part.clip_start == [full.clip_start[3], full.clip_start[0]]
    np.testing.assert_array_equal(part.frames, full.frames[[3, 0]])
    with pytest.raises(ValueError, match="positions"):  # refused when the sampling is made, before any decode
        video.decode_clips(path, Sampling(num_clips=4, clip_len=4, size=32, positions=[4]))



def test_decode_pool_recycles_workers_and_returns_every_video(root, monkeypatch):
    from faster.extract.decoders import Decoded, DecodePool

    starts = []
    start = DecodePool._start

    def counted_start(self, slot):  # on the pool's dispatcher thread
        start(self, slot)
        starts.append(slot.proc.pid)

    monkeypatch.setattr(DecodePool, "_start", counted_start)
    items = video.discover(root).items
    with DecodePool(items, Sampling(num_clips=2, clip_len=8, size=32), workers=2, recycle_every=1) as pool:
        results = list(pool)
    assert all(isinstance(r, Decoded) and tuple(r.frames.shape) == (2, 8, 32, 32, 3) for r in results)
    assert sorted(r.item.id for r in results) == sorted(it.id for it in items)
    assert len(set(starts)) >= len(items)  # 1 video per worker process: 2 started, then one per recycled worker


def test_decode_workers_import_no_torch(root):
    """The workers decode, resize and crop with numpy, Pillow, decord and PyAV: their forkserver
    starts without importing torch again (the start-up every extract and predict paid)."""
    from faster.extract.decoders import Decoded, DecodePool

    items = video.discover(root).items[:2]
    with DecodePool(items, Sampling(num_clips=2, clip_len=4, size=32), workers=2) as pool:
        results = list(pool)
        infos = [s.info for s in pool.slots]
    assert all(isinstance(r, Decoded) for r in results) and len(results) == 2
    reported = [info for info in infos if info]  # a worker still starting when the other decoded both has none
    assert reported and all(info["torch"] is False for info in reported), infos


# ----------------------------------------------------------------------------------------------
# Decoders: --decoder auto|decord|pyav, and the decoders' own output

# name -> (codec, file, what `auto` reads it with: video.auto_order): decord only the codecs and
# containers it reads exactly; PyAV AV1 (decord cannot open it), MPEG-2 and MPEG-4 Part 2 (decord
# misreads them: see below) and anything in AVI
CODECS = {"h264": ("h264", ".mp4", "decord"), "hevc": ("hevc", ".mp4", "decord"), "vp9": ("vp9", ".webm", "decord"),
          "av1": ("av1", ".mkv", "pyav"), "prores": ("prores", ".mov", "decord"), "mpeg2": ("mpeg2", ".mpg", "pyav"),
          "mpeg2-ts": ("mpeg2", ".ts", "pyav"), "mpeg2-mkv": ("mpeg2", ".mkv", "pyav"),
          "mpeg4-mkv": ("mpeg4", ".mkv", "pyav"), "mpeg4-avi": ("mpeg4", ".avi", "pyav"), "h264-avi": ("h264", ".avi", "pyav")}


@pytest.fixture(scope="module")
def codec_videos(tmp_path_factory):
    """One 21-frame 64 px video per codec PyAV encodes here (AV1 through libsvtav1), some in several containers."""
    root = tmp_path_factory.mktemp("codecs")
    frames = synthetic.motion_frames("down-right", frames=21, size=64, seed=3)
    return {name: synthetic.write_video(root / f"{name}{ext}", frames, codec=codec)
            for name, (codec, ext, _) in CODECS.items()}


def test_cli_spells_the_decoders_and_compressions_of_the_library():
    from faster import cli
    from faster.store import schema

    assert cli.DECODERS == video.DECODERS and cli.COMPRESSIONS == schema.COMPRESSIONS


@pytest.mark.parametrize("name", list(CODECS))
def test_every_codec_decodes_through_auto_with_its_frame_count(codec_videos, name):
    path = codec_videos[name]
    d = video.decode_clips(path, Sampling(num_clips=3, clip_len=4, size=32))
    assert d.decoder == CODECS[name][2]
    assert d.num_frames == 21 and d.clip_start == sampling.clip_starts(21, 3, 4) and d.fps == pytest.approx(30.0)
    assert d.fallback is None  # the first decoder read it
    p = video.decode_clips(path, Sampling(num_clips=3, clip_len=4, size=32), decoder="pyav")  # the same frames
    assert p.num_frames == 21 and p.clip_start == d.clip_start
    diff = np.abs(p.frames.astype(np.int16) - d.frames.astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


def _nearest_source_frames(decoded, clip_start, clip_len, source=None):
    """For each decoded frame, the index of the source frame (resized and cropped as decoded) it is nearest to
    (``source``: the frames written; the codec fixture's by default)."""
    if source is None:
        source = synthetic.motion_frames("down-right", frames=21, size=64, seed=3)
    source = video.resize_crop(source, 32).astype(np.int16)
    frames = decoded.reshape(-1, *decoded.shape[2:]).astype(np.int16)
    err = np.abs(frames[:, None] - source[None]).mean(axis=(2, 3, 4))  # (decoded, source)
    want = [s + j for s in clip_start for j in range(clip_len)]
    return err.argmin(axis=1).tolist(), want


@pytest.mark.parametrize("positions", [None, [0, 3]], ids=["all", "subset"])
@pytest.mark.parametrize("name", list(CODECS))
def test_auto_gives_each_clip_its_own_frames_in_every_codec_and_container(codec_videos, name, positions):
    """decord 0.6 gave frames 3-6 for frames 13-16 of the MPEG-4 Part 2 file after frames 0-3 (the
    subset: clips 0 and 3 of 5, as predict decodes the expensive model's clips), and other frames for
    every frame of the MPEG-2 transport stream, without an error; auto's choice gives the frames
    the clips name (each decoded frame is nearest the source frame of its index)."""
    d = video.decode_clips(codec_videos[name], Sampling(num_clips=5 if positions else 3, clip_len=4, size=32,
                                                        positions=positions))
    got, want = _nearest_source_frames(d.frames, d.clip_start, 4)
    assert got == want, (d.decoder, got)


def test_auto_reads_with_pyav_first_what_decord_misreads_and_decord_when_pyav_cannot_open(codec_videos, tmp_path):
    assert {name: video.auto_order(path)[0] for name, path in codec_videos.items()} == \
        {name: auto for name, (_, _, auto) in CODECS.items()}
    (tmp_path / "renamed.avi").write_bytes(codec_videos["h264"].read_bytes())  # the container decides, not the name
    assert video.auto_order(tmp_path / "renamed.avi") == ("decord", "pyav")
    assert video.auto_order(_broken(tmp_path)) == ("decord", "pyav")  # both decoders' errors recorded
    assert video.auto_order(tmp_path / "missing.mp4") == ("decord", "pyav")


def _write_streams(path, *streams):
    """A file of one video stream per (codec, frames (T, H, W, 3) uint8, options) of ``streams``, in
    that order; options: pix_fmt, rate, rotation (a display matrix), codec (the encoder's own)."""
    with av.open(str(path), "w") as container:
        added = []
        for codec, frames, options in streams:  # every stream before the first packet (the header)
            stream = container.add_stream(codec, rate=options.get("rate", 30))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = options.get("pix_fmt", "yuv420p")
            stream.options = options.get("codec", {})
            if "rotation" in options:
                stream.set_display_rotation(options["rotation"])
            added.append((stream, frames))
        for stream, frames in added:
            for f in [*frames, None]:
                for packet in stream.encode(None if f is None else av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotated_video_is_read_as_shown_by_both_decoders(tmp_path, degrees):
    """A phone's portrait video is stored landscape with a display matrix. PyAV gives the stored
    frame and its ``rotation``, which decode_clips_pyav applies; decord turns a frame as shown, but
    its get_batch fails on a quarter turn of a non-square video, so auto reads that with PyAV."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix")
    frames = synthetic.motion_frames("right", frames=12, size=64, seed=2)[:, 8:56]  # 48 x 64: not square
    path = tmp_path / f"rot{degrees}.mp4"
    _write_streams(path, ("libx264", frames, {"rotation": degrees}))
    clips = Sampling(num_clips=2, clip_len=4, size=32)
    shown = np.rot90(frames, degrees // 90, axes=(1, 2))
    want = video.resize_crop(shown[sampling.clip_starts(12, 2, 4)[0]:][:4], 32).astype(np.int16)
    for decoder in ("auto", "pyav") + (("decord",) if degrees == 180 else ()):
        d = video.decode_clips(path, clips, decoder=decoder)
        assert np.abs(d.frames[0].astype(np.int16) - want).mean() < 4, decoder
        if decoder == "auto":
            assert d.decoder == ("decord" if degrees == 180 else "pyav") and (d.fallback is None) == (degrees == 180)


def test_both_decoders_read_the_main_video_stream_not_a_picture_before_it(tmp_path):
    """A file whose first video stream is one picture (a thumbnail) and whose second is the video:
    PyAV's best stream (av_find_best_stream), as decord chooses, not its first."""
    frames = synthetic.motion_frames("left", frames=21, size=64, seed=4)
    path = tmp_path / "two.mkv"
    _write_streams(path, ("mjpeg", frames[:1, :32, :32], {"pix_fmt": "yuvj420p", "rate": 1}), ("libx264", frames, {}))
    clips = Sampling(num_clips=3, clip_len=4, size=32)
    for decoder in ("decord", "pyav", "auto"):
        d = video.decode_clips(path, clips, decoder=decoder)
        got, want = _nearest_source_frames(d.frames, d.clip_start, 4, frames)
        assert d.num_frames == 21 and got == want, decoder


@pytest.mark.parametrize("codec,ext,options", [("libx264", ".mp4", {"g": "12", "bf": "3"}),
                                               ("libvpx-vp9", ".webm", {"g": "12", "deadline": "realtime"})],
                         ids=["h264", "vp9"])
def test_auto_reads_subsets_of_clips_across_keyframes_as_their_frames(tmp_path, codec, ext, options):
    """What auto reads with decord stays exact when a subset of clips makes it seek across groups of
    pictures (a keyframe every 12 frames): predict's and train-clip's reads."""
    frames = synthetic.motion_frames("down-right", frames=60, size=64, seed=6)
    for i in range(60):  # every frame distinct: a bar that moves 3 px a frame along the top
        frames[i, :6] = 0
        frames[i, :6, 3 * i % 63:3 * i % 63 + 3] = 255
    path = tmp_path / f"gop{ext}"
    _write_streams(path, (codec, frames, {"codec": options}))
    for positions in ([1, 5], [3, 7, 9], [8], [0, 9]):
        d = video.decode_clips(path, Sampling(num_clips=10, clip_len=4, size=32, positions=positions))
        got, want = _nearest_source_frames(d.frames, d.clip_start, 4, frames)
        assert d.decoder == "decord" and got == want, (positions, got)


def test_decord_and_pyav_give_the_same_frames_on_h264(tmp_path):
    path = synthetic.write_video(tmp_path / "h.mp4", synthetic.motion_frames("left", frames=40, size=64, seed=1))
    a = video.decode_clips(path, Sampling(num_clips=3, clip_len=8, size=48, frame_stride=2), decoder="decord")
    b = video.decode_clips(path, Sampling(num_clips=3, clip_len=8, size=48, frame_stride=2), decoder="pyav")
    assert (a.decoder, b.decoder) == ("decord", "pyav") and a.clip_start == b.clip_start
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
    assert diff.max() <= 2, diff.max()
    part = video.decode_clips(path, Sampling(num_clips=3, clip_len=8, size=48, frame_stride=2, positions=[2, 0]),
                              decoder="pyav")
    np.testing.assert_array_equal(part.frames, b.frames[[2, 0]])


def test_pyav_counts_frames_when_the_header_has_none(codec_videos):
    import av

    path = codec_videos["vp9"]
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # WebM keeps no frame count
    d = video.decode_clips(path, Sampling(num_clips=2, clip_len=8, size=32), decoder="pyav")
    assert d.num_frames == 21 and d.clip_start == [0, 13]


def _broken(tmp_path):
    good = synthetic.write_video(tmp_path / "good.mp4", synthetic.motion_frames("up", frames=8, size=32))
    path = tmp_path / "broken.mp4"
    path.write_bytes(good.read_bytes()[:500])  # no moov atom
    return path


def test_a_file_neither_decoder_opens_fails_with_both_reasons(tmp_path):
    path = _broken(tmp_path)
    with pytest.raises(video.DecodeError) as info:
        video.decode_clips(path, Sampling(num_clips=2, clip_len=4, size=16))
    err = info.value
    assert err.stage == "open" and set(err.errors) == {"decord", "pyav"}
    assert "decord: " in str(err) and "pyav: " in str(err) and "Invalid data" in err.errors["pyav"]
    with pytest.raises(ValueError, match="unknown decoder 'ffmpeg'"):
        video.decode_clips(path, Sampling(num_clips=2, clip_len=4, size=16), decoder="ffmpeg")


@pytest.mark.parametrize("workers", [0, 1])
def test_the_decoders_messages_go_to_the_failure_not_the_terminal(tmp_path, capfd, workers):
    from faster.extract.decoders import Decoded, DecodePool, Failed, InlineDecoder

    items = [video.VideoItem("broken.mp4", _broken(tmp_path)), video.VideoItem("good.mp4", tmp_path / "good.mp4")]
    clips = Sampling(num_clips=2, clip_len=4, size=16)
    with (DecodePool(items, clips, workers=workers) if workers else InlineDecoder(items, clips)) as pool:
        got = {r.item.id: r for r in pool}
    bad, good = got["broken.mp4"], got["good.mp4"]
    assert isinstance(bad, Failed) and bad.stage == "open" and set(bad.extra["errors"]) == {"decord", "pyav"}
    assert "video_reader.cc" in bad.extra["log"] and "moov atom not found" in bad.extra["log"]
    assert isinstance(good, Decoded) and good.decoder == "decord"
    out, err = capfd.readouterr()
    assert "video_reader.cc" not in err and "moov atom" not in err


@pytest.mark.slow
def test_extract_reads_every_codec_and_counts_videos_per_decoder(codec_videos, tmp_path):
    """AV1 (and the rest) land in the shards with their frame counts; the manifest counts decoders;
    stderr of `python -m faster extract` holds none of decord's C++ log lines."""
    import json
    import shutil
    import subprocess
    import sys

    import h5py

    root = tmp_path / "videos"
    for path in codec_videos.values():
        (root / "a").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "a" / path.name)
    _broken(root / "a")
    (root / "a" / "good.mp4").unlink()
    out = tmp_path / "feats"
    res = subprocess.run([sys.executable, "-m", "faster", "extract", str(root), "-o", str(out), "--model", "r2d26_tiny",
                          "--clip-len", "8", "--num-clips", "2", "--size", "32", "--workers", "1", "--device", "cpu",
                          "--no-progress"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "video_reader.cc" not in res.stderr and "moov atom" not in res.stderr, res.stderr
    frames = {}
    for shard in out.glob("shard-*.h5"):
        with h5py.File(shard) as f:
            frames.update(zip(f["videos/id"].asstr()[()], f["videos/num_frames"][()].tolist()))
    assert frames == {f"a/{p.name}": 21 for p in codec_videos.values()}
    run = json.loads((out / "manifest-00000.json").read_text())["runs"][-1]
    assert run["decoders"] == {"decord": 4, "pyav": 7} and run["decoder"] == "auto"  # video.auto_order
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [r["id"] for r in failures] == ["a/broken.mp4"]
    assert set(failures[0]["errors"]) == {"decord", "pyav"} and "video_reader.cc" in failures[0]["log"]
