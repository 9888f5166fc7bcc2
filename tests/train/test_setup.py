import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    make_dataset,
    run_records,
    sigkill_after_validation,
    subprocess_env,
)

from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.manifest import ManifestError, read_manifest, sample_keys, write_manifest
from pipeline.extraction import run_extraction
from pipeline.model.backbone import build_backbone
from pipeline.train.launch import train
from pipeline.train.setup import MissingFeaturesError, _extract_command

FIELDS = {"epoch", "split", "loss", "dice", "iou", "cldice", "lr", "e2e", "seconds"}


def _extract(manifest, cache_dir, **kw):
    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache_dir),
                           loader_workers=0, **{"augment_copies": 0, **kw})  # no copies
    samples = read_manifest(manifest)
    return run_extraction(config, samples, sample_keys(samples))


def _config(manifest, tmp_path, **kw) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                  run_dir=str(tmp_path / "run"), epochs=2, batch_size=4, e2e_every=0,
                  loader_workers=0, overlays=2, lr=1e-3, augment_copies=0)
    values.update(kw)
    return TrainConfig(**values)


def test_missing_cache_gives_the_extraction_command(dataset, tmp_path):
    with pytest.raises(MissingFeaturesError) as info:
        train(_config(dataset, tmp_path))
    text = str(info.value)
    assert "sam3-vessel extract --data" in text and "--backbone tiny" in text
    assert "does not exist. Extract its features first:" in text
    assert "--extract-missing" in text and "Other caches" not in text  # there are none
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_cache_names_the_caches_made_otherwise_and_cache(dataset, tmp_path):
    """A cache of the same images with other levels exists: the error offers it (--cache)."""
    other = _extract(dataset, tmp_path / "cache", levels=("1x", "4x"))
    with pytest.raises(MissingFeaturesError) as info:
        train(_config(dataset, tmp_path))  # levels 1x
    lines = str(info.value).splitlines()
    assert lines[-2] == (f"Other caches in {tmp_path / 'cache'}, made with other settings "
                         "(--cache ID trains on one, with its backbone, levels and amp):")
    assert lines[-1].startswith(f"  {other.cache_id}  6 rows  tiny @252px ")
    assert lines[-1].endswith("levels=1x,4x")
    _extract(dataset, tmp_path / "cache", levels=("1x",))  # the images, no augmented copy
    with pytest.raises(MissingFeaturesError) as info:
        train(_config(dataset, tmp_path, augment_copies=1))
    samples = read_manifest(dataset)
    first = next(s for s in samples if s.is_train)
    train_rows = sum(s.is_train for s in samples)
    text = str(info.value)
    # Copies are counted apart from the images and named as copies, not as their image again.
    assert (f"lacks {train_rows} of {6 + train_rows} rows: 0 of 6 images and {train_rows} of "
            f"{train_rows} augmented copies ({first.image} (copy ") in text
    assert ("It holds the images but not the 1 augmented copies of each training image this "
            "run asks for (--augment-copies): pass --augment-copies 0 to train without "
            "them") in text
    assert "--augment-copies 1" in text  # the extraction command makes them


def test_the_extraction_command_names_every_signature_flag_that_differs(tmp_path):
    base = dict(data="m.csv", backbone="tiny", cache_dir="c", device="cpu")  # amp: off
    assert _extract_command(ExtractConfig(**base)) == (
        "sam3-vessel extract --data m.csv --backbone tiny --levels 1x --amp off "
        "--cache-dir c --device cpu")
    given = ExtractConfig(**base, checkpoint="w.pt", adapter="a", levels=("1x", "2x"),
                          cache_block=0, augment_copies=2, augment="flips", augment_seed=3,
                          workers=3)
    assert _extract_command(given) == (
        "sam3-vessel extract --data m.csv --backbone tiny --checkpoint w.pt --adapter a "
        "--levels 1x,2x --amp off --cache-block 0 --cache-dir c --augment-copies 2 "
        "--augment flips --augment-seed 3 --device cpu")
    # augment settings without copies make no cache of their own
    assert "--augment" not in _extract_command(ExtractConfig(**base, augment="flips",
                                                             augment_copies=0))


