"""A split cache (`--cache-block K`): the trunk's tokens after block K in the cache, LoRA after K
trained at every Stage B step, across extraction, training, predict, resume, DDP and refresh."""

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO, make_dataset, run_records, sigkill_after_validation, subprocess_env
from safetensors.torch import load_file

from pipeline.cache.store import FeatureCache
from pipeline.cli import predict_main
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.data.images import load_preprocessed
from pipeline.data.manifest import read_manifest, sample_keys, write_manifest
from pipeline.extraction import cache_signature, run_extraction
from pipeline.model.backbone import build_backbone, token_level
from pipeline.train.launch import train

K = 1  # tiny: blocks 0..3, global attention in 1 and 3


def _extract(manifest, cache_dir, **kw):
    config = ExtractConfig(data=str(manifest), backbone="tiny", cache_dir=str(cache_dir),
                           batch_size=2, loader_workers=0,
                           **{"augment_copies": 0, **kw})  # cache mechanics: no copies
    samples = read_manifest(manifest)
    return run_extraction(config, samples, sample_keys(samples))


def _config(manifest, tmp_path, **kw) -> TrainConfig:
    values = dict(data=str(manifest), backbone="tiny", cache_dir=str(tmp_path / "cache"),
                  run_dir=str(tmp_path / "run"), epochs=2, batch_size=4, e2e_every=0,
                  loader_workers=0, overlays=1, lr=1e-2, cache_block=K, device="cpu",
                  augment_copies=0)
    values.update(kw)
    return TrainConfig(**values)


def _files(path):
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in path.rglob("*") if p.is_file()}


def _lora_blocks(weights, nonzero_b: bool) -> set[int]:
    """Blocks holding lora_B matrices (non-zero ones only with `nonzero_b`) in an adapter
    directory or a LoRA state dict."""
    if not isinstance(weights, dict):
        weights = load_file(str(weights / "adapter_model.safetensors"))
    return {int(name.split("trunk.blocks.")[1].split(".")[0]) for name, value in weights.items()
            if "lora_B" in name and (not nonzero_b or bool(value.abs().sum() > 0))}


def test_split_cache_stores_tokens_that_give_forward_image(dataset, tmp_path):
    """The stored level is the trunk's tokens after K (float16, channels last, shape in the
    cache); through the rest of the trunk they give forward_image up to float16 rounding."""
    summary = _extract(dataset, tmp_path / "cache", cache_block=K)
    cache = FeatureCache.open(summary.path)
    assert cache.levels == [token_level(K)] and cache.level_shape(token_level(K)) == (18, 18, 64)
    assert cache.signature["cache_block"] == K and cache.signature["levels"] == ["block1"]
    import zarr

    plain = zarr.open_group(summary.path, mode="r")["features/block1"]
    assert plain.shape == (6, 18, 18, 64) and plain.dtype == np.float16
    from pipeline.model.segmenter import build_segmenter

    model = build_segmenter(_config(dataset, tmp_path), num_views=2, use_angles=False).eval()
    backbone = build_backbone("tiny")
    samples = read_manifest(dataset)
    rows = cache.rows_for(sample_keys(samples))
    for sample, row in zip(samples, rows, strict=True):
        tokens = torch.from_numpy(cache.read(int(row))[token_level(K)])[None]
        with torch.inference_mode():
            expected = backbone.forward_image(load_preprocessed(sample.image, 252)[None])
            got = model.cached_features({token_level(K): tokens})["1x"]  # fresh LoRA: B = 0
        error = (got - expected["vision_features"]).norm() / expected["vision_features"].norm()
        assert float(error) < 2e-3  # float16 storage of the tokens


def test_split_steps_train_lora_after_k_and_the_head_only(dataset, tmp_path):
    from pipeline.distributed import DistributedContext
    from pipeline.model.segmenter import build_segmenter
    from pipeline.train.loop import run_epoch
    from pipeline.train.run_data import RunData
    from pipeline.train.setup import prepare

    prepared = prepare(_config(dataset, tmp_path, extract_missing=True))
    data = RunData(prepared, prepared.cache, DistributedContext())
    model = build_segmenter(prepared.config, num_views=2, use_angles=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("backbone.") and "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".blocks.2." in n or ".blocks.3." in n for n in lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # two passes over the training set
        run_epoch(model, data.train_loader(live=False), torch.device("cpu"),
                  prepared.views, optimizer=optimizer, show=False)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(lora) | {n for n, _ in model.named_parameters()
                                     if n.startswith("decoder.")}
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters()
               if n in lora and "lora_B" in n)


