"""The step budget: warm-up + cosine schedule, parameter groups, the cycling batch stream, and a
run given only --data training the steps the rule says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import pipeline.config as config_module
from pipeline.config import TrainConfig, default_steps
from pipeline.model.segmenter import build_segmenter
from pipeline.train.steps import (
    BatchStream,
    EpochSampler,
    build_optimizer,
    build_scheduler,
    lr_factor,
    parameter_groups,
    warmup_steps,
)


def test_warmup_then_cosine_values():
    total, warm = 100, warmup_steps(100, 0.05)
    assert warm == 5
    assert [lr_factor(s, total, warm) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_factor(5, total, warm) == 1.0  # the cosine starts at its top
    halfway = 5 + (total - 5) / 2
    assert lr_factor(int(halfway), total, warm) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(halfway) - 5) / 95)))
    assert lr_factor(total, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert warmup_steps(100, 0.0) == 0 and lr_factor(0, 100, 0) == 1.0
    assert warmup_steps(3, 0.05) == 1  # never a zero-length warm-up when asked for one


def _model(**kw):
    config = TrainConfig(device="cpu", backbone="tiny", **kw)
    return config, build_segmenter(config, num_views=2, use_angles=False)


def test_parameter_groups_split_head_and_lora_with_their_rates():
    config, model = _model(lr=3e-3, lora_lr=2e-4)
    head, lora = parameter_groups(model, config)
    assert (head["name"], head["lr"], lora["name"], lora["lr"]) == ("head", 3e-3, "lora", 2e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("decoder.") for p in head["params"])
    assert any("conditioning.embedding" in names[id(p)] for p in head["params"])
    assert any("projection" in names[id(p)] for p in head["params"])
    assert lora["params"] and all("lora_" in names[id(p)] for p in lora["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in head["params"] + lora["params"]} == trainable


def test_scheduler_moves_both_groups_by_the_same_factor():
    config, model = _model(lr=1e-3, lora_lr=1e-4)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, total=10, warmup=2)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, (head, lora) in enumerate(seen):
        factor = lr_factor(step, 10, 2)
        assert head == pytest.approx(1e-3 * factor) and lora == pytest.approx(1e-4 * factor)
    assert seen[0] == pytest.approx([5e-4, 5e-5])  # warm-up: half the rate at the first step


class _Numbers(Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (i, self.epoch)


def _stream(n=5, batch=2):
    dataset = _Numbers(n)
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, seed=0, batch_size=batch)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler)
    return BatchStream(sampler, {False: dataset, True: dataset}, lambda live: loader)


def test_stream_cycles_epochs_and_resumes_mid_epoch():
    stream = _stream()
    batches = [(b[0].tolist(), b[1].tolist()) for b in stream.take(7, live=False)]
    # 5 samples at batch 2: 3 batches an epoch (the last short), each epoch its own order.
    assert [len(ids) for ids, _ in batches] == [2, 2, 1, 2, 2, 1, 2]
    assert [epochs[0] for _, epochs in batches] == [0, 0, 0, 1, 1, 1, 2]
    for first in (0, 3):
        assert sorted(sum((ids for ids, _ in batches[first:first + 3]), [])) == list(range(5))
    assert [ids for ids, _ in batches[:3]] != [ids for ids, _ in batches[3:6]]
    assert stream.position == {"epoch": 2, "offset": 1}
    again = _stream()
    head = [b[0].tolist() for b in again.take(4, live=False)]
    resumed = _stream()
    resumed.seek(again.position)
    tail = [b[0].tolist() for b in resumed.take(3, live=True)]
    assert head + tail == [ids for ids, _ in batches]


def test_a_run_given_only_data_trains_the_rules_steps(tmp_path, monkeypatch):
    """The budget of `default_steps`, its constants lowered (floor 600 -> 5 steps, 20 -> 2
    epochs) to keep the test seconds long; the rule itself is checked in test_config."""
    from conftest import make_dataset

    from pipeline.train.launch import train

    monkeypatch.setattr(config_module, "MIN_STEPS", 5)
    monkeypatch.setattr(config_module, "DEFAULT_EPOCHS", 2)
    manifest = make_dataset(tmp_path / "d", 6)
    config = TrainConfig(data=str(manifest), backbone="tiny", device="cpu",
                         cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run"),
                         extract_missing=True, overlays=0)
    assert config.steps is None and config.epochs is None
    run = train(config)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert default_steps(4, 16) == 5 and steps[-1] >= 5
    assert steps == list(range(1, 6))  # 5 // 15 -> a validation every step
    assert sum(r["steps"] for r in records if r["split"] == "train") == 5
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["lr"], saved["lora_lr"]) == (3e-3, 1e-4)
    payload = torch.load(run / "last.pt", weights_only=False)
    assert payload["state"]["step"] == 5 and payload["scheduler"]["last_epoch"] == 5
    assert [g["lr"] for g in payload["optimizer"]["param_groups"]] == pytest.approx(
        [3e-3 * lr_factor(5, 5, 1), 1e-4 * lr_factor(5, 5, 1)])
    assert [r["e2e"] for r in records if r["split"] == "train"] == [False] * 4 + [True]
