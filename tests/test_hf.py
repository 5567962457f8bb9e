"""Hugging Face video transformers (``hf:PATH``, extract/models/hf.py) against transformers' own output.

Tiny random configs (32 px, 4 frames, 16 wide) saved with ``save_pretrained``; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from faster.extract import models  # noqa: E402

KW = dict(image_size=32, num_frames=4, hidden_size=16, num_attention_heads=2, intermediate_size=32)
# family -> (config, bare model class, classification class, T' of a 4-frame clip, token order)
FAMILIES = {
    "videomae": (lambda **k: transformers.VideoMAEConfig(patch_size=16, tubelet_size=2, **KW, **k),
                 "VideoMAEModel", "VideoMAEForVideoClassification", 2, "thw"),
    "timesformer": (lambda **k: transformers.TimesformerConfig(patch_size=16, **KW, **k),
                    "TimesformerModel", "TimesformerForVideoClassification", 4, "hwt"),
    "timesformer_space_only": (lambda **k: transformers.TimesformerConfig(patch_size=16, attention_type="space_only",
                                                                           **KW, **k),
                               "TimesformerModel", None, 4, "space_only"),
    "vivit": (lambda **k: transformers.VivitConfig(tubelet_size=[2, 16, 16], **KW, **k),
              "VivitModel", "VivitForVideoClassification", 2, "thw"),
}


def _save(root, name, family, layers=1, head=False, seed=0):
    config, bare, classifier, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cls = getattr(transformers, classifier if head else bare)
    net = cls(config(num_hidden_layers=layers, **({"num_labels": 3} if head else {}))).eval()
    path = root / name
    net.save_pretrained(path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reference_map(family: str, hidden: torch.Tensor, B: int) -> torch.Tensor:
    """transformers' last_hidden_state as (B, D, T', H', W'), laid out from each model's documented token order."""
    T, order = FAMILIES[family][3], FAMILIES[family][4]
    D = hidden.shape[-1]
    if order == "space_only":  # (B*L, 1 + h*w, D): a CLS per frame
        return hidden[:, 1:].reshape(B, T, 2, 2, D).permute(0, 4, 1, 2, 3)
    tokens = hidden if family == "videomae" else hidden[:, 1:]
    if order == "hwt":
        return tokens.reshape(B, 2, 2, T, D).permute(0, 4, 3, 1, 2)
    return tokens.reshape(B, T, 2, 2, D).permute(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: _save(root, family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_map_equals_transformers_last_hidden_state(family, dirs, torch_one_thread):
    path = dirs[family]
    model = models.build(f"hf:{path}")
    assert model.weights == _sha(path / "model.safetensors") and model.layer == "last_hidden_state"
    assert model.out_channels == 16 and model.spatial_stride == 16 and model.native_input == (4, 32)
    assert model.temporal_stride == 4 // FAMILIES[family][3]
    reference = getattr(transformers, FAMILIES[family][1]).from_pretrained(path).eval()
    x = torch.randn(2, 3, 4, 32, 32)  # (B, 3, L, H, W), normalised
    with torch.no_grad():
        y = model(x)
        want = _reference_map(family, reference(pixel_values=x.transpose(1, 2)).last_hidden_state, 2)
    assert y.shape == (2, 16, FAMILIES[family][3], 2, 2) == want.shape
    assert (y - want).abs().max() <= 1e-4 * want.abs().max()
    assert models.feature_shape(f"hf:{path}", 4, 32) == tuple(y.shape[1:])
    assert models.clip_gflops(f"hf:{path}", 4, 32) > 0


@pytest.mark.parametrize("family", ["videomae", "timesformer", "timesformer_space_only", "vivit"])
def test_each_token_lands_at_its_own_frame_and_patch(family, tmp_path, torch_one_thread):
    """With no transformer layer a token sees only its own tubelet: changing the pixels of frame 3 in
    the patch at row 1, column 0 changes the map at (T' of frame 3, 1, 0) and nowhere else."""
    model = models.build(f"hf:{_save(tmp_path, 'd', family, layers=0)}")
    x = torch.randn(1, 3, 4, 32, 32)
    x2 = x.clone()
    x2[:, :, 3, 16:32, 0:16] += 1.0
    with torch.no_grad():
        changed = (model(x2) - model(x)).abs().amax(dim=(0, 1)) > 1e-6  # (T', H', W')
    t = 3 * FAMILIES[family][3] // 4
    assert changed.nonzero().tolist() == [[t, 1, 0]]


def test_a_classification_checkpoint_loads_its_encoder(tmp_path, torch_one_thread, caplog):
    path = _save(tmp_path, "cls", "videomae", head=True)
    with caplog.at_level("INFO", logger="faster.extract.models.hf"):
        model = models.build(f"hf:{path}")
    assert "classifier.weight" in caplog.text  # the head's keys: dropped, and said
    reference = transformers.VideoMAEForVideoClassification.from_pretrained(path).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        y, want = model(x), _reference_map("videomae", reference.videomae(x.transpose(1, 2)).last_hidden_state, 1)
    assert (y - want).abs().max() <= 1e-4 * want.abs().max()


def test_normalisation_follows_the_processor_or_the_family_defaults(dirs, tmp_path):
    assert models.build(f"hf:{dirs['videomae']}").mean == (0.485, 0.456, 0.406)  # VideoMAE's ImageNet statistics
    assert models.build(f"hf:{dirs['timesformer']}").std == (0.225,) * 3
    vivit = models.build(f"hf:{dirs['vivit']}")
    assert (vivit.mean, vivit.std) == ((0.75,) * 3, (0.25,) * 3)  # (p / 127.5 - 1 - 0.5) / 0.5
    # a saved processor wins, and what it computes from uint8 frames is (p / 255 - mean) / std
    video = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    for family, processor in (("vivit", transformers.VivitImageProcessor(do_resize=False, do_center_crop=False)),
                              ("videomae", transformers.VideoMAEImageProcessor(
                                  do_resize=False, do_center_crop=False, image_mean=[0.4, 0.5, 0.6],
                                  image_std=[0.2, 0.3, 0.25]))):
        path = tmp_path / family
        shutil.copytree(dirs[family], path)
        processor.save_pretrained(path)
        model = models.build(f"hf:{path}")
        want = processor([list(video.numpy())], return_tensors="pt")["pixel_values"][0]  # (L, 3, H, W)
        mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
        got = (video.permute(0, 3, 1, 2).float() / 255 - mean) / std
        assert (got - want).abs().max() < 1e-5
    (tmp_path / "videomae" / "preprocessor_config.json").write_text(json.dumps({"num_frames": 16}))
    with pytest.raises(ValueError, match="num_frames=16, but config.json's model takes num_frames=4"):
        models.build(f"hf:{tmp_path / 'videomae'}")


def test_another_clip_length_or_crop_is_one_error_naming_the_input(dirs):
    model = models.build(f"hf:{dirs['vivit']}")
    with pytest.raises(ValueError, match=r"takes clips of 4 frames at 32 px .* got 8 frames at 32 x 32 px: "
                                         r"use --clip-len 4 --size 32") as info:
        model(torch.zeros(1, 3, 8, 32, 32))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="takes clips of 4 frames at 32 px"):
        models.feature_shape(f"hf:{dirs['vivit']}", 4, 64)


def test_provenance_describe_weights_files_and_our_checkpoint(dirs, tmp_path, torch_one_thread):
    path = dirs["timesformer"]
    built = models.build(f"hf:{path}")
    d = models.describe(f"hf:{path}")
    assert d == {"layer": "last_hidden_state", "weights": built.weights, "mean": list(built.mean),
                 "std": list(built.std)}
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        want = built(x)
        # the same file named explicitly, or its directory
        for weights in (path / "model.safetensors", path):
            other = models.build(f"hf:{path}", weights=str(weights))
            assert other.weights == built.weights and torch.equal(other(x), want)
        # our own checkpoint (save_weights, `faster train-clip`'s model.pt)
        digest = models.save_weights(built, tmp_path / "ours.pt")
        ours = models.build(f"hf:{path}", weights=str(tmp_path / "ours.pt"))
        assert ours.weights == digest and torch.equal(ours(x), want)
    # a config without weights: a random init, deterministic in the seed
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path / "config.json", bare)
    a, b = models.build(f"hf:{bare}", seed=3), models.build(f"hf:{bare}", seed=3)
    assert a.weights == "random-init:seed=3" == models.describe(f"hf:{bare}", seed=3)["weights"]
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and not torch.equal(a(x), want)


