import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from pipeline.config import TrainConfig
from pipeline.train.launch import train
from pipeline.train.tensorboard_log import TensorBoardLog, record_step, scalar_fields


def _events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0,
                                                           "tensors": 0})
    events.Reload()
    return events


def _config(manifest, tmp_path, **kw) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                  run_dir=str(tmp_path / "run"), epochs=2, batch_size=4, e2e_every=0,
                  loader_workers=0, overlays=2, lr=1e-3, extract_missing=True)
    values.update(kw)
    return TrainConfig(**values)


def test_a_run_logs_every_score_overlays_config_and_hparams(dataset, tmp_path):
    run = train(_config(dataset, tmp_path))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = _events(run / "tensorboard")
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/data_wait", "train/samples_per_s", "train/dice",
                "val/loss", "val/dice", "val/iou", "val/cldice", "val/per_view/LAO/dice",
                "val/per_view/RAO/cldice"):
        assert tag in tags["scalars"], tag
    for record in records:  # every value as metrics.jsonl holds it, at its epoch
        split = record["split"]
        for name in ("loss", "dice", "lr"):
            logged = {e.step: e.value for e in events.Scalars(f"{split}/{name}")}
            assert logged[record["epoch"]] == pytest.approx(record[name], rel=1e-6)
        view = events.Scalars(f"{split}/per_view/LAO/iou")
        assert {e.step: e.value for e in view}[record["epoch"]] == pytest.approx(
            record["per_view"]["LAO"]["iou"], rel=1e-6)
    # Two overlays at each of the two validations: image | truth | prediction | errors.
    assert len(tags["images"]) == 2
    for tag in tags["images"]:
        shots = events.Images(tag)
        assert [s.step for s in shots] == [1, 2]
        assert (shots[0].width, shots[0].height) == (4 * 252, 252)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip("`\n"))["lr"] == 1e-3
    report = json.loads((run / "report.json").read_text())["val"]
    best = {e.step: e.value for e in events.Scalars("best/dice")}
    assert best[0] == pytest.approx(report["dice"], rel=1e-6)
    assert events.Scalars("best/step")[0].value == report["step"]
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} >= {"best/dice", "best/iou"}
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["lr"].number_value == 1e-3
    assert session.hparams["levels"].string_value == '["1x"]'


def test_no_tensorboard_writes_no_event_files(dataset, tmp_path):
    run = train(_config(dataset, tmp_path, epochs=1, overlays=0, tensorboard=False))
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()


def test_records_log_every_number_at_their_step(tmp_path):
    """A score the logger has never heard of appears; `step` wins over `epoch`; null, NaN and
    strings are left out."""
    log = TensorBoardLog(tmp_path, {"lr": 0.1, "levels": ("1x",)})
    log.record({"step": 40, "epoch": 2, "split": "val", "sensitivity": 0.5, "dice": None,
                "auc": float("nan"), "cache": "tiny-x", "per_view": {"A": {"specificity": 0.9}}})
    log.record({"epoch": 3, "split": "train", "loss": 1.5, "e2e": True, "drift_cosine": 0.75})
    log.overlays(40, np.zeros((1, 3, 8, 8), np.float32), np.ones((1, 8, 8), bool),
                 np.zeros((1, 8, 8), bool), ["a.png"])
    log.close()
    events = _events(log.log_dir)
    assert sorted(events.Tags()["scalars"]) == [
        "train/drift_cosine", "train/e2e", "train/loss", "val/per_view/A/specificity",
        "val/sensitivity"]
    assert [(e.step, e.value) for e in events.Scalars("val/sensitivity")] == [(40, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("train/e2e")] == [(3, 1.0)]
    assert [e.step for e in events.Images("overlays/a.png")] == [40]


def test_scalar_fields_and_step():
    record = {"epoch": 4, "split": "val", "dice": 0.5, "n": 3, "x": math.inf, "e2e": False}
    assert scalar_fields(record) == {"dice": 0.5, "n": 3.0, "e2e": 0.0}
    assert record_step(record) == 4 and record_step({"step": 7, "epoch": 1}) == 7