def test_run_directory_holds_every_promised_file(dataset, tmp_path):
    run = train(_config(dataset, tmp_path, extract_missing=True, epochs=2))
    for name in ("config.json", "metrics.jsonl", "best.pt", "last.pt", "report.json",
                 "curves.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "caches.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == 2
    records = run_records(run)
    assert [(r["epoch"], r["split"]) for r in records] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert all(FIELDS <= set(r) for r in records)
    report = json.loads((run / "report.json").read_text())
    assert set(report["val"]["per_view"]) == {"LAO", "RAO"}
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["signature"]["backbone"] == "tiny"


def test_train_cldice_limits_skeletons_to_the_first_training_images(dataset, tmp_path):
    _extract(dataset, tmp_path / "cache")
    none = run_records(train(_config(dataset, tmp_path, epochs=1, overlays=0, train_cldice=0)))
    some = run_records(train(_config(dataset, tmp_path, epochs=1, overlays=0, train_cldice=2,
                                  run_dir=str(tmp_path / "some"))))
    assert none[0]["split"] == "train" and none[0]["cldice"] is None
    assert none[0]["dice"] is not None and none[1]["cldice"] is not None  # val: every score
    assert some[0]["cldice"] is not None and some[0]["dice"] == none[0]["dice"]


def test_e2e_steps_update_lora_and_head_only(dataset, tmp_path):
    from torch.utils.data import DataLoader

    from pipeline.data.samples import SegmentationSamples, ViewVocabulary, split_samples
    from pipeline.model.segmenter import build_segmenter
    from pipeline.train.loop import run_epoch

    config = _config(dataset, tmp_path, lr=1e-2)
    model = build_segmenter(config, num_views=2, use_angles=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "backbone" in n
            and "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train_samples, _ = split_samples(read_manifest(dataset))
    views = ViewVocabulary.from_samples(train_samples)
    loader = DataLoader(SegmentationSamples(train_samples, resolution=252, views=views,
                                            native=config.native_training), batch_size=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    run_epoch(model, loader, torch.device("cpu"), views, optimizer=optimizer, live=True,
              show=False)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or n.startswith("decoder.") for n in with_grad)
    assert any("lora_A" in n for n in with_grad) and any("decoder.projection" in n
                                                         for n in with_grad)
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def test_training_batches_carry_small_fields_inline_from_loader_workers(dataset, tmp_path):
    """Cached and live loaders of the trainer ship index, copy, view and angles as numpy
    (pickled inline; a tensor would cross in a shared-memory file of its own)."""
    import numpy as np

    from pipeline.data.samples import SMALL_FIELDS
    from pipeline.distributed import DistributedContext
    from pipeline.train.run_data import RunData
    from pipeline.train.setup import prepare

    prepared = prepare(_config(dataset, tmp_path, extract_missing=True, loader_workers=2,
                               memory_cache_mb=0))
    data = RunData(prepared, prepared.cache, DistributedContext())
    for live in (False, True):
        batches = iter(data.train_loader(live))
        batch = next(batches)
        assert all(isinstance(batch[k], np.ndarray) for k in SMALL_FIELDS), live
        assert isinstance(batch["mask"], torch.Tensor)
        assert ("features" in batch) != live
        del batches


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(dataset, tmp_path):
    from pipeline.data.samples import (
        SegmentationSamples,
        ViewVocabulary,
        collate_samples,
        to_device,
    )
    from pipeline.model.losses import dice_bce_loss
    from pipeline.model.segmenter import build_segmenter

    samples = read_manifest(dataset)[:2]
    items = SegmentationSamples(samples, resolution=252, views=ViewVocabulary.from_samples(samples),
                                native=_config(dataset, tmp_path).native_training)
    batch = to_device(collate_samples([items[0], items[1]]), torch.device("cpu"))
    calls, grads = {}, {}
    for on in (True, False):
        torch.manual_seed(0)
        model = build_segmenter(_config(dataset, tmp_path, activation_checkpointing=on),
                                num_views=2, use_angles=False).train()
        block = model.backbone.get_base_model().vision_backbone.trunk.blocks[0]
        calls[on] = []
        block.register_forward_pre_hook(lambda *_, seen=calls[on]: seen.append(1))
        torch.manual_seed(1)  # LoRA dropout and drop-path draw the same masks in both runs
        dice_bce_loss(model(batch, live=True), batch["mask"]).backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(calls[True]) == 2 and len(calls[False]) == 1  # recomputed in the backward
    assert grads[True].keys() == grads[False].keys() and any("lora_B" in n for n in grads[True])
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], msg=name)


