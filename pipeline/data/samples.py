"""Stage B's samples: masks, views and raw images (the image branch, end-to-end steps).

Cached features are not read here but in the training process, per batch, by
`pipeline.cache.feature_batches.FeatureBatches`; the items say which sample and copy they are.

Augmentation: `augment` names each sample's extracted copies (see `pipeline.data.augment`); each
epoch draws, per sample, the original or one copy, and the mask and raw image get that copy's
transform (the mask its geometry only). Cached feature maps are never transformed themselves.
"""

from __future__ import annotations

import difflib
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from pipeline.data.augment import transform_image, transform_mask
from pipeline.data.images import read_image, read_mask, sam3_resize
from pipeline.data.importers import encode_angles
from pipeline.data.manifest import UNKNOWN_VIEW, ManifestError, Sample
from pipeline.data.native_samples import NativeSampling, native_item, native_mask, native_pixels
from pipeline.errors import Notice


@dataclass(frozen=True)
class ViewVocabulary:
    """The training views; index `len(labels)` is the "unknown view" row."""

    labels: tuple[str, ...]

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> ViewVocabulary:
        return cls(tuple(sorted({s.view or UNKNOWN_VIEW for s in samples})))

    @property
    def unknown(self) -> int:
        return len(self.labels)

    def index(self, label: str | None) -> int:
        label = label or UNKNOWN_VIEW
        return self.labels.index(label) if label in self.labels else self.unknown

    def label(self, index: int) -> str:
        """The label of a view index (the unknown row reads as UNKNOWN_VIEW)."""
        return self.labels[index] if index < self.unknown else UNKNOWN_VIEW

    def warn_unseen(self, samples: list[Sample], where: str) -> None:
        unseen = sorted({s.view for s in samples if s.view and s.view not in self.labels})
        if unseen:
            near = {v: difflib.get_close_matches(v, self.labels, n=1, cutoff=0.5) for v in unseen}
            hints = "; ".join(f"{v!r}: did you mean {m[0]!r}?" for v, m in near.items() if m)
            warnings.warn(f"{where}: views {unseen} were not seen in training (it learnt "
                          f"{list(self.labels)}); they use the unknown-view embedding"
                          + (f" ({hints})" if hints else ""), Notice, stacklevel=2)
        viewless = sum(not s.view for s in samples)
        learnt = [label for label in self.labels if label != UNKNOWN_VIEW]
        if viewless and learnt:
            warnings.warn(f"{where}: {viewless} of {len(samples)} rows have no view, and the "
                          f"model learnt views {learnt}: those rows use the unknown-view "
                          "embedding; fill the `view` column for the model's best masks",
                          Notice, stacklevel=2)


def split_samples(samples: list[Sample], *, allow_empty_val: bool = False,
                  where: str = "the manifest") -> tuple[list[Sample], list[Sample]]:
    """(train, val) by the manifest's `split` (normalised by `read_manifest`); rows without one
    train, `test` rows are held out (neither list). No val rows is an error unless
    `allow_empty_val`."""
    train = [s for s in samples if s.is_train]
    val = [s for s in samples if s.split == "val"]
    if not train:
        raise ManifestError(f"{where} has no training rows (split `train` or empty)")
    if not val and not allow_empty_val:
        raise ManifestError(f"{where} has no validation rows (split `val`): nothing would "
                            "score the model; give some rows split `val`, or pass "
                            "--allow-empty-val to train without validation (the last epoch "
                            "is then kept as best)")
    held = len(samples) - len(train) - len(val)
    if held:
        print(f"{where}: {held} `test` row(s) held out (not trained on, not validated)",
              flush=True)
    return train, val


SMALL_FIELDS = ("index", "copy", "view", "angles")
"""Per-sample fields of a few bytes, which `collate_samples` keeps as numpy arrays."""


