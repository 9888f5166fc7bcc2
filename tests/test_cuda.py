"""The CUDA paths on the tiny backbone (skipped without a GPU; `bench/device/smoke.sh` runs them
on a lent one): autocast dtype, pinned host batches, where every part of the model lives, and
both stages, predict and a split cache end to end on the GPU.

`GPU_TESTS_ON_CPU=1 pytest tests/test_cuda.py` runs them on the CPU instead (what needs a GPU,
pinned memory, is left out): a check, before spending GPU time, that they still fit the code.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, make_dataset, run_records, subprocess_env
from PIL import Image

from pipeline.cache.store import FeatureCache
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.manifest import read_manifest, sample_keys
from pipeline.distributed import DistributedContext
from pipeline.extraction import run_extraction
from pipeline.model.backbone import amp_autocast, build_backbone, image_features
from pipeline.model.segmenter import build_segmenter
from pipeline.predict import predict
from pipeline.train.launch import train
from pipeline.train.run_data import RunData
from pipeline.train.setup import prepare
from pipeline.train.steps import build_optimizer

ON_CPU = os.environ.get("GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()),
                                 reason="needs a CUDA device (or GPU_TESTS_ON_CPU=1)")]
CUDA = torch.device("cpu") if ON_CPU else torch.device("cuda", 0)
PLACE = {"device": "cpu"} if ON_CPU else {"device": "cuda", "gpus": (0,)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_backbone_runs_in_bf16_under_autocast_and_matches_fp32_on_the_cpu():
    backbone = build_backbone("tiny")
    images = torch.rand(2, 3, 252, 252, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        reference = image_features(backbone, images, ("1x", "4x"))
        backbone = backbone.to(CUDA)
        with amp_autocast("bf16", CUDA):
            out = image_features(backbone, images.to(CUDA), ("1x", "4x"))
    for level in ("1x", "4x"):
        assert out[level].device == CUDA and out[level].dtype == torch.bfloat16
        assert torch.isfinite(out[level]).all()
        assert _relative(out[level], reference[level]) < 3e-2  # bf16 operands: 1e-3 to 1e-2


def test_extraction_on_the_gpu_fills_the_cache_as_the_cpu_does(tmp_path):
    manifest = make_dataset(tmp_path / "data", 6)
    samples = read_manifest(manifest)
    stores = {}
    for device, amp in ((CUDA.type, "bf16"), ("cpu", "off")):
        config = ExtractConfig(data=str(manifest), backbone="tiny", device=device, amp=amp,
                               cache_dir=str(tmp_path / "cache"), batch_size=4,
                               loader_workers=2, augment_copies=0, levels=("1x", "2x"))
        summary = run_extraction(config, samples, sample_keys(samples))
        assert (summary.extracted, summary.reused) == (6, 0)
        stores[amp] = FeatureCache.open(summary.path)
    assert stores["bf16"].path != stores["off"].path  # amp is part of the signature
    rows = {a: s.rows_for(sample_keys(samples)) for a, s in stores.items()}
    for i in range(len(samples)):
        gpu = stores["bf16"].read(int(rows["bf16"][i]), ["1x", "2x"])
        cpu = stores["off"].read(int(rows["off"][i]), ["1x", "2x"])
        for level in ("1x", "2x"):
            assert gpu[level].dtype == np.float16
            assert _relative(torch.from_numpy(gpu[level]), torch.from_numpy(cpu[level])) < 3e-2


def _config(tmp_path, manifest, **overrides) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", **PLACE,
                  cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"),
                  batch_size=4, loader_workers=0, augment_copies=1, overlays=2,
                  extract_missing=True, tensorboard=False)
    return TrainConfig(**{**values, **overrides})


def test_every_part_of_the_model_and_its_optimizer_state_live_on_the_gpu(tmp_path):
    config = _config(tmp_path, "unused.csv")
    model = build_segmenter(config, num_views=3, use_angles=False).to(CUDA)
    elsewhere = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.device != CUDA]
    assert not elsewhere
    optimizer = build_optimizer(model, config)
    image = torch.randint(0, 256, (2, 3, 252, 252), dtype=torch.uint8).to(CUDA)
    pixels = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8).to(CUDA)
    batch = {"image": image, "view": torch.tensor([0, 2], device=CUDA), "pixels": pixels,
             "box": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], device=CUDA),
             "mask": torch.zeros(2, 1, 96, 96, device=CUDA)}
    model.train()
    logits = model(batch, live=True)  # end to end: the LoRA'd trunk under autocast
    assert logits.device == CUDA and logits.shape[-2:] == (96, 96)  # the detail decoder's
    torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["mask"]).backward()
    optimizer.step()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is not None and p.grad.device == CUDA and torch.isfinite(p.grad).all()
               for p in trained if p.grad is not None)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
              and t.dim() > 0]
    assert states and all(t.device == CUDA for t in states)


def test_training_batches_come_pinned_so_their_copies_overlap(tmp_path):
    manifest = make_dataset(tmp_path / "data", 6)
    prepared = prepare(_config(tmp_path, manifest, memory_cache_mb=0, loader_workers=1))
    data = RunData(prepared, prepared.cache, DistributedContext())
    for live in (False, True):
        batch = next(iter(data.train_loader(live)))
        tensors = [batch["mask"], batch["pixels"],
                   *(batch["features"].values() if not live else [batch["image"]])]
        assert ON_CPU or all(t.is_pinned() for t in tensors)


@pytest.mark.parametrize("cache_block", [None, 1])
def test_train_end_to_end_then_predict_on_the_gpu_and_on_the_cpu(tmp_path, cache_block):
    manifest = make_dataset(tmp_path / "data", 8)
    run_dir = train(_config(tmp_path, manifest, steps=6, val_every=2, e2e_every=2,
                            e2e_steps=1, cache_block=cache_block))
    records = run_records(run_dir)
    trained = [r for r in records if r["split"] == "train"]
    assert [r["e2e"] for r in trained] == [False, True, False]
    assert all((ON_CPU or r["gpu_mem_gb"] > 0) and np.isfinite(r["loss"]) for r in trained)
    assert json.loads((run_dir / "report.json").read_text())
    # A run trained on the GPU predicts on the GPU and on a machine without one alike.
    masks = []
    for i, device in enumerate((CUDA.type, "cpu")):
        out = tmp_path / f"predict-{i}"
        rows = predict(run_dir, manifest, out, device=device, batch_size=4, loader_workers=0,
                       overlays=0)
        assert len(rows) == 8
        masks.append({p.name: np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))})
    gpu, cpu = masks
    assert gpu.keys() == cpu.keys() and gpu
    agree = np.mean([np.mean(gpu[k] == cpu[k]) for k in gpu])
    assert agree > 0.95  # bf16 kernels of two devices: pixels at the threshold may differ


def test_a_run_exits_as_soon_as_it_is_done(tmp_path):
    """Persistent loader workers that pin batches are joined for 5 s each at interpreter exit
    unless the run ends them (pytorch#81794): 4 loaders of 4 workers would keep the finished
    process 80 s."""
    manifest = make_dataset(tmp_path / "data", 8)
    command = [sys.executable, str(REPO / "train_head.py"), "--data", str(manifest),
               "--backbone", "tiny", *(["--device", "cpu"] if ON_CPU else ["--gpus", "0"]),
               "--cache-dir", str(tmp_path / "cache"),
               "--run-dir", str(tmp_path / "run"), "--steps", "4", "--val-every", "2",
               "--e2e-every", "2", "--batch-size", "2", "--loader-workers", "4",
               "--memory-cache-mb", "0", "--extract-missing", "--no-tensorboard"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=subprocess_env(), cwd=tmp_path)
    done = None
    for line in process.stdout:
        if line.startswith("run directory:"):
            done = time.monotonic()
    process.wait(timeout=120)
    assert process.returncode == 0 and done is not None
    assert time.monotonic() - done < 15
