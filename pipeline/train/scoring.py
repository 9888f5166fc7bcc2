"""Scoring at each image's own size: logits resized back to H x W, masks and FOV as stored.

Training scores at the backbone's square resolution against the resized masks it trains on;
validation, `report.json` and `predict` score as the papers do: the (B, 1, R, R) logits are
resized bilinearly to the image's (H, W), thresholded at 0 (probability 0.5) and compared with
the mask as `data.images.read_mask` reads it, inside the FOV mask when the manifest has one.

Native masks are decoded once and kept in memory as packed bits (1 bit a pixel: 120 KB for a
999 x 960 CHASE_DB1 mask): unpacking bits costs far less than decoding the PNG again
(BENCHMARKS.md, "Timings behind the code"), so a validation pass re-reads nothing from disk.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.images import read_image, read_mask
from pipeline.data.manifest import UNKNOWN_VIEW, Sample
from pipeline.train.metrics import SCORES, score_image
from pipeline.train.reporting import save_overlays


def native_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, R, R) or (R, R) logits -> (H, W) float32 logits at `size`, bilinear (half-pixel
    centres, as `predict` writes its masks)."""
    grid = logits.float().reshape(1, 1, *logits.shape[-2:])
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def score_native(logits: torch.Tensor, mask: np.ndarray, fov: np.ndarray | None = None, *,
                 centreline: bool = True) -> tuple[dict[str, float], np.ndarray]:
    """Every score of one image at its own size, and the (H, W) bool prediction.

    `logits` (1, R, R) float (any device), `mask` (H, W) bool as stored, `fov` (H, W) bool or
    None. The prediction is resized logits > 0; AUC ranks their sigmoid probabilities.
    """
    full = native_logits(logits.detach().cpu(), mask.shape)
    pred = (full > 0).numpy()
    prob = torch.sigmoid(full).numpy()
    return score_image(pred, mask, prob=prob, fov=fov, centreline=centreline), pred


class NativeTargets:
    """The masks (and FOV masks) of `samples` as stored, decoded on first use and kept packed.

    Thread-safe: the scoring threads of a validation pass share one instance.
    """

    def __init__(self, samples: list[Sample]):
        self.samples = samples
        self._kept: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `i`'s ((H, W) bool mask, (H, W) bool FOV or None)."""
        with self._lock:
            kept = self._kept.get(i)
        if kept is None:
            sample = self.samples[i]
            if sample.mask is None:
                raise ValueError(f"row {sample.row}: {sample.image} has no mask to score against")
            mask = read_mask(sample.mask)[0]
            fov = read_mask(sample.fov)[0] if sample.fov is not None else None
            kept = (mask.shape, np.packbits(mask), None if fov is None else np.packbits(fov))
            with self._lock:
                self._kept[i] = kept
        shape, mask_bits, fov_bits = kept
        return _unpack(mask_bits, shape), None if fov_bits is None else _unpack(fov_bits, shape)

    def score(self, logits: torch.Tensor, indices: list[int]) -> dict[str, list[float]]:
        """Per-image scores, {name: [B]} as `pipeline.train.metrics.score_batch` returns them, of
        (B, 1, R, R) logits for samples `indices` (positions in `samples`)."""
        images = [score_native(item, *self.get(i))[0]
                  for item, i in zip(logits, indices, strict=True)]
        return {name: [scores[name] for scores in images] for name in SCORES}


def _unpack(bits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).view(bool)


def scoring_note(samples: list[Sample], *, mirror_tta: bool = False) -> dict:
    """How validation and `predict` scores were computed, for report.json's "scoring"."""
    fovs = sum(sample.fov is not None for sample in samples)
    return {
        "inference": ("mirror TTA: the mean logits of the four mirrorings" if mirror_tta
                      else "one pass, unmirrored"),
        "size": "each image's own H x W: logits resized bilinearly, the mask as stored",
        "threshold": "logit 0 (probability 0.5)",
        "fov": f"{fovs} of {len(samples)} images scored inside their field of view",
        "mean": "every score is the mean over images of per-image scores (AUC included); "
                "undefined scores (NaN, written null) are skipped",
        "auc": "per-image AUC-ROC of the sigmoid probabilities (exact, a tie counts 1/2)",
    }


def signed_image(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 or uint16 as `read_image` gives it -> float32 in [-1, 1] (for overlays)."""
    scale = 65535.0 if image.dtype == torch.uint16 else 255.0
    return image.float() / (scale / 2) - 1


def save_native_overlays(out_dir, samples: list[Sample], logits: torch.Tensor,
                         targets: list[tuple[np.ndarray, np.ndarray | None]]) -> list:
    """`pipeline.train.reporting.save_overlays` at each image's own size: the image as stored, its
    mask, and the (B, 1, R, R) `logits` resized back; titles give the native Dice (in the FOV).
    `targets`: each sample's (mask, fov) as `NativeTargets.get` returns them."""
    parts = []
    for sample, item, (mask, fov) in zip(samples, logits, targets, strict=True):
        scores, pred = score_native(item, mask, fov, centreline=False)
        parts.append((signed_image(read_image(sample.image)), mask, pred, sample.image.name,
                      sample.view or UNKNOWN_VIEW, scores))
    return save_overlays(out_dir, *zip(*parts, strict=True)) if parts else []