def test_wrong_directories_and_files_are_one_line_errors(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="is not a directory"):
        models.build(f"hf:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.build(f"hf:{tmp_path / 'empty'}")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; expected one of videomae, "
                                         "timesformer, vivit"):
        models.get(f"hf:{bert}")
    with pytest.raises(ValueError, match="no such file"):
        models.build(f"hf:{dirs['vivit']}", weights=str(tmp_path / "missing.safetensors"))
    state = load_file(dirs["vivit"] / "model.safetensors")
    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in state.items() if "layernorm" not in k}, cut, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not fit .* missing keys \[.*layernorm") as info:
        models.build(f"hf:{dirs['vivit']}", weights=str(cut))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="do not (fit|load)"):  # another architecture's weights
        models.build(f"hf:{dirs['vivit']}", weights=str(dirs["videomae"] / "model.safetensors"))
    with pytest.raises(ValueError, match="names starting with 'hf:'"):
        models.register("hf:x", lambda: None)


def test_a_timesformer_runs_through_the_extraction_runner(dirs, torch_one_thread):
    """BackboneRunner lays models out channels_last_3d: TimeSformer's 2D patch convolution must survive it."""
    from faster.extract import video
    from faster.extract.runner import BackboneRunner

    name = f"hf:{dirs['timesformer']}"
    model = models.build(name)
    clips = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)  # (B, L, S, S, 3) as decoded
    with torch.no_grad():
        want = model(video.normalise_clips(clips, model.mean, model.std)).permute(0, 2, 3, 4, 1)
    runner = BackboneRunner({name: model}, "cpu", clip_len=4)
    got = runner(name, clips)
    assert got.shape == (2, 4, 2, 2, 16) and got.dtype == torch.float16
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()  # float16 rounding


