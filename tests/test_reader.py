"""Feature-set reader: parts pooled, models joined by id, pattern-aware reads, clear errors on bad shards."""
import json
import pickle
import re

import h5py
import numpy as np
import pytest
import torch

import helpers

from faster.store.reader import FeatureSet
from faster.store.writer import ShardWriter, next_seq

N = 8
SHAPE = (1, 2, 2, 4)  # (T', H', W', C)
CODE = {"exp": 1000.0, "chp": 2000.0}  # feature value = CODE[model] + 10 * video + position: which bytes were read


def write_set(out, models, videos, *, classes=("a", "b"), starts_shift=0, part=0, clip_len=8, shard_size=3):
    """Write videos (ints) with every feature equal to CODE[model] + 10 * video + clip position."""
    out.mkdir(parents=True, exist_ok=True)
    head = helpers.header(models, num_clips=N, clip_len=clip_len, classes=classes)
    videos = list(videos)
    for k in range(0, len(videos), shard_size):
        chunk = videos[k:k + shard_size]
        with ShardWriter(out, part=part, seq=next_seq(out, part), header=head, capacity=len(chunk)) as w:
            for v in chunk:
                feats = {m: np.broadcast_to((CODE[m] + 10 * v + np.arange(N))[:, None, None, None, None],
                                            (N, *SHAPE)) for m in models}
                w.add(id=f"v{v:03d}.mp4", label=v % 2, num_frames=100, fps=25.0,
                      clip_start=[i * 10 + starts_shift for i in range(N)], features=feats)
    return out


def test_parts_are_pooled_and_models_joined_by_id(tmp_path):
    write_set(tmp_path / "e0", ["exp"], range(0, 5), part=0)
    write_set(tmp_path / "e1", ["exp"], range(5, 10), part=1)  # another process's part of the same extraction
    write_set(tmp_path / "c", ["chp"], [1, 2, 3, 7, 8, 11])  # 11 has no expensive features
    fs = FeatureSet([tmp_path / "e0", tmp_path / "e1", tmp_path / "c"])
    assert fs.join == {"groups": {"exp": 10, "chp": 6}, "matched": 5}
    assert fs.ids.tolist() == ["v001.mp4", "v002.mp4", "v003.mp4", "v007.mp4", "v008.mp4"]
    assert isinstance(fs.ids, np.ndarray) and fs.labels.dtype == np.int64
    assert fs.labels.tolist() == [1, 0, 1, 1, 0]
    assert fs.config == {"clip_len": 8, "num_clips": N, "frame_stride": 1, "size": 32}
    assert fs.models["exp"].shape == SHAPE and fs.models["chp"].channels_first == [4, 1, 2, 2]


def test_dataset_reads_only_the_model_of_each_position(tmp_path):
    write_set(tmp_path / "e", ["exp"], range(6))
    write_set(tmp_path / "c", ["chp"], range(6))
    fs = FeatureSet([tmp_path / "e", tmp_path / "c"])
    ds = fs.dataset({"expensive": ("exp", [0, 4]), "cheap": ("chp", [1, 2, 3, 5, 6, 7])}, np.array([4, 1]))
    item = ds[0]  # video 4
    assert item["expensive"].dtype == torch.float16 and item["expensive"].shape == (2, *SHAPE)
    assert item["expensive"][:, 0, 0, 0, 0].tolist() == [1040, 1044]
    assert item["cheap"][:, 0, 0, 0, 0].tolist() == [2041, 2042, 2043, 2045, 2046, 2047]
    assert int(item["label"]) == 0 and int(item["index"]) == 4
    # break every cheap shard: an all-expensive dataset never touches them, a mixed one names the file
    for p in (tmp_path / "c").glob("shard-*.h5"):
        p.write_bytes(b"garbage")
    all_e = fs.dataset({"expensive": ("exp", list(range(N)))})
    assert all_e[5]["expensive"][:, 0, 0, 0, 0].tolist() == [1050 + i for i in range(N)]
    mixed = fs.dataset({"expensive": ("exp", [0, 4]), "cheap": ("chp", [1, 2, 3, 5, 6, 7])})
    with pytest.raises(ValueError, match=r"c/shard-00000-000000\.h5: cannot open"):
        mixed[0]


