"""SAM 3's vision backbone (ViT trunk + ViTDet neck), built from the `sam3` package's own classes.

Two presets share one private builder, so the test backbone is the real architecture:

- ``sam3``: the released ViT-L/14 at 1008 px (454 M parameters), weights from ``sam3.pt``.
- ``tiny``: the same classes at embed 64, depth 4, 252 px, with random weights from a fixed seed.
  It is untrained and exists for the demo and the tests.

The text encoder is never built: the `sam3` wheel lacks its vocabulary file, and we need only
``forward_image``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils import checkpoint

from pipeline.errors import UserError
from pipeline.model.lora import load_adapter
from pipeline.model.presets import (  # noqa: F401 - the presets' names are the backbone's too
    AMP_DTYPE_NAMES,
    LEVELS,
    PRESETS,
    TOKEN_PREFIX,
    BackbonePreset,
    cache_levels,
    token_block,
    token_level,
)

with warnings.catch_warnings():
    # sam3 imports modules that warn about CUDA autocast on CPU-only machines at import time.
    warnings.simplefilter("ignore")
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.vitdet import ViT, get_abs_pos
    from sam3.model.vl_combiner import SAM3VLBackbone

HF_REPO = "facebook/sam3"
HF_FILENAME = "sam3.pt"
# Official checkpoints name the vision backbone `detector.backbone.vision_backbone.*`; our module
# is the `backbone` (a SAM3VLBackbone), so its keys are `vision_backbone.*`.
CHECKPOINT_PREFIX = "detector.backbone."
# Parts of the official vision backbone we do not build (the SAM 2 compatibility neck).
UNUSED_CHECKPOINT_PARTS = ("vision_backbone.sam2_convs.",)
# Buffers recomputed from the configuration (RoPE frequencies); optional in a checkpoint.
DERIVED_BUFFERS = ("freqs_cis",)
TINY_SEED = 0


AMP_DTYPES = {amp: getattr(torch, name) if name else None for amp, name in AMP_DTYPE_NAMES.items()}
"""Values of --amp (after "auto" is resolved) and the autocast dtype of each."""


def amp_autocast(amp: str, device: torch.device):
    """The autocast context of `amp` on `device` (disabled for "off")."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class MissingWeightsError(UserError, RuntimeError):
    """No SAM 3 checkpoint was given and none could be fetched."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint lacks a vision-backbone tensor, or holds one of the wrong shape."""


