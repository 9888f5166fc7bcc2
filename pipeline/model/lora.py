"""LoRA on the trunk's attention layers, through peft; one place decides what trains.

peft's suffix `proj` would also match `trunk.patch_embed.proj` (a Conv2d); the regex below names
the attention projections only. With a split cache (`--cache-block K`) the regex names the
blocks after K only, so the saved adapter says where it lives.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from pipeline.errors import UserError


class AdapterError(UserError, FileNotFoundError):
    """A directory given as a LoRA adapter is not one (a file is missing)."""

ATTENTION_TARGETS = r".*trunk\.blocks\.\d+\.attn\.(qkv|proj)"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def attention_targets(after_block: int | None = None, depth: int | None = None) -> str:
    """peft `target_modules` regex: every block's attention, or that of blocks after_block+1 to
    depth-1 only."""
    if after_block is None:
        return ATTENTION_TARGETS
    blocks = "|".join(str(i) for i in range(after_block + 1, depth))
    return rf".*trunk\.blocks\.({blocks})\.attn\.(qkv|proj)"


def attach_lora(backbone: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
                after_block: int | None = None):
    """Wrap `backbone` in a trainable peft LoRA (base weights frozen); returns the PeftModel.

    `after_block` K: LoRA only in the trunk's blocks after K (a split cache stores the tokens
    after K, which then never change)."""
    depth = len(backbone.vision_backbone.trunk.blocks)
    if after_block is not None and not 0 <= after_block < depth - 1:
        raise ValueError(f"after_block must be in 0..{depth - 2}, got {after_block}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=attention_targets(after_block, depth), bias="none")
    return get_peft_model(backbone, config)


BLOCK_OF_KEY = re.compile(r"trunk\.blocks\.(\d+)\.")


def first_adapted_block(adapter_dir: str | Path) -> int | None:
    """The lowest trunk block the saved adapter changes (None: it changes nothing in the trunk's
    blocks, e.g. only the neck); -1 if it reaches the trunk before its blocks (patch embedding).
    Read from the weight names in adapter_model.safetensors, which list every adapted module."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_FILES[1]), "pt") as weights:
        names = list(weights.keys())
    first = None
    for name in names:
        match = BLOCK_OF_KEY.search(name)
        block = int(match.group(1)) if match else (-1 if "trunk." in name else None)
        if block is not None:
            first = block if first is None else min(first, block)
    return first


def adapter_changes_tokens(adapter_dir: str | Path | None, block: int | None) -> bool:
    """Whether features stored with a split at `block` (None: no split) depend on the adapter:
    always without a split; with one only if the adapter reaches block `block` or earlier."""
    if adapter_dir is None:
        return False
    if block is None:
        return True
    first = first_adapted_block(adapter_dir)
    return first is not None and first <= block


def load_adapter(backbone: nn.Module, adapter_dir: str | Path, *, trainable: bool = False):
    """Apply a saved peft adapter directory to `backbone`; returns the PeftModel."""
    adapter_dir = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise AdapterError(
            f"{adapter_dir} is not a LoRA adapter directory: missing {', '.join(missing)} "
            "(`sam3-vessel train` writes one to <run-dir>/adapter)"
        )
    return PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=trainable)


def adapter_digest(adapter_dir: str | Path | None) -> str | None:
    """sha256 over the adapter's config and weights: what features made with it depend on."""
    if adapter_dir is None:
        return None
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update((Path(adapter_dir) / name).read_bytes())
    return digest.hexdigest()


def set_trainable_params(model: nn.Module) -> list[str]:
    """Freeze every backbone base weight; train LoRA matrices and everything outside the backbone.

    `model` holds the PeftModel as `model.backbone` (or is one). Returns the trainable names.
    """
    names = []
    for name, param in model.named_parameters():
        in_backbone = name.startswith("backbone.") or "base_model.model." in name
        param.requires_grad = (not in_backbone) or "lora_" in name
        if param.requires_grad:
            names.append(name)
    return names
