"""The step budget of Stage B: parameter groups, warm-up + cosine schedule, and batch streams
that cycle over epochs of the sampler inside the step loop.

A run counts optimizer steps, not epochs (`TrainConfig.total_steps`): a 14-image set at batch
16 has one step an epoch, so an epoch budget either never converges there or is absurd on
50 000 images. The schedule and the stream positions are plain integers saved in every
checkpoint, so `--resume` continues at the same step, learning rate and sample order.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler, Sampler


def parameter_groups(model, config) -> list[dict]:
    """AdamW groups: "head" (decoder, feature projection, view embedding) at `config.lr`, "lora"
    (the adapter's trainable weights) at `config.lora_lr`. Every trainable parameter is in
    exactly one group; anything else trainable is an error."""
    head = [p for p in model.decoder.parameters() if p.requires_grad]
    lora = [p for p in model.backbone.parameters() if p.requires_grad]
    grouped = {id(p) for p in head + lora}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise ValueError(f"trainable parameters outside the decoder and LoRA: {stray[:5]}")
    return [{"name": "head", "params": head, "lr": config.lr},
            {"name": "lora", "params": lora, "lr": config.lora_lr}]


def build_optimizer(model, config) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` with `config.weight_decay`."""
    return torch.optim.AdamW(parameter_groups(model, config), weight_decay=config.weight_decay)


def warmup_steps(total: int, warmup: float) -> int:
    """Steps of the linear warm-up: `warmup` of `total`, rounded, at least 1 when warmup > 0."""
    return max(1, round(warmup * total)) if warmup > 0 else 0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of each group's base learning rate at optimizer step `step` (0-based):
    (step + 1) / warmup during the warm-up, then cosine from 1 to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; its `last_epoch` is the step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


class EpochSampler(Sampler):
    """`DistributedSampler`'s shuffled order of epoch `epoch`, from batch `offset` on.

    Set `epoch` and `offset` before each `iter(loader)`: a DataLoader with persistent workers
    keeps its sampler object and asks it again for each pass.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int, batch_size: int):
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                        shuffle=True, seed=seed)
        self.batch_size, self.epoch, self.offset = batch_size, 0, 0

    def batches(self) -> int:
        """Batches of one epoch (the last one may be short)."""
        return -(-len(self.inner) // self.batch_size)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.offset * self.batch_size)

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        return iter(list(self.inner)[self.offset * self.batch_size:])


class BatchStream:
    """Training batches without end: each `take(n, live)` continues the order where the last
    one stopped, moving to the next epoch of the sampler when one is used up.

    `loaders(live)` returns the (cached or live) loader, whose sampler is `sampler` and whose
    dataset's `epoch` the augmentation draw reads. `position` (epoch, offset) is saved in
    checkpoints and restored with `seek`.
    """

    def __init__(self, sampler: EpochSampler, datasets: dict, loaders):
        self.sampler, self.datasets, self.loaders = sampler, datasets, loaders
        self.epoch, self.offset = 0, 0

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def seek(self, position: dict) -> None:
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])

    def take(self, count: int, live: bool):
        """Yields `count` batches (cached features, or raw images when `live`)."""
        left = count
        while left > 0:
            if self.offset >= self.sampler.batches():
                self.epoch, self.offset = self.epoch + 1, 0
            self.sampler.epoch, self.sampler.offset = self.epoch, self.offset
            self.datasets[live].epoch = self.epoch
            batches = iter(self.loaders(live))
            try:
                for batch in batches:
                    self.offset += 1
                    left -= 1
                    yield batch
                    if left == 0:
                        break
            finally:
                if hasattr(batches, "close"):  # FeatureBatches: stop its producer thread now
                    batches.close()
            if self.offset < self.sampler.batches() and left > 0:
                raise RuntimeError("the training loader ended before its epoch did")