def test_experiments_with_other_lora_after_k_share_one_cache(dataset, tmp_path):
    first = _extract(dataset, tmp_path / "cache", cache_block=K)
    before = _files(first.path)
    a = train(_config(dataset, tmp_path, run_dir=str(tmp_path / "a"), epochs=1, lora_r=4))
    b = train(_config(dataset, tmp_path, run_dir=str(tmp_path / "b"), epochs=1, lora_r=8,
                      lora_alpha=8, seed=3))
    assert _files(first.path) == before
    ids = {json.loads((run / "config.json").read_text())["cache"]["id"] for run in (a, b)}
    assert ids == {first.cache_id}
    # A trained adapter after K is no part of the split cache's signature either.
    again = _extract(dataset, tmp_path / "cache", cache_block=K, adapter=str(a / "adapter"))
    assert (again.cache_id, again.extracted) == (first.cache_id, 0)
    assert _files(first.path) == before
    # Without a split the same adapter feeds Stage A as any adapter does.
    levels = _extract(dataset, tmp_path / "cache", adapter=str(a / "adapter"))
    assert levels.extracted == 6 and FeatureCache.open(levels.path).signature["adapter_sha256"]


def test_split_cache_and_level_cache_of_the_same_images_coexist(dataset, tmp_path):
    split = _extract(dataset, tmp_path / "cache", cache_block=K)
    levels = _extract(dataset, tmp_path / "cache")
    other = _extract(dataset, tmp_path / "cache", cache_block=2)
    assert len({split.cache_id, levels.cache_id, other.cache_id}) == 3
    assert FeatureCache.open(split.path).levels == ["block1"]
    assert FeatureCache.open(levels.path).levels == ["1x"]
    assert FeatureCache.open(other.path).levels == ["block2"]
    assert all(FeatureCache.open(s.path).done().all() for s in (split, levels, other))


def test_adapter_reaching_k_or_earlier_is_in_the_signature(dataset, tmp_path):
    from pipeline.model.lora import attach_lora

    model = attach_lora(build_backbone("tiny"), r=4)  # every block
    model.save_pretrained(tmp_path / "adapter")
    plain = cache_signature(ExtractConfig(backbone="tiny", cache_block=K))
    adapted = cache_signature(ExtractConfig(backbone="tiny", cache_block=K,
                                            adapter=str(tmp_path / "adapter")))
    assert plain["adapter_sha256"] is None and adapted["adapter_sha256"] is not None
    assert "cache_block" not in cache_signature(ExtractConfig(backbone="tiny"))


def test_cli_extract_then_train_with_cache_block(dataset, tmp_path):
    # Every image trains: without val rows the last step is the best, whose adapter the run
    # keeps (the detail decoder's feature injections start at zero: step 1 leaves LoRA's B at 0).
    dataset = write_manifest(tmp_path / "all_train.csv", [
        {"image": s.image, "mask": s.mask, "view": s.view, "split": "train"}
        for s in read_manifest(dataset)])
    env, run = subprocess_env(), tmp_path / "run"
    common = ["--data", str(dataset), "--backbone", "tiny", "--cache-dir", str(tmp_path / "c"),
              "--device", "cpu", "--cache-block", "1", "--loader-workers", "0",
              "--augment-copies", "0"]
    subprocess.run([sys.executable, str(REPO / "extract_features.py"), *common], env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "train_head.py"), *common, "--run-dir", str(run),
                    "--epochs", "2", "--batch-size", "4", "--e2e-every", "0", "--lr", "1e-2",
                    "--warmup", "0", "--allow-empty-val"],
                   env=env, check=True, capture_output=True)
    assert (run / "report.json").is_file()
    assert _lora_blocks(run / "adapter", nonzero_b=True) == {2, 3}
    assert _lora_blocks(run / "adapter", nonzero_b=False) == {2, 3}  # none in blocks 0 and 1
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["cache_block"] == 1 and config["cache"]["signature"]["cache_block"] == 1
    assert not any(r["e2e"] for r in run_records(run))  # validation from the cache every epoch


