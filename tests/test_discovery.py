"""Finding videos (folders, path,label CSV, Kinetics CSV, unlabelled) and decoding their clips."""
import numpy as np
import pytest

from faster import sampling
from faster.extract import video as vid

av = pytest.importorskip("av")
from faster import synthetic  # noqa: E402  (needs av)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT/<class>/<class>_<i>.mp4 for two classes, plus a note and a hidden file that are not videos."""
    r = tmp_path_factory.mktemp("videos")
    synthetic.make_motion_dataset(r, classes=("left", "right"), per_class=2, frames=16, size=32)
    (r / "left" / "notes.txt").write_text("not a video")
    (r / "right" / "._right_000.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble junk
    return r


def ids(found):
    return [it.id for it in found.items]


def test_folder_per_class_sorted_classes_and_only_video_extensions(root):
    found = vid.discover(root)
    assert found.layout == "folders"
    assert found.classes == ["left", "right"]
    assert ids(found) == ["left/left_000.mp4", "left/left_001.mp4", "right/right_000.mp4", "right/right_001.mp4"]
    assert [it.label for it in found.items] == [0, 0, 1, 1]
    assert found.ignored == 1  # notes.txt: ignored, not a failure


def test_classes_file_fixes_indices_and_refuses_unknown_folders(root, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("up\nright\nleft\n")
    found = vid.discover(root, classes_file=names)
    assert found.classes == ["up", "right", "left"]
    assert [it.label for it in found.items] == [2, 2, 1, 1]
    names.write_text("right\n")
    with pytest.raises(ValueError, match="left"):
        vid.discover(root, classes_file=names)


def test_unlabelled_root_and_flag(root, tmp_path):
    synthetic.make_motion_dataset(tmp_path, classes=("up",), per_class=1, frames=8, size=32)
    (tmp_path / "up" / "up_000.mp4").rename(tmp_path / "loose.mp4")
    found = vid.discover(tmp_path)
    assert found.layout == "unlabelled" and ids(found) == ["loose.mp4"] and found.items[0].label == -1
    flagged = vid.discover(root, unlabelled=True)
    assert flagged.layout == "unlabelled" and {it.label for it in flagged.items} == {-1}


def test_path_label_csv_matches_by_path_then_stem_and_records_missing(root, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("path,label\nleft/left_000.mp4,left\nright_001.avi,right\nright/gone.mp4,right\n")
    found = vid.discover(root, annotations=csv)
    assert found.layout == "csv" and found.classes == ["left", "right"]
    by_id = {it.id: it for it in found.items}
    assert by_id["left/left_000.mp4"].label == 0
    assert by_id["right/right_001.mp4"].label == 1  # matched by stem, any video extension, anywhere
    gone = by_id["right/gone.mp4"]
    assert gone.path is None and "gone" in gone.error
    assert "right/right_000.mp4" not in by_id  # not listed: skipped


def test_headerless_csv_with_integer_labels(root, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("left/left_001.mp4,2\nright/right_000.mp4,0\n")
    found = vid.discover(root, annotations=csv)
    assert found.classes == ["0", "1", "2"]
    assert {it.id: it.label for it in found.items} == {"left/left_001.mp4": 2, "right/right_000.mp4": 0}


def test_kinetics_csv_names_split_and_classes_file(tmp_path):
    for yt, (s, e), name in (("abc", (10, 20), "riding"), ("xyz", (0, 10), "surfing")):
        synthetic.write_video(tmp_path / "train" / name / f"{yt}_{s:06d}_{e:06d}.mp4",
                              synthetic.motion_frames("left", frames=8, size=32))
    csv = tmp_path / "kinetics.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\n"
                   "riding,abc,10,20,train\nsurfing,xyz,0,10,train\nriding,missing1,5,15,val\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("archery\nriding\nsurfing\n")
    found = vid.discover(tmp_path, annotations=csv, classes_file=classes)
    assert found.layout == "kinetics"
    by_id = {it.id: it for it in found.items}
    assert by_id["train/riding/abc_000010_000020.mp4"].label == 1
    assert by_id["train/surfing/xyz_000000_000010.mp4"].label == 2
    assert by_id["train/surfing/xyz_000000_000010.mp4"].split == "train"
    assert by_id["missing1_000005_000015"].path is None and by_id["missing1_000005_000015"].split == "val"


@pytest.mark.parametrize("bad", ["../outside.mp4", "/etc/passwd", "left/../../x.mp4"])
def test_csv_path_leaving_the_root_is_refused(root, tmp_path, bad):
    csv = tmp_path / "ann.csv"
    csv.write_text(f"path,label\n{bad},left\n")
    with pytest.raises(ValueError, match="leaves the video root"):
        vid.discover(root, annotations=csv)


def test_csv_label_outside_the_class_list_is_refused(root, tmp_path):
    csv, classes = tmp_path / "ann.csv", tmp_path / "c.txt"
    csv.write_text("path,label\nleft/left_000.mp4,jumping\n")
    classes.write_text("left\nright\n")
    with pytest.raises(ValueError, match="jumping"):
        vid.discover(root, annotations=csv, classes_file=classes)


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


def test_motion_dataset_is_deterministic_and_classes_are_directions():
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


def test_positions_decode_a_subset_of_the_clips_exactly(root):
    path = root / "right" / "right_001.mp4"
    full = vid.decode_clips(path, num_clips=4, clip_len=4, size=32)
    part = vid.decode_clips(path, num_clips=4, clip_len=4, size=32, positions=[3, 0])
    assert part.clip_start == [full.clip_start[3], full.clip_start[0]]
    np.testing.assert_array_equal(part.frames, full.frames[[3, 0]])
    with pytest.raises(ValueError, match="positions"):
        vid.decode_clips(path, num_clips=4, clip_len=4, size=32, positions=[4])
