"""The fine-tuned backbone back into SAM 3: a run's LoRA merged into the official checkpoint.

    python -m pipeline.export --run runs/20261126-101500 --checkpoint sam3.pt --out sam3_vessels.pt

`sam3_vessels.pt` is `sam3.pt` with the trunk's attention weights replaced by their LoRA-merged
values (peft's `merge_and_unload`: W + B A * alpha / r); every other key, the text encoder, the
detector and the tracker included, is kept as it was, under the same names and the same
`"model"` wrapper, so SAM 3's own builders (`build_sam3_image_model(checkpoint_path=...)`,
`Sam3Processor` with text and box prompts) load it unchanged. Beside it, `sam3_vessels_head.pt`
holds the run's view-conditioned decoder (view embedding included) and the views; `load_exported`
puts both together again for vessel masks without the run directory:

    from pipeline.export import load_exported, segment
    model, views = load_exported("sam3_vessels.pt", "sam3_vessels_head.pt")
    mask, probability = segment(model, views, "angio.png", view="LAO")  # (H, W) each

The tiny preset works too: without --checkpoint a tiny run's seeded weights are written in the
official layout first.
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from pipeline.cache.signature import checkpoint_digest
from pipeline.data.images import read_image
from pipeline.data.manifest import Sample
from pipeline.data.native_samples import NativeSampling
from pipeline.data.samples import SegmentationSamples, ViewVocabulary, collate_samples, to_device
from pipeline.durable import write_atomically
from pipeline.errors import Notice, UserError
from pipeline.model.backbone import CHECKPOINT_PREFIX, build_backbone, resolve_checkpoint
from pipeline.model.decoder import ViewConditionedDecoder
from pipeline.model.lora import load_adapter
from pipeline.model.segmenter import VesselSegmenter, build_decoder
from pipeline.predict import native_prediction
from pipeline.train.checkpoint import read_checkpoint
from pipeline.train.run_files import RUN_FILES
from pipeline.train.setup import resume_config

HEAD_FORMAT = 2
"""2: "decoder_config" (any decoder, with the detail decoder's inference settings); 1 (read
too): "decoder_args" of the legacy decoder."""
DECODER_FIELDS = ("decoder", "levels", "view_conditioning", "image_branch", "width",
                  "image_channels", "detail_width", "detail_depth", "features",
                  "detail_max_side", "tile_size", "mirror_tta")
"""The TrainConfig fields a head file keeps: how to build its decoder and run it."""


class ExportError(UserError, RuntimeError):
    """The run or the checkpoint cannot be exported; the message says which and why."""


def head_path(out: str | Path) -> Path:
    """Where the decoder goes beside an exported checkpoint: `<stem>_head.pt`."""
    out = Path(out)
    return out.with_name(f"{out.stem}_head.pt")


def _trained_checkpoint(run_dir: Path) -> str | None:
    """The sha256 of the checkpoint the run trained on (None: seeded tiny weights)."""
    saved = json.loads((run_dir / "config.json").read_text())
    return saved["cache"]["signature"]["checkpoint_sha256"]


def merged_backbone(run_dir: Path, checkpoint: Path | None):
    """(SAM 3 vision backbone with the run's best LoRA merged into its weights, names of the
    merged tensors as the backbone's state_dict calls them)."""
    config = resume_config(run_dir)
    adapter = run_dir / "adapter"
    peft_model = load_adapter(build_backbone(config.backbone, checkpoint), adapter)
    prefix = "base_model.model."
    merged = sorted(f"{name.removeprefix(prefix)}.weight" for name, module
                    in peft_model.named_modules() if isinstance(module, LoraLayer))
    backbone = peft_model.merge_and_unload()
    return backbone.eval(), merged


def _source_state(checkpoint: Path | None, backbone_name: str) -> tuple[dict, dict]:
    """(the checkpoint file's whole dict, its state dict: the "model" entry when present).
    Without a file (tiny): the seeded weights in the official layout."""
    if checkpoint is None:
        seeded = build_backbone(backbone_name)
        state = {CHECKPOINT_PREFIX + k: v for k, v in seeded.state_dict().items()}
        return {"model": state}, state
    whole = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    wrapped = isinstance(whole.get("model"), dict)
    return whole, (whole["model"] if wrapped else whole)


def export(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None, *,
           overwrite: bool = False) -> tuple[Path, Path]:
    """Write the merged checkpoint `out` and the head beside it; returns both paths.

    `checkpoint`: the official-layout file the run trained on (default: the run's own
    --checkpoint; for `sam3` without one, the hub's). A different file is refused.
    `out` and its head may be neither a file of the run directory nor the checkpoint read;
    an existing one is replaced only with `overwrite`.
    """
    run_dir, out = Path(run_dir), Path(out)
    for name in ("config.json", "best.pt", "adapter/adapter_model.safetensors"):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir / name} is missing: export a finished train_head.py run")
    config = resume_config(run_dir)
    path = resolve_checkpoint(config.backbone, checkpoint or config.checkpoint)
    _check_outputs(run_dir, path, out, overwrite)
    trained, given = _trained_checkpoint(run_dir), checkpoint_digest(path)
    if trained != given:
        def name(digest):
            return f"sha256 {digest[:12]}" if digest else "the seeded tiny weights"

        raise ExportError(
            f"{path or 'the seeded tiny weights'} is not the checkpoint {run_dir} trained on "
            f"({name(given)}, the run: {name(trained)}); pass that one with --checkpoint, or "
            "none for a tiny run without one")
    backbone, merged = merged_backbone(run_dir, path)
    whole, state = _source_state(path, config.backbone)
    weights = backbone.state_dict()
    for key in merged:
        official = CHECKPOINT_PREFIX + key
        if official not in state:
            raise ExportError(f"{path} has no {official}, which the adapter changes")
        state[official] = weights[key].to(state[official].dtype).contiguous()
    _save_atomically(whole, out)
    head = head_path(out)
    _save_atomically(_head_payload(run_dir, config, given), head)
    return out, head