def _build_backbone(preset: BackbonePreset) -> SAM3VLBackbone:
    trunk = ViT(
        img_size=preset.resolution,
        pretrain_img_size=preset.pretrain_resolution,
        patch_size=preset.patch_size,
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=preset.mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=preset.global_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=preset.window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    # precompute_resolution=None: SAM 3 would precompute the encodings on "cuda"; computed on
    # first use instead they land on whatever device the backbone runs on.
    position_encoding = PositionEmbeddingSine(
        num_pos_feats=256, normalize=True, scale=None, temperature=10000,
        precompute_resolution=None,
    )
    neck = Sam3DualViTDetNeck(
        trunk=trunk, position_encoding=position_encoding, d_model=256,
        scale_factors=[4.0, 2.0, 1.0, 0.5], add_sam2_neck=False,
    )
    return SAM3VLBackbone(visual=neck, text=None, scalp=1)


def resolve_checkpoint(name: str, checkpoint: str | Path | None) -> Path | None:
    """Where the weights of preset `name` come from: the given file, the hub, or none (tiny)."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"checkpoint {path} does not exist")
        return path
    if name != "sam3":
        return None
    try:
        return _fetch_from_hub()
    except Exception as err:  # offline, gated without a token, or no licence accepted
        raise MissingWeightsError(
            f"No SAM 3 weights: could not fetch {HF_FILENAME} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
            "Either pass --checkpoint /path/to/sam3.pt (download it from "
            f"https://huggingface.co/{HF_REPO} after accepting the licence), or accept the "
            "licence there and log in with `hf auth login` (or set HF_TOKEN) so it is fetched "
            "automatically. For a demo without weights use --backbone tiny."
        ) from err


def _fetch_from_hub() -> Path:
    """sam3.pt from the local hub cache, else from the hub. An unreachable hub fails at once:
    the hub client would retry five times over about 30 s, logging each retry (twice, once
    per handler) before the one message that says what to do."""
    import logging
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=HF_FILENAME, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fetch it
        if constants.HF_HUB_OFFLINE:
            raise
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=10).close()
    except urllib.error.HTTPError:
        pass  # an answer, whatever its status: the hub is reachable
    except OSError as err:
        raise ConnectionError(f"{constants.ENDPOINT} unreachable ({err})") from None
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, filename=HF_FILENAME))
    finally:
        hub_log.setLevel(level)


def load_vision_state(backbone: nn.Module, path: Path) -> None:
    """Load the vision-backbone tensors of an official-layout checkpoint into `backbone`.

    Every parameter must be present with its exact shape; anything else raises
    `CheckpointMismatchError` naming the key.
    """
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    found = {
        k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)
    }
    found = {k: v for k, v in found.items() if k.startswith("vision_backbone.")}
    expected = backbone.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in found:
            if not key.endswith(DERIVED_BUFFERS):
                problems.append(f"missing {CHECKPOINT_PREFIX}{key} {tuple(tensor.shape)}")
        elif found[key].shape != tensor.shape:
            problems.append(
                f"{CHECKPOINT_PREFIX}{key} has shape {tuple(found[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    unexpected = [
        k for k in found if k not in expected and not k.startswith(UNUSED_CHECKPOINT_PARTS)
    ]
    problems += [f"unexpected {CHECKPOINT_PREFIX}{k}" for k in unexpected]
    if problems:
        raise CheckpointMismatchError(
            f"{path} does not match the vision backbone: " + "; ".join(problems[:20])
            + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
        )
    backbone.load_state_dict({k: v for k, v in found.items() if k in expected}, strict=False)


def build_backbone(
    name: str = "sam3",
    checkpoint: str | Path | None = None,
    adapter: str | Path | None = None,
) -> SAM3VLBackbone:
    """Build SAM 3's vision backbone on the CPU, in eval mode.

    `forward_image(x)` takes x (B, 3, R, R) float, normalised to [-1, 1] (`pipeline.data.images`),
    R = `backbone.preset.resolution`, and returns SAM 3's dict: `vision_features`
    (B, 256, R/14, R/14), `backbone_fpn` [4x, 2x, 1x], `vision_pos_enc`, `sam2_backbone_out`.

    `checkpoint`: an official-layout `sam3.pt` (for `sam3`, fetched from the hub when None).
    `adapter`: a peft LoRA directory (as `train_head.py` saves it), applied to the trunk.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    path = resolve_checkpoint(name, checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        backbone = _build_backbone(preset)
    if path is not None:
        load_vision_state(backbone, path)
    if adapter is not None:
        backbone = load_adapter(backbone, adapter).get_base_model()
    backbone.preset = preset
    backbone.checkpoint_path = path
    return backbone.eval()


def image_features(backbone: nn.Module, images: torch.Tensor,
                   levels: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{level: (B, 256, h, w)} equal to `backbone.forward_image(images)["backbone_fpn"]` at
    `levels`, computing only those levels.

    SAM 3's neck runs one convolution branch per scale (4x, 2x, 1x, and a 0.5x that
    `forward_image` then drops) on the trunk's output, plus a sine position encoding for each.
    This runs the trunk and the branches of `levels` only: at 1008 px, 1x alone is 5.41 instead of
    5.61 TFLOP per image (bench_backbone.py). `backbone`: a SAM3VLBackbone, or a peft model
    around one (its LoRA layers sit inside the trunk). images: (B, 3, R, R) normalised.
    """
    neck = _neck(backbone)
    top = neck.trunk(images)[-1]  # what the neck's branches read (SAM 3's "simpleFPN")
    return {lvl: neck.convs[LEVELS[lvl]](top) for lvl in levels}


def _neck(backbone: nn.Module) -> nn.Module:
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return base.vision_backbone


def _run_blocks(trunk: nn.Module, x: torch.Tensor, blocks) -> torch.Tensor:
    """SAM 3's block loop (`ViT.forward`): each block checkpointed in train mode when the trunk's
    `use_act_checkpoint` is set, as an end-to-end step runs it."""
    for block in blocks:
        if trunk.use_act_checkpoint and trunk.training:
            x = checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def trunk_tokens(backbone: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """The trunk's tokens after block `block`: (B, h, w, embed_dim), h = w = R / 14.

    The first part of SAM 3's `ViT.forward` with its own modules: patch embedding, the tiled
    absolute position embedding, `ln_pre`, blocks 0..block (window or global attention, RoPE
    inside each block). images: (B, 3, R, R) normalised. `backbone`: as for `image_features`.
    """
    trunk = _neck(backbone).trunk
    x = trunk.patch_embed(images)
    if trunk.pos_embed is not None:
        x = x + get_abs_pos(trunk.pos_embed, trunk.pretrain_use_cls_token, (x.shape[1], x.shape[2]),
                            trunk.retain_cls_token, tiling=trunk.tile_abs_pos)
    return _run_blocks(trunk, trunk.ln_pre(x), trunk.blocks[: block + 1])


def features_from_tokens(backbone: nn.Module, tokens: torch.Tensor, block: int,
                         levels: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{level: (B, 256, h', w')} from `tokens` (B, h, w, embed_dim) after block `block`: the
    rest of the trunk (blocks block+1.., `ln_post`, which follows the last block, a global one)
    and the neck's branches of `levels`. `trunk_tokens` then this equals `image_features`."""
    neck = _neck(backbone)
    trunk = neck.trunk
    x = _run_blocks(trunk, tokens, trunk.blocks[block + 1:])
    top = trunk.ln_post(x).permute(0, 3, 1, 2)
    return {lvl: neck.convs[LEVELS[lvl]](top) for lvl in levels}


def write_official_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Save `backbone`'s weights in the official `sam3.pt` layout (under "model", with prefix).

    Used to test checkpoint loading and to hand weights between machines.
    """
    state = {CHECKPOINT_PREFIX + k: v for k, v in backbone.state_dict().items()}
    torch.save({"model": state}, path)


def preset_dict(name: str) -> dict:
    return asdict(PRESETS[name])
