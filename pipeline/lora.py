"""LoRA on the trunk's attention layers, through peft; one place decides what trains.

peft's suffix `proj` would also match `trunk.patch_embed.proj` (a Conv2d); the regex below names
the attention projections only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

ATTENTION_TARGETS = r".*trunk\.blocks\.\d+\.attn\.(qkv|proj)"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def attach_lora(backbone: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.05):
    """Wrap `backbone` in a trainable peft LoRA (base weights frozen); returns the PeftModel."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=ATTENTION_TARGETS, bias="none")
    return get_peft_model(backbone, config)


def load_adapter(backbone: nn.Module, adapter_dir: str | Path, *, trainable: bool = False):
    """Apply a saved peft adapter directory to `backbone`; returns the PeftModel."""
    adapter_dir = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{adapter_dir} is not a LoRA adapter directory: missing {', '.join(missing)} "
            "(train_head.py writes one to <run-dir>/adapter)"
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