def test_predict_with_a_split_cache_reads_its_tokens(dataset, tmp_path):
    run = train(_config(dataset, tmp_path, extract_missing=True, epochs=1, overlays=0))
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run), "--data", str(dataset), "--out", str(out),
                         "--device", "cpu", "--loader-workers", "0"]) == 0
    assert _feature_sources(out) == ["cached"] * 6
    fresh = make_dataset(tmp_path / "new", 2, seed=7, start=50)
    assert predict_main(["--run", str(run), "--data", str(fresh), "--out", str(tmp_path / "n"),
                         "--device", "cpu", "--loader-workers", "0"]) == 0
    assert _feature_sources(tmp_path / "n") == ["live"] * 2


def _feature_sources(out) -> list[str]:
    import csv

    with (out / "predictions.csv").open() as handle:
        return [row["features"] for row in csv.DictReader(handle)]


def test_resume_after_sigkill_with_a_split_cache_ends_with_the_same_metrics(dataset, tmp_path):
    env = subprocess_env()
    _extract(dataset, tmp_path / "cache", cache_block=K)

    def command(run_dir):
        return [sys.executable, str(REPO / "train_head.py"), "--data", str(dataset),
                "--backbone", "tiny", "--cache-dir", str(tmp_path / "cache"), "--run-dir",
                str(run_dir), "--epochs", "3", "--batch-size", "4", "--e2e-every", "0",
                "--cache-block", str(K), "--loader-workers", "0", "--lr", "1e-2",
                "--device", "cpu", "--overlays", "0", "--augment-copies", "0"]

    subprocess.run(command(tmp_path / "clean"), env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    sigkill_after_validation(command(killed), killed, 1, env)
    subprocess.run([sys.executable, str(REPO / "train_head.py"), "--resume", str(killed)],
                   env=env, check=True, capture_output=True)
    keep = ("epoch", "split", "loss", "dice", "iou", "lr", "e2e")
    assert {r["cache"] for r in run_records(killed) if r["split"] == "train"} == {
        r["cache"] for r in run_records(tmp_path / "clean") if r["split"] == "train"}
    assert ([{k: r[k] for k in keep} for r in run_records(killed)]
            == [{k: r[k] for k in keep} for r in run_records(tmp_path / "clean")])


def test_ddp_over_gloo_with_a_split_cache(tmp_path):
    manifest = make_dataset(tmp_path / "d", 8)
    run = train(_config(manifest, tmp_path, extract_missing=True, workers=2, epochs=1,
                        overlays=0))
    records = run_records(run)
    assert [(r["epoch"], r["split"]) for r in records] == [(1, "train"), (1, "val")]
    assert sum(v["n"] for v in records[1]["per_view"].values()) == 3
    assert _lora_blocks(run / "adapter", nonzero_b=True) == {2, 3}


def test_e2e_epochs_with_a_split_train_every_block_and_refresh_the_split_cache(dataset,
                                                                              tmp_path):
    """With --e2e-every, LoRA sits in every block: blocks up to K learn end to end only, the
    split cache goes stale (drift, live validation) and --refresh-cache re-extracts it."""
    run = train(_config(dataset, tmp_path, extract_missing=True, epochs=2, e2e_every=2,
                        refresh_cache=True, overlays=0))
    records = [r for r in run_records(run) if r["split"] == "train"]
    assert [r["e2e"] for r in records] == [False, True]
    assert 0 < records[1]["drift_cosine"] < 1
    caches = json.loads((run / "caches.json").read_text())
    assert len({c["cache_id"] for c in caches}) == 2 and caches[1]["adapter_sha256"]
    refreshed = FeatureCache.open(tmp_path / "cache" / f"{caches[1]['cache_id']}.zarr")
    assert refreshed.signature["cache_block"] == K and refreshed.levels == ["block1"]
    last = torch.load(run / "last.pt", weights_only=False)["lora"]
    assert _lora_blocks(last, nonzero_b=True) == {0, 1, 2, 3}