def _check_outputs(run_dir: Path, checkpoint: Path | None, out: Path, overwrite: bool) -> None:
    """Refuse outputs that would replace what export reads (the run's files, the checkpoint),
    and existing files without `overwrite`."""
    run = run_dir.resolve()
    for target in (out, head_path(out)):
        resolved = target.resolve()
        if checkpoint is not None and resolved == Path(checkpoint).resolve():
            raise ExportError(f"--out {out} would overwrite {checkpoint}, the checkpoint export "
                              "reads; choose another --out (e.g. sam3_vessels.pt)")
        inside = resolved.relative_to(run).parts if resolved.is_relative_to(run) else ()
        if inside and inside[0] in RUN_FILES:
            raise ExportError(f"--out {out} would overwrite {target}, a file of the run "
                              f"{run_dir}; choose a path outside the run's own files")
        if target.exists() and not overwrite:
            raise ExportError(f"{target} exists; pass --overwrite to replace it, or choose "
                              "another --out")


def _head_payload(run_dir: Path, config, checkpoint_sha256: str | None) -> dict:
    payload = read_checkpoint(run_dir / "best.pt")
    return {
        "format": HEAD_FORMAT,
        # Deep supervision's auxiliary heads train the decoder; inference does not use them.
        "decoder": {k: v for k, v in payload["decoder"].items() if not k.startswith("aux_heads.")},
        "decoder_config": {name: (list(getattr(config, name)) if name == "levels"
                                  else getattr(config, name)) for name in DECODER_FIELDS},
        "use_angles": payload["use_angles"],
        "views": list(payload["views"]),
        "backbone": config.backbone,
        "amp": config.amp,
        "run": str(run_dir),
        "step": payload["state"]["best"]["step"],
        "source_checkpoint_sha256": checkpoint_sha256,
    }


