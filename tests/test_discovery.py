"""Finding videos: folders, path,label CSV, Kinetics CSV, unlabelled (faster.extract.video.discover)."""
import shutil

import pytest

from faster.extract import video

av = pytest.importorskip("av")
from faster import synthetic  # noqa: E402  (needs av)


@pytest.fixture(scope="module")
def root(motion_videos, tmp_path_factory):
    """ROOT/<class>/<class>_<i>.mp4 for two classes, plus a note and a hidden file that are not videos."""
    r = tmp_path_factory.mktemp("videos") / "root"
    shutil.copytree(motion_videos, r)
    (r / "left" / "notes.txt").write_text("not a video")
    (r / "right" / "._right_000.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble junk
    return r


def ids(found):
    return [it.id for it in found.items]


def test_folder_per_class_sorted_classes_and_only_video_extensions(root):
    found = video.discover(root)
    assert found.layout == "folders"
    assert found.classes == ["left", "right"]
    assert ids(found) == ["left/left_000.mp4", "left/left_001.mp4", "right/right_000.mp4", "right/right_001.mp4"]
    assert [it.label for it in found.items] == [0, 0, 1, 1]
    assert found.ignored == 1  # notes.txt: ignored, not a failure


def test_classes_file_fixes_indices_and_refuses_unknown_folders(root, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("up\nright\nleft\n")
    found = video.discover(root, classes_file=names)
    assert found.classes == ["up", "right", "left"]
    assert [it.label for it in found.items] == [2, 2, 1, 1]
    names.write_text("right\n")
    with pytest.raises(ValueError, match="left"):
        video.discover(root, classes_file=names)


def test_unlabelled_root_and_flag(root, tmp_path):
    synthetic.make_motion_dataset(tmp_path, classes=("up",), per_class=1, frames=8, size=32)
    (tmp_path / "up" / "up_000.mp4").rename(tmp_path / "loose.mp4")
    found = video.discover(tmp_path)
    assert found.layout == "unlabelled" and ids(found) == ["loose.mp4"] and found.items[0].label == -1
    flagged = video.discover(root, unlabelled=True)
    assert flagged.layout == "unlabelled" and {it.label for it in flagged.items} == {-1}


def test_path_label_csv_matches_by_path_then_stem_and_records_missing(root, tmp_path):
    csv = tmp_path / "ann.csv"
    csv.write_text("path,label\nleft/left_000.mp4,left\nright_001.avi,right\nright/gone.mp4,right\n")
    found = video.discover(root, annotations=csv)
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
    found = video.discover(root, annotations=csv)
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
    found = video.discover(tmp_path, annotations=csv, classes_file=classes)
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
        video.discover(root, annotations=csv)


def test_csv_label_outside_the_class_list_is_refused(root, tmp_path):
    csv, classes = tmp_path / "ann.csv", tmp_path / "c.txt"
    csv.write_text("path,label\nleft/left_000.mp4,jumping\n")
    classes.write_text("left\nright\n")
    with pytest.raises(ValueError, match="jumping"):
        video.discover(root, annotations=csv, classes_file=classes)
