"""Checkpoints that hold everything needed to resume, and the peft adapter export.

A checkpoint holds the decoder, the LoRA weights, optimizer (head and LoRA groups), scheduler,
the step and data-order position, every RNG state, the resolved config, the views, and the
cache (with its signature) the run was training on.
Files are written beside their target, fsynced and renamed over it (`write_atomically`): a crash
or a full disk leaves the previous one, and no temporary file.
"""

from __future__ import annotations

import io
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.durable import disk_full, fsync_files, fsync_folder, write_atomically
from pipeline.errors import DiskFullError
from pipeline.model.segmenter import load_lora_state, lora_state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, prepared) -> None:
    """Write `path` atomically."""
    payload = {
        "decoder": model.decoder.state_dict(),
        "lora": lora_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "state": state,
        "config": asdict(prepared.config),
        "views": list(prepared.views.labels),
        "use_angles": model.decoder.use_angles,
        "signature": prepared.signature,
    }
    buffer = io.BytesIO()  # torch.save into a file reports a full disk as a RuntimeError
    torch.save(payload, buffer)
    run_dir = path.parent
    write_atomically(path, buffer.getvalue(), hint=(
        f"then continue with `sam3-vessel train --resume {run_dir}` (last.pt holds the last "
        "finished epoch)" if (run_dir / "last.pt").is_file() else
        "then start the run again with the same flags and --overwrite (no epoch was saved)"))


def read_checkpoint(path: Path) -> dict:
    """The whole checkpoint dict, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> dict:
    """Restore the model (and, for a resume, optimizer, scheduler and RNG states) from `path`;
    returns its training state (step, stream position, best, cache, caches)."""
    return restore(read_checkpoint(path), model, optimizer, scheduler)


def restore(payload: dict, model, optimizer=None, scheduler=None) -> dict:
    """`load_checkpoint` for a checkpoint dict already read."""
    model.decoder.load_state_dict(payload["decoder"])
    load_lora_state(model, payload["lora"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        # The optimizer saved the rates of the schedule it ran under; a resume may change the
        # budget (the cosine stretches), so the next step's rates come from `scheduler` as built.
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        _set_rng_state(payload["rng"])
    return payload["state"]


def saved_state(path: Path) -> dict:
    """A checkpoint's training state (step, best, total_steps, ...), without reading its
    tensors (mmap)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state"]


def saved_step(path: Path) -> int:
    """The step a checkpoint was saved at."""
    return int(saved_state(path)["step"])


def save_adapter(model, directory: Path) -> None:
    """Save the LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors),
    replacing `directory` in one rename."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.backbone.save_pretrained(str(tmp))
        fsync_files(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise DiskFullError(f"No space left on device while writing {directory}; "
                                f"free space in {directory.parent}, then continue with "
                                f"`sam3-vessel train --resume {directory.parent}`") from err
        raise
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    fsync_folder(directory.parent)  # the rename itself survives a crash
    shutil.rmtree(old, ignore_errors=True)