def collate_samples(items: list[dict]) -> dict:
    """`SegmentationSamples` items -> a batch: "mask" and "image" stacked into tensors (by the
    default collate), the `SMALL_FIELDS` stacked into numpy arrays.

    From a DataLoader worker, every tensor crosses to the trainer in its own shared-memory file
    handed over a socket; numpy arrays are pickled inline, which for the four small fields costs
    a fraction of the wall time and of the trainer's CPU (BENCHMARKS.md, "Timings behind the
    code"). `to_device` makes them tensors.
    """
    rest = [{k: v for k, v in item.items() if k not in SMALL_FIELDS} for item in items]
    batch = default_collate(rest) if rest[0] else {}
    for key in SMALL_FIELDS:
        if key in items[0]:
            batch[key] = np.stack([np.asarray(item[key]) for item in items])
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch (tensors or numpy arrays, and dicts of tensors for "features") as
    tensors on `device`."""
    def move(value):
        # Only a pinned source is safe to copy asynchronously: `FeatureBatches` reuses its
        # unpinned buffers once the next batch is requested.
        tensor = torch.as_tensor(value)
        return tensor.to(device, non_blocking=tensor.is_pinned())

    return {key: ({k: move(v) for k, v in value.items()} if isinstance(value, dict)
                  else move(value))
            for key, value in batch.items()}


def resize_mask(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W) bool -> (1, R, R) float32 in {0, 1} (area average, then >= 0.5)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    resized = F.interpolate(tensor, size=(resolution, resolution), mode="area")
    return (resized[0] >= 0.5).float()


class SegmentationSamples(Dataset):
    """One dict per sample, collated by `collate_samples`:

    - "image": (3, R, R) uint8, resized as SAM 3 does (when `with_image`); the model applies
      `pipeline.data.images.normalize` on its device;
    - "mask": (1, R, R) float32 in {0, 1} (when `with_masks`); "view": () long;
      "angles": (4,) float32 [sin, cos of the primary and secondary angle] or zeros;
    - "index": () long, the sample's position in `samples`; "copy": () long, which copy was
      drawn (0: the original), so `pipeline.cache.feature_batches` can pick the cache row.

    `augment`: per sample, the names of its copies (`CopyPlan.names`, the same number for
    every sample); set `epoch` before each epoch, the draw depends on (seed, epoch, i).
    `epoch` lives in shared memory, so persistent DataLoader workers see each new value.
    `memory`: a `DecodedSamples` shared by the datasets of one split; each (sample, copy) is
    then decoded and resized once and served from memory afterwards.

    `native` (the detail decoder, `pipeline.data.native_samples`): "mask" is at the image's own
    resolution instead, with "pixels" (3, h, w) uint8 (a random crop of `native.crop` a side, or
    the whole image) and "box" (4,) float32, where the pixels lie in the image.
    """

    def __init__(self, samples: list[Sample], *, resolution: int, views: ViewVocabulary,
                 with_image: bool = True, with_masks: bool = True,
                 augment: list[tuple[str, ...]] | None = None, seed: int = 0,
                 memory: DecodedSamples | None = None, native: NativeSampling | None = None):
        self.samples, self.resolution, self.views = samples, resolution, views
        self.native = native
        self.with_image, self.with_masks = with_image, with_masks
        self.augment = augment if augment and augment[0] else None
        self.seed, self.memory = seed, memory
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()
        self.transform = sam3_resize(resolution)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = value

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if not self.augment:
            return self.item(i, 0)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        return self.item(i, int(rng.integers(len(self.augment[i]) + 1)))

    def _parts(self) -> list[str]:
        if self.native is None:
            return [k for k, on in (("mask", self.with_masks), ("image", self.with_image)) if on]
        return [k for k, on in (("native_mask", self.with_masks), ("image", self.with_image),
                                ("pixels", True)) if on]

    def item(self, i: int, copy: int) -> dict:
        """Sample `i` as copy `copy` (0: the original, c: copy `augment[i][c - 1]`)."""
        wanted = self._parts()
        if self.memory is None:
            item = self._decode(i, copy, wanted)
        else:
            item = self.memory.item((i, copy), wanted, lambda: self._decode(i, copy, wanted))
        if self.native is None:
            return item
        # The crop is drawn per (seed, epoch, sample): a new place every epoch.
        rng = np.random.default_rng((self.seed, self.epoch, i, copy, 1))
        mask = item.pop("native_mask", None)
        return item | native_item(item.pop("pixels"), mask, self.native, rng)

    def _decode(self, i: int, copy: int, parts: list[str] | None = None) -> dict:
        """`item` read from the files; `parts` (default: as the dataset is set) of mask/image."""
        parts = parts if parts is not None else self._parts()
        sample = self.samples[i]
        name = self.augment[i][copy - 1] if copy else None
        item = {
            "index": torch.tensor(i),
            "copy": torch.tensor(copy),
            "view": torch.tensor(self.views.index(sample.view)),
            "angles": torch.from_numpy(encode_angles(*sample.angles)) if sample.angles
            else torch.zeros(4),
        }
        mask = (transform_mask(name, read_mask(sample.mask)[0])
                if "mask" in parts or "native_mask" in parts else None)
        if "mask" in parts:
            item["mask"] = resize_mask(mask, self.resolution)
        if "image" in parts or "pixels" in parts:
            image = transform_image(name, read_image(sample.image))
            if "image" in parts:
                item["image"] = self.transform(image)
            if "pixels" in parts:
                item["pixels"] = native_pixels(image, self.native)
                if mask is not None:
                    item["native_mask"] = native_mask(mask, tuple(item["pixels"].shape[-2:]))
        return item


DECODED_PARTS = ("mask", "image", "pixels", "native_mask")
"""The decoded parts of an item that `DecodedSamples` keeps (the rest is rebuilt per item)."""


class DecodedSamples:
    """Items of `SegmentationSamples` kept in memory after their first decode, by (index, copy):
    masks as uint8 (served as float32 {0, 1}), images as the uint8 the model expects.

    Small vessel sets (14 to a few hundred images) would otherwise decode the same JPEG or
    PNG files every epoch, which takes longer than their cached steps (BENCHMARKS.md). Used
    only when every item fits (`fits`); a lock keeps two threads from decoding one item twice.
    """

    def __init__(self):
        self.items: dict[tuple[int, int], dict] = {}
        self.lock = threading.Lock()

    @staticmethod
    def bytes_per_item(resolution: int, with_image: bool = True) -> int:
        return resolution * resolution * (4 if with_image else 1)

    @classmethod
    def fits(cls, count: int, resolution: int, budget_mb: int, native_pixels: int = 0) -> bool:
        """Whether `count` items (mask and image, and `native_pixels` h * w pixels of a native
        image and mask each) fit in `budget_mb` megabytes."""
        per_item = cls.bytes_per_item(resolution) + 4 * native_pixels
        return count * per_item <= budget_mb * 2**20

    def item(self, key: tuple[int, int], parts: list[str], decode) -> dict:
        """The item of `key` with `parts` ("mask", "image"); `decode()` makes missing ones."""
        with self.lock:
            kept = self.items.get(key)
            if kept is None or any(p not in kept for p in parts):
                fresh = decode()
                kept = {**(kept or {}), **fresh}
                if "mask" in fresh:
                    kept["mask"] = fresh["mask"].to(torch.uint8)
                self.items[key] = kept
        item = {k: v for k, v in kept.items() if k not in DECODED_PARTS}
        for part in parts:
            item[part] = kept[part].float() if part == "mask" else kept[part]
        return item