def test_e2e_epochs_log_drift_and_the_adapter_feeds_stage_a(dataset, tmp_path):
    # Every image trains: without val rows the last step is the best, whose adapter the run
    # keeps in adapter/. No warmup, 2 epochs of 2 steps: the detail decoder's feature
    # injections start at zero, so LoRA's gradients are zero until a step has moved them.
    rows = [{"image": s.image, "mask": s.mask, "view": s.view, "split": "train"}
            for s in read_manifest(dataset)]
    dataset = write_manifest(tmp_path / "all_train.csv", rows)
    first = _extract(dataset, tmp_path / "cache")
    run = train(_config(dataset, tmp_path, epochs=2, e2e_every=1, lr=1e-2, lora_lr=1e-2,
                        warmup=0.0, allow_empty_val=True))
    records = run_records(run)
    assert all(r["e2e"] for r in records if r["split"] == "train")
    assert all(0 < r["drift_cosine"] < 1 for r in records if r["split"] == "train")
    payload = torch.load(run / "last.pt", weights_only=False)
    assert any(v.abs().sum() > 0 for k, v in payload["lora"].items() if "lora_B" in k)
    second = _extract(dataset, tmp_path / "cache", adapter=str(run / "adapter"))
    assert second.extracted == 6 and second.cache_id != first.cache_id
    base, adapted = build_backbone("tiny"), build_backbone("tiny", adapter=run / "adapter")
    x = torch.randn(1, 3, 252, 252)
    with torch.inference_mode():
        assert not torch.allclose(base.forward_image(x)["vision_features"],
                                  adapted.forward_image(x)["vision_features"], atol=1e-4)


def test_two_experiments_share_one_cache_without_rewriting(dataset, tmp_path):
    first = _extract(dataset, tmp_path / "cache")
    chunks = {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file()}
    train(_config(dataset, tmp_path, run_dir=str(tmp_path / "a"), detail_width=4))
    train(_config(dataset, tmp_path, run_dir=str(tmp_path / "b"), crop_size=32))
    assert {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file()} == chunks
    ids = {json.loads((tmp_path / r / "config.json").read_text())["cache"]["id"] for r in "ab"}
    assert ids == {first.cache_id}


def test_refresh_cache_switches_to_the_new_adapters_cache(dataset, tmp_path):
    first = _extract(dataset, tmp_path / "cache")
    run = train(_config(dataset, tmp_path, epochs=2, e2e_every=1, refresh_cache=True, lr=1e-2,
                        lora_lr=1e-2))
    caches = json.loads((run / "caches.json").read_text())
    assert [c["step"] for c in caches] == [0, 1, 2]
    assert caches[0]["cache_id"] == first.cache_id and caches[0]["adapter_sha256"] is None
    assert len({c["cache_id"] for c in caches}) == 3
    records = [r for r in run_records(run) if r["split"] == "train"]
    assert records[1]["cache"] == caches[1]["cache_id"]


def _train_cmd(manifest, tmp_path, run_dir, *extra):
    return [sys.executable, str(REPO / "train_head.py"), "--data", str(manifest),
            "--backbone", "tiny", "--cache-dir", str(tmp_path / "cache"), "--run-dir",
            str(run_dir), "--steps", "8", "--val-every", "3", "--batch-size", "2",
            "--e2e-every", "2", "--e2e-steps", "1", "--loader-workers", "0", "--device", "cpu",
            "--augment-copies", "0", *extra]


