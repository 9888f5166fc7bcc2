"""A run that diverged stops at once: a non-finite loss never reaches a checkpoint or a report.

A NaN or Inf loss (AdamW then writes NaN into every weight it updates) is reported with the step
and the likely cause, and the run ends before saving: `last.pt` and `best.pt` keep the last
validated step before it, and no `report.json` scores a model that predicts nothing.
"""

from __future__ import annotations

import math

from pipeline.errors import UserError


class DivergedError(UserError, RuntimeError):
    """Training produced a non-finite loss; the message names the step and what to change."""


def check_loss(value: float, step: int, what: str, optimizer) -> None:
    """Raise `DivergedError` when `value` (the `what` loss at run step `step`) is not finite.

    `optimizer`'s groups ("head", "lora") give the learning rates the message names."""
    if math.isfinite(value):
        return
    rates = {g["name"]: g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
    head, lora = rates.get("head", 0.0), rates.get("lora", 0.0)
    raise DivergedError(
        f"training diverged at step {step}: the {what} loss is {value}. Likely cause: learning "
        f"rates too high for this data (--lr {head:g}, --lora-lr {lora:g}), or an fp16 overflow "
        f"(--amp fp16: try bf16). Start a new run with lower rates (e.g. --lr {head / 10:g} "
        f"--lora-lr {lora / 10:g}; --overwrite to reuse the run directory); nothing from step "
        f"{step} on was saved (last.pt and best.pt hold earlier validated steps, if any)")