def test_dataset_in_dataloader_workers_opens_files_lazily(tmp_path):
    fs = FeatureSet([write_set(tmp_path / "ec", ["exp", "chp"], range(7))])
    ds = fs.dataset({"expensive": ("exp", [0, 2, 4, 6]), "cheap": ("chp", [1, 3, 5, 7])})
    ds[0]
    assert ds._files and not pickle.loads(pickle.dumps(ds))._files  # never ship open handles to a worker
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    got = torch.cat([b["cheap"][:, :, 0, 0, 0, 0] for b in batches])
    want = torch.tensor([[2000 + 10 * v + p for p in (1, 3, 5, 7)] for v in range(7)], dtype=torch.float16)
    assert torch.equal(got, want)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(7))


def test_mismatched_sets_are_refused_naming_the_problem(tmp_path):
    write_set(tmp_path / "e", ["exp"], range(4))
    write_set(tmp_path / "classes", ["chp"], range(4), classes=("a", "c"))
    with pytest.raises(ValueError, match="class list"):
        FeatureSet([tmp_path / "e", tmp_path / "classes"])
    write_set(tmp_path / "starts", ["chp"], range(4), starts_shift=1)
    with pytest.raises(ValueError, match="v000.mp4.*clip starts"):
        FeatureSet([tmp_path / "e", tmp_path / "starts"])
    write_set(tmp_path / "len", ["chp"], range(4), clip_len=16)
    with pytest.raises(ValueError, match="clip_len 16 differs"):
        FeatureSet([tmp_path / "e", tmp_path / "len"])
    write_set(tmp_path / "again", ["exp"], range(4))
    with pytest.raises(ValueError, match="model 'exp' appears"):  # the same model twice, as different groups
        FeatureSet([tmp_path / "e", tmp_path / "again", write_set(tmp_path / "both", ["exp", "chp"], range(2))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no complete shards"):
        FeatureSet([tmp_path / "empty"])
    fs = FeatureSet([tmp_path / "e"])
    with pytest.raises(ValueError, match="model 'chp' is not in"):
        fs.dataset({"cheap": ("chp", [0])})
    with pytest.raises(ValueError, match="outside the 8 extracted clips"):
        fs.dataset({"expensive": ("exp", [8])})


def test_corrupt_or_foreign_shards_are_named(tmp_path):
    d = write_set(tmp_path / "e", ["exp"], range(4))
    bad = d / "shard-00007-000000.h5"
    bad.write_bytes(b"\x89HDF not really")
    with pytest.raises(ValueError, match=r"shard-00007-000000\.h5: not a readable HDF5 shard"):
        FeatureSet([d])
    bad.unlink()
    shard = sorted(d.glob("shard-*.h5"))[0]
    with h5py.File(shard, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ValueError, match=f"{shard.name}: format_version 99"):
        FeatureSet([d])
    with h5py.File(shard, "a") as f:
        f.attrs["format_version"] = 1
        f.attrs["classes"] = "not json"
    with pytest.raises(ValueError, match="classes is not a JSON list"):
        FeatureSet([d])
    with h5py.File(shard, "a") as f:
        f.attrs["classes"] = json.dumps(["a", "b"])
        del f["videos/clip_start"]
    with pytest.raises(ValueError, match="missing dataset videos/clip_start"):
        FeatureSet([d])


def test_threaded_loader_batches_every_video_once_and_reuses_buffers(tmp_path):
    from faster.store.reader import ThreadedLoader

    fs = FeatureSet([write_set(tmp_path / "ec", ["exp", "chp"], range(7))])
    ds = fs.dataset({"expensive": ("exp", [0, 2]), "cheap": ("chp", [5])}, np.arange(1, 7))
    loader = ThreadedLoader(ds, 4, shuffle=True, seed=3)
    assert len(loader) == 2
    seen = []
    for _ in range(2):  # two epochs
        batches = [{k: v.clone() for k, v in b.items()} for b in loader]
        assert [len(b["index"]) for b in batches] == [4, 2]
        index = torch.cat([b["index"] for b in batches])
        assert sorted(index.tolist()) == [1, 2, 3, 4, 5, 6]
        video = (torch.cat([b["expensive"][:, 1, 0, 0, 0, 0] for b in batches]).float() - 1002) / 10
        assert video.tolist() == index.tolist()  # features belong to the video of their index
        seen.append(index.tolist())
    assert seen[0] != seen[1]  # reshuffled every epoch
    it = iter(loader)
    next(it)
    it.close()  # an early stop does not hang the reader thread
    ds.close()
    for p in (tmp_path / "ec").glob("shard-*.h5"):
        p.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot open shard"):
        list(ThreadedLoader(fs.dataset({"expensive": ("exp", [0])}), 4))


def test_check_compatible_is_one_line_naming_what_differs(tmp_path):
    from faster.store.header import check_compatible

    fs = FeatureSet([write_set(tmp_path / "ec", ["exp", "chp"], range(3))])
    same = {"classes": ["a", "b"], "config": dict(fs.config), "shapes": {"exp": list(SHAPE), "chp": SHAPE}}
    check_compatible(fs, **same, what="validation set", reference="the training set")  # lists or tuples alike
    cases = [({"classes": ["a", "b", "c"]}, r"^validation set: class list differs from the one in the training set "
                                            r"\(2 vs 3 classes\)$"),
             ({"classes": ["a", "z"]}, r"class list differs .*\(position 1: 'b' vs 'z'\)$"),
             ({"config": {**fs.config, "clip_len": 16, "size": 64}},
              r"^validation set: extraction clip_len 8, size 32 differs from clip_len 16, size 64 in the training set$"),
             ({"shapes": {"chp": (1, 2, 2, 8)}}, r"^validation set: chp clips are \(1, 2, 2, 4\), not \(1, 2, 2, 8\) as "
                                                 r"in the training set$")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            check_compatible(fs, **{**same, **change}, what="validation set", reference="the training set")
    with pytest.raises(ValueError, match="model 'nope' is not in"):
        check_compatible(fs, **{**same, "shapes": {"nope": SHAPE}}, what="validation set", reference="the run")


def test_shards_of_one_group_with_other_map_shapes_are_refused(tmp_path):
    d = write_set(tmp_path / "e", ["exp"], range(4))
    first, second = sorted(d.glob("shard-*.h5"))
    with h5py.File(second, "a") as f:
        f.create_dataset("features/wide", data=np.zeros((1, N, 1, 2, 2, 8), np.float16))
        del f["features/exp"]
        f["features/exp"] = f["features/wide"]
        del f["features/wide"]
    with pytest.raises(ValueError, match=rf"{second.name}: exp clips are \(1, 2, 2, 8\), not \(1, 2, 2, 4\) as in "
                                         rf".*{first.name}$"):
        FeatureSet([d])


def test_model_attributes_are_one_list():
    """schema.MODEL_ATTRS is the one list; ModelHeader's fields, the required and the configuration subsets follow it."""
    import dataclasses

    from faster.store import schema
    from faster.store.header import ModelHeader

    assert tuple(f.name for f in dataclasses.fields(ModelHeader)) == schema.MODEL_ATTRS
    assert schema.MODEL_REQUIRED == ("gflops_per_clip", "layer", "weights", "mean", "std", "compute_dtype")
    assert schema.MODEL_CONFIG == ("layer", "weights", "mean", "std", "compute_dtype", "spatial_pool", "size",
                                   "clip_len", "frame_stride")
    head = helpers.header(["m"], num_clips=N)
    assert list(head.config()["models"]["m"]) == list(schema.MODEL_CONFIG)


def test_nonfinite_videos_are_found_by_one_function(tmp_path):
    """The reader, integrity.check and verify share integrity.nonfinite_videos / finite and one message."""
    from faster.store import integrity

    d = write_set(tmp_path / "e", ["exp"], range(3), shard_size=3)
    shard = next(d.glob("shard-*.h5"))
    with h5py.File(shard, "a") as f:
        f["features/exp"][1, 2, 0, 0, 0, 0] = np.inf
        assert integrity.nonfinite_videos(f["features/exp"], ["v0", "v1", "v2"]) == ["v1"]
    fs = FeatureSet([d])
    ds = fs.dataset({"expensive": ("exp", [0, 1])})
    assert ds[1]["expensive"].isfinite().all()  # positions 0 and 1 of v001 are finite: only what is read counts
    message = integrity.nonfinite_message(shard, "v001.mp4", "exp")
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}; `faster verify`"):
        fs.dataset({"expensive": ("exp", [2])})[1]