def test_resume_after_sigkill_ends_with_the_same_metrics(dataset, tmp_path):
    _extract(dataset, tmp_path / "cache")
    env = subprocess_env()
    subprocess.run(_train_cmd(dataset, tmp_path, tmp_path / "clean"), env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    sigkill_after_validation(_train_cmd(dataset, tmp_path, killed), killed, 3, env)
    subprocess.run([sys.executable, str(REPO / "train_head.py"), "--resume", str(killed)],
                   env=env, check=True, capture_output=True)
    # Steps 1-3 cached, 4 end to end, 5-6 cached, 7-8 cached: the stream resumes mid-epoch
    # (2 batches an epoch) and the schedule at step 3.
    keep = ("step", "epoch", "split", "loss", "dice", "iou", "cldice", "lr", "lora_lr", "e2e",
            "e2e_steps")
    assert [r["step"] for r in run_records(tmp_path / "clean")] == [3, 3, 6, 6, 8, 8]
    clean = [{k: r.get(k) for k in keep} for r in run_records(tmp_path / "clean")]
    resumed = [{k: r.get(k) for k in keep} for r in run_records(killed)]
    assert clean[0]["lora_lr"] > 0 and clean[2]["e2e_steps"] == 1
    assert resumed == clean


def test_ddp_over_gloo_with_two_workers(tmp_path):
    manifest = make_dataset(tmp_path / "d", 8)
    _extract(manifest, tmp_path / "cache")
    run = train(_config(manifest, tmp_path, workers=2, device="cpu",
                        e2e_every=2, e2e_steps=1))
    records = run_records(run)
    assert [(r["epoch"], r["split"]) for r in records] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    val_rows = sum(s.split == "val" for s in read_manifest(manifest))
    assert sum(v["n"] for v in records[1]["per_view"].values()) == val_rows == 3
    assert (run / "report.json").is_file()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only


def test_demo_validation_dice_beats_trivial_baselines(tmp_path):
    import numpy as np

    from pipeline.data.images import read_mask
    from pipeline.data.samples import resize_mask

    cache_dir = tmp_path / "cache"
    run = train(TrainConfig(data="demo", backbone="tiny", cache_dir=str(cache_dir),
                            run_dir=str(tmp_path / "run"), steps=60, val_every=60, crop_size=128,
                            batch_size=8, e2e_every=0, augment_copies=0, extract_missing=True,
                            loader_workers=1, overlays=0))
    dice = json.loads((run / "report.json").read_text())["val"]["dice"]
    val = [s for s in read_manifest(cache_dir / "demo-data" / "manifest.csv") if s.split == "val"]
    fractions = [float(resize_mask(read_mask(s.mask)[0], 252).mean()) for s in val]
    all_vessel = float(np.mean([2 * p / (1 + p) for p in fractions]))  # Dice of predicting 1s
    all_background = 0.0  # every demo mask has vessels
    assert all(p > 0 for p in fractions)
    assert dice > max(all_vessel, all_background) + 0.3, (dice, all_vessel)


def test_torchrun_ranks_train_one_run(dataset, tmp_path):
    _extract(dataset, tmp_path / "cache")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = _train_cmd(dataset, tmp_path, tmp_path / "run")[1:]
    command[command.index("--steps") + 1] = "2"
    command[command.index("--val-every") + 1] = "1"
    result = subprocess.run([torchrun, "--nproc-per-node", "2", *command],
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = run_records(tmp_path / "run")
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run"]


def test_without_validation_rows_the_last_epoch_is_kept(tmp_path):
    from pipeline.data.manifest import write_manifest

    source = make_dataset(tmp_path / "d", 4)
    manifest = write_manifest(tmp_path / "train_only.csv", [
        {"image": s.image, "mask": s.mask, "view": s.view, "split": "train"}
        for s in read_manifest(source)])
    with pytest.raises(ManifestError, match="no validation rows.*--allow-empty-val"):
        train(_config(manifest, tmp_path, extract_missing=True, overlays=0))
    run = train(_config(manifest, tmp_path, extract_missing=True, overlays=0,
                        allow_empty_val=True))
    assert [r["split"] for r in run_records(run)] == ["train", "train"]
    assert torch.load(run / "best.pt", weights_only=False)["state"]["best"]["step"] == 2


def test_a_run_from_before_a_field_existed_is_read_with_the_value_it_used(tmp_path):
    from dataclasses import asdict

    from pipeline.train.setup import FIELDS_ADDED, resume_config

    # config.json of a run made before --image-channels (so before the detail decoder too)
    config = asdict(TrainConfig(device="cpu", backbone="tiny", decoder="legacy"))
    del config["image_channels"]
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    (tmp_path / "last.pt").write_bytes(b"")
    assert resume_config(tmp_path).image_channels == FIELDS_ADDED["image_channels"] == 16
    assert TrainConfig(device="cpu").image_channels == 32  # what a new run gets
    del config["decoder"]  # ... and before the detail decoder: it keeps the legacy one
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    assert resume_config(tmp_path).decoder == FIELDS_ADDED["decoder"] == "legacy"
    assert TrainConfig(device="cpu").decoder == "detail"


def test_a_legacy_run_resumes_whatever_it_recorded_for_the_detail_decoders_fields(tmp_path):
    """A legacy-decoder run recorded the detail decoder's fields at their defaults of the day;
    a changed default (mirror_tta was off when it was added) must not make it unresumable."""
    from dataclasses import asdict

    from pipeline.train.setup import resume_config

    config = asdict(TrainConfig(device="cpu", backbone="tiny", decoder="legacy"))
    config.update(mirror_tta=False, crop_size=192, tile_size=1024)
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    (tmp_path / "last.pt").write_bytes(b"")
    resumed = resume_config(tmp_path)
    assert resumed.decoder == "legacy"
    assert (resumed.mirror_tta, resumed.crop_size) == (TrainConfig.mirror_tta,
                                                       TrainConfig.crop_size)
    with pytest.raises(ValueError, match="--mirror-tta.*only --decoder detail reads"):
        TrainConfig(**{**config, "levels": tuple(config["levels"]),
                       "gpus": tuple(config["gpus"])})
