"""Start-up (issue [22] item 1): a default extract starts decode workers that import no torch, and
starts them before it builds the backbones, so the first videos decode while the models load."""
from faster.extract import decoders, pipeline


def test_a_default_extract_starts_torch_free_workers_before_building_the_models(motion_videos, tmp_path, monkeypatch):
    pools, pools_at_load = [], []

    class Recording(decoders.DecodePool):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            pools.append(self)

    load = pipeline.ClipModels.load

    def recording_load(self):
        pools_at_load.append(len(pools))
        return load(self)

    monkeypatch.setattr(pipeline, "DecodePool", Recording)
    monkeypatch.setattr(pipeline.ClipModels, "load", recording_load)
    cfg = pipeline.ExtractConfig(str(motion_videos), str(tmp_path / "feats"), ("r2d26_tiny",), num_clips=2, size=32,
                                 progress=False, dtype="fp32")
    assert cfg.workers == 2  # the default
    summary = pipeline.extract_videos(cfg)
    assert summary["extracted"] == 4 and summary["failed"] == 0
    assert len(pools) == 1 and pools_at_load[0] == 1  # the workers existed when the models were first loaded
    infos = [slot.info for slot in pools[0].slots]  # {} for a worker still starting when the others were done
    assert len(infos) == 2 and any(infos) and all(info["torch"] is False for info in infos if info), infos


def test_predict_starts_its_decode_workers_before_building_the_backbones(motion_videos, tmp_path, monkeypatch):
    from faster import predict as predict_module
    from faster.aggregate.fit import FitConfig, fit

    feats, run = tmp_path / "feats", tmp_path / "run"
    pipeline.extract_videos(pipeline.ExtractConfig(str(motion_videos), str(feats), ("r2plus1d50_tiny", "r2d26_tiny"),
                                                   num_clips=2, size=32, workers=0, progress=False))
    fit(FitConfig([str(feats)], str(run), "fastgru", "r2plus1d50_tiny", "r2d26_tiny", "1:1", epochs=1, batch_size=2,
                  workers=0, progress=False, val_fraction=0.5))
    events = []

    class Recording(decoders.DecodePool):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            events.append(("pool", self))

    build = predict_module.Predictor._build_backbone

    def recording_build(self, name, given):
        events.append(("build", name))
        return build(self, name, given)

    monkeypatch.setattr(decoders, "DecodePool", Recording)
    monkeypatch.setattr(predict_module.Predictor, "_build_backbone", recording_build)
    summary = predict_module.predict(predict_module.PredictConfig(videos=[str(motion_videos)], run=str(run),
                                                                  out=str(tmp_path / "p.jsonl"), progress=False))
    assert summary.predicted == 4 and summary.failed == 0
    assert [e[0] for e in events] == ["pool", "build", "build"]  # the workers first, then both backbones
    pool = events[0][1]
    assert pool.slots[0].info and pool.slots[0].info["torch"] is False
