"""Each model at its own sampling (issue [21] item 3): --clip-len NAME=L / --frame-stride NAME=S, one
decode on the finest grid, every model's clip covering the same span from the same start; the
shard records each model's sampling (format 3), fit aligns maps of different T', predict rebuilds
the same inputs, and older shards read with the root's sampling for every model."""
import pytest
from click.testing import CliRunner

import helpers

from faster.errors import BadValue
from faster.sampling import Sampling, clip_grid, grid_frames

E, C = "r2plus1d50_tiny", "r2d26_tiny"


@pytest.mark.parametrize("per_model,grid", [
    ({"a": (16, 4), "b": (4, 16)}, (16, 4)),  # MViT-V2-S 16 x 4 beside X3D-XS stretched to the same 64 frames
    ({"a": (4, 12), "b": (16, 3)}, (16, 3)),
    ({"a": (6, 4), "b": (4, 6)}, (11, 2)),  # gcd 2: the grid reaches as far as the longest clip
    ({"a": (8, 1)}, (8, 1)),
])
def test_the_grid_is_the_finest_common_stride_over_the_common_span(per_model, grid):
    assert clip_grid(per_model) == grid
    L, g = grid
    for clip_len, stride in per_model.values():
        frames = grid_frames(clip_len, stride, g)
        assert len(frames) == clip_len and max(frames) < L
        # frame j of the model's clip is frame j * stride of the clip: the same moments from the same start
        assert [f * g for f in frames] == [j * stride for j in range(clip_len)]


def test_a_span_mismatch_is_one_error_naming_both_models():
    with pytest.raises(BadValue, match=r"^clip span mismatch: a covers 8 x 1 = 8 frames, b 8 x 2 = 16") as err:
        clip_grid({"a": (8, 1), "b": (8, 2)})
    assert "\n" not in str(err.value)


def test_the_grid_frames_are_the_models_own_frames():
    """Decoding the grid and taking a model's frames gives the frames its own sampling would decode."""
    grid = Sampling(clip_len=16, num_clips=3, frame_stride=1, size=32)
    own = Sampling(clip_len=8, num_clips=3, frame_stride=2, size=32)
    starts = grid.starts(40)
    picked = [[clip[i] for i in grid_frames(8, 2, 1)] for clip in grid.frame_indices(starts, 40)]
    assert picked == own.frame_indices(starts, 40)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """Four motion videos; E at 16 x 1 (T' = 2) and C at 8 x 2 (T' = 1) from one decode, through the CLI."""
    pytest.importorskip("av")
    from faster import synthetic
    from faster.cli import cli

    base = tmp_path_factory.mktemp("per-model")
    videos, feats = base / "videos", base / "feats"
    synthetic.make_motion_dataset(videos, classes=("left", "right"), per_class=2, frames=24, size=32)
    res = CliRunner().invoke(cli, ["extract", str(videos), "-o", str(feats), "--model", E, "--model", C,
                                   "--clip-len", "16", "--clip-len", f"{C}=8", "--frame-stride", f"{C}=2",
                                   "--num-clips", "2", "--size", "32", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    return {"base": base, "videos": videos, "feats": feats}


def test_the_shard_records_each_models_sampling(world):
    import h5py

    from faster.extract import models
    from faster.store import schema

    with h5py.File(next(world["feats"].glob("shard-*.h5"))) as f:
        assert f.attrs["format_version"] == schema.FORMAT_VERSION == 3
        assert (f.attrs["clip_len"], f.attrs["frame_stride"]) == (16, 1)  # the grid decoded
        e, c = f[schema.features_key(E)], f[schema.features_key(C)]
        assert (e.attrs["clip_len"], e.attrs["frame_stride"]) == (16, 1)
        assert (c.attrs["clip_len"], c.attrs["frame_stride"]) == (8, 2)
        assert e.shape[2] == 2 and c.shape[2] == 1  # T'
        assert c.attrs["gflops_per_clip"] == pytest.approx(models.clip_gflops(C, 8, 32))


def test_models_at_their_own_sampling_fit_evaluate_and_predict(world, tmp_path):
    """Maps of different T' are aligned by fit; predict decodes each model at its recorded sampling
    and agrees with evaluate."""
    helpers.fit_evaluate_predict(world["videos"], world["feats"], tmp_path, E, C)


def test_a_span_mismatch_on_the_command_line_is_one_line(world, tmp_path):
    from faster.cli import cli

    res = CliRunner().invoke(cli, ["extract", str(world["videos"]), "-o", str(tmp_path / "x"), "--model", E,
                                   "--model", C, "--clip-len", f"{C}=4", "--workers", "0"])
    assert res.exit_code == 2
    line = [s for s in res.output.splitlines() if "span" in s]
    assert len(line) == 1 and E in line[0] and C in line[0] and "4 x 1 = 4" in line[0] and "8 x 1 = 8" in line[0]
    res = CliRunner().invoke(cli, ["extract", str(world["videos"]), "-o", str(tmp_path / "x"), "--model", E,
                                   "--clip-len", "nope=4", "--workers", "0"])
    assert res.exit_code == 2 and "'nope' is not a --model" in res.output


def test_an_older_format_shard_reads_with_the_roots_sampling(world, tmp_path):
    """A format 2 shard (no per-model clip_len / frame_stride) gives each model the root's values and
    compares equal to the same configuration written today."""
    import shutil

    import h5py

    from faster.store import schema
    from faster.store.header import config_diff, read_header

    src = next(world["feats"].glob("shard-*.h5"))
    old = tmp_path / src.name
    shutil.copy(src, old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 2
        f.attrs["clip_len"], f.attrs["frame_stride"] = 8, 2
        for key in (E, C):
            ds = f[schema.features_key(key)]
            del ds.attrs["clip_len"], ds.attrs["frame_stride"]
    sh = read_header(old)
    assert {m: (h.clip_len, h.frame_stride) for m, h in sh.header.models.items()} == {E: (8, 2), C: (8, 2)}
    config = sh.config
    for m in config["models"].values():  # a format 2 manifest's config: no per-model sampling
        del m["clip_len"], m["frame_stride"]
    assert config_diff(config, sh.config) == []


def test_a_resume_with_another_sampling_for_one_model_is_refused_naming_it(world):
    """C at 4 x 4 covers the same 16 frames, on the same grid, but is other features: refused before any work."""
    from faster.errors import UserError
    from faster.extract.pipeline import ExtractConfig, extract_videos

    cfg = ExtractConfig(str(world["videos"]), str(world["feats"]), (E, C), clip_len=16, clip_lens={C: 4},
                        frame_strides={C: 4}, num_clips=2, size=32, workers=0, progress=False)
    assert (cfg.sampling.clip_len, cfg.sampling.frame_stride) == (16, 1) and cfg.frames(C) == (0, 4, 8, 12)
    with pytest.raises(UserError, match=f"{C} clip_len 8 in .*, 4 in"):
        extract_videos(cfg)