def test_without_transformers_naming_one_is_a_one_line_error(dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"needs transformers .*pip install -e \"\.\[hf\]\"") as info:
        models.build(f"hf:{dirs['videomae']}")
    assert "\n" not in str(info.value)


def test_the_registry_and_non_hf_backbones_never_import_transformers():
    code = ("import sys; from faster.extract import models; models.build('r2d26_tiny'); "
            "models.describe('r2d26_tiny'); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_full_size_costs_match_the_papers(tmp_path):
    """Counted on meta tensors from a config alone: VideoMAE ViT-B 180 GFLOPs per 16 x 224 view (Tong et
    al. 2022), TimeSformer 0.59 TFLOPs per 3 views of 8 x 224 (Bertasius et al. 2021), ViViT-B/16x2 455."""
    want = {"videomae": (transformers.VideoMAEConfig(), 16, (768, 8, 14, 14), 180.34),
            "timesformer": (transformers.TimesformerConfig(), 8, (768, 8, 14, 14), 195.83),
            "vivit": (transformers.VivitConfig(), 32, (768, 16, 14, 14), 451.52)}
    for family, (config, frames, shape, gflops) in want.items():
        config.save_pretrained(tmp_path / family)
        name = f"hf:{tmp_path / family}"
        assert models.feature_shape(name, frames, 224) == shape
        assert models.clip_gflops(name, frames, 224) == pytest.approx(gflops, abs=0.01)


def test_a_model_name_with_a_path_is_one_hdf5_key():
    """hf:/a/b must not nest HDF5 groups: "/" and "%" are percent-escaped (schema.model_key), reversibly."""
    from faster.store import schema

    for name in ("hf:/models/video mae", "hf:rel/dir%2F/x", "r2d26_tiny", "100%"):
        key = schema.model_key(name)
        assert "/" not in key and schema.model_name(key) == name
        assert schema.features_key(name) == f"features/{key}" and schema.gflops_key(name) == f"gflops/{key}"
    assert schema.model_key("r2d26_tiny") == "r2d26_tiny"  # registered names are their own keys


def test_an_hf_model_extracts_fits_and_predicts_with_its_own_weights(motion_videos, tmp_path, caplog,
                                                                    torch_one_thread):
    """hf:PATH beside r2d26_tiny, each at its own sampling (VideoMAE's 4 frames x 2, R2D-26's 8 x 1):
    one dataset per model however many "/" the path holds, no random-init warning for a directory with
    weights (the provenance says so, not the option), and predict finds the directory's weights itself."""
    import logging
    from pathlib import Path

    import h5py

    import helpers

    from faster.extract.pipeline import ExtractConfig, extract_videos
    from faster.store import schema
    from faster.store.reader import FeatureSet

    name, cheap = f"hf:{_save(tmp_path / 'zoo' / 'video', 'mae', 'videomae')}", "r2d26_tiny"
    feats = tmp_path / "feats"
    with caplog.at_level(logging.WARNING, logger="faster.extract.pipeline"):
        extract_videos(ExtractConfig(str(motion_videos), str(feats), (name, cheap), clip_len=8, num_clips=2, size=32,
                                     clip_lens={name: 4}, frame_strides={name: 2}, workers=0, progress=False,
                                     seed=7))
    warned = [r.getMessage() for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert any(cheap in w for w in warned) and not any(name in w for w in warned)
    with h5py.File(next(feats.glob("shard-*.h5"))) as f:
        assert sorted(f["features"]) == sorted([schema.model_key(name), cheap])  # no nested groups
        ds = f[schema.features_key(name)]
        assert isinstance(ds, h5py.Dataset) and ds.shape[2:] == (2, 2, 2, 16)
        assert (ds.attrs["clip_len"], ds.attrs["frame_stride"]) == (4, 2)
        assert ds.attrs["weights"] == _sha(Path(name[3:]) / "model.safetensors")
    assert set(FeatureSet([str(feats)]).models) == {name, cheap}
    helpers.fit_evaluate_predict(motion_videos, feats, tmp_path, name, cheap, agg="gru", epochs=1)