def _save_atomically(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


def load_head(path: str | Path) -> tuple[nn.Module, ViewVocabulary, dict]:
    """(decoder with the run's best weights, in eval mode; its views; the head's metadata)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "decoder_config" in payload:
        settings = {**payload["decoder_config"]}
        settings["levels"] = tuple(settings["levels"])
        decoder = build_decoder(SimpleNamespace(**settings), num_views=len(payload["views"]),
                                use_angles=payload["use_angles"])
    else:  # format 1: the legacy decoder's arguments
        args = payload["decoder_args"]
        decoder = ViewConditionedDecoder(**{**args, "levels": tuple(args["levels"])})
    decoder.load_state_dict(payload["decoder"])
    return decoder.eval(), ViewVocabulary(tuple(payload["views"])), payload


def load_exported(checkpoint: str | Path, head: str | Path, *, amp: str | None = None
                  ) -> tuple[VesselSegmenter, ViewVocabulary]:
    """The vessel model from an exported pair, on the CPU in eval mode: SAM 3's backbone from the
    merged `checkpoint` (no LoRA layers left) and the decoder from `head`.

    `model(batch, live=True)` takes batch["image"] (B, 3, R, R) uint8 and batch["view"] (B,)
    int64 (`views.index(label)`) and returns logits (B, 1, R, R) float32. With the detail
    decoder (`model.native`) the batch also needs "pixels" (B, 3, h, w) uint8 and "box" (B, 4)
    (`pipeline.data.native_samples.native_item`), and `model.infer(batch, live=True, ...)` with
    the head's "decoder_config" tile_size and mirror_tta gives whole-image logits (B, 1, h, w).
    `amp`: autocast of the backbone and decoder (bf16, fp16 or off; default: the run's).
    """
    decoder, views, meta = load_head(head)
    backbone = build_backbone(meta["backbone"], checkpoint)
    model = VesselSegmenter(backbone=backbone, decoder=decoder, amp=amp or meta["amp"])
    settings = meta.get("decoder_config", {})
    # How the run validated and predicts whole images (read by `segment`).
    model.inference = SimpleNamespace(
        tile_size=settings.get("tile_size", 0), mirror=bool(settings.get("mirror_tta", False)),
        native=(NativeSampling(crop=None, max_side=settings.get("detail_max_side", 0))
                if model.native else None))
    return model.eval(), views


def segment(model: VesselSegmenter, views: ViewVocabulary, image: str | Path, *,
            view: str | None = None, angles: tuple[float, float] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool, probability (H, W) float32 in [0, 1]) of one image file at its own
    size, as `predict` computes it: the same resizing, whole-image or tiled inference, mirror
    TTA and threshold (probability 0.5). `model`, `views` from `load_exported`; `view` a label
    the run learnt (None or another: the unknown-view embedding); `angles` (primary, secondary)
    degrees, for a run trained with them."""
    sample = Sample(row=1, image=Path(image), mask=None, view=view, split=None, angles=angles)
    views.warn_unseen([sample], str(image))
    if (angles is None) == model.decoder.use_angles:
        warnings.warn(f"{image}: " + ("the run learnt C-arm angles and none were given: zeros "
                                      "are used" if angles is None else
                                      "the run learnt no C-arm angles: `angles` is ignored"),
                      Notice, stacklevel=2)
    inference = model.inference
    dataset = SegmentationSamples([sample], resolution=model.resolution, views=views,
                                  with_masks=False, with_image=True, native=inference.native)
    batch = collate_samples([dataset[0]])
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model.infer(to_device(batch, device), live=True,
                             tile_size=inference.tile_size, mirror=inference.mirror)
    return native_prediction(logits[0], tuple(read_image(sample.image).shape[-2:]))


if __name__ == "__main__":  # `python -m pipeline.export`, as `sam3-vessel export`
    from pipeline.cli import export_main

    sys.exit(export_main(prog="python -m pipeline.export"))
