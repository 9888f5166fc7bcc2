"""Seeded train/val splits of an imported dataset's rows: by a ratio of rows, or by whole groups
(patients, studies), so that one group's images never straddle train and val. The importers
(`importers`, `coco`, `dicom_import`) find the groups; this module only draws the split.
"""

from __future__ import annotations

import random
from collections import defaultdict

TRAIN, VAL = "train", "val"


def split_by_ratio(count: int, ratio: float, seed: int) -> list[str]:
    """A seeded shuffle: round(count * ratio) samples train, the rest val (both kept non-empty
    when there are two samples or more and 0 < ratio < 1)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_train = round(count * ratio)
    if count >= 2 and 0.0 < ratio < 1.0:
        n_train = min(max(n_train, 1), count - 1)
    splits = [VAL] * count
    for index in order[:n_train]:
        splits[index] = TRAIN
    return splits


def split_by_group(groups: list[str], ratio: float, seed: int) -> list[str]:
    """Whole groups to train or val (seeded), the train share of samples as close to `ratio` as
    whole groups allow; both sides non-empty when there are two groups or more."""
    sizes: dict[str, int] = defaultdict(int)
    for group in groups:
        sizes[group] += 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target, in_train, train = ratio * len(groups), 0, set()
    for group in order:
        if abs(in_train + sizes[group] - target) <= abs(in_train - target):
            train.add(group)
            in_train += sizes[group]
    if len(order) >= 2 and 0.0 < ratio < 1.0:
        if not train:
            train.add(order[0])
        elif len(train) == len(order):
            train.discard(order[-1])
    return [TRAIN if group in train else VAL for group in groups]


def assign_splits(rows: list[dict], *, split_ratio: float | None, fixed_split: str | None,
                  groups: list[str] | None, seed: int) -> None:
    """Fill each row's `split`: `fixed_split` on every row ("" leaves it empty), else nothing
    when `split_ratio` is None, else a split of whole `groups` (one per row) when given, else of
    rows by `split_ratio`."""
    if fixed_split is not None:
        for row in rows:
            row["split"] = fixed_split or None
        return
    if split_ratio is None:
        return
    if groups is None:
        splits = split_by_ratio(len(rows), split_ratio, seed)
    else:
        splits = split_by_group(groups, split_ratio, seed)
    for row, split in zip(rows, splits, strict=True):
        row["split"] = split
