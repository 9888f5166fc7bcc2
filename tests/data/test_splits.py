"""Seeded splits: whole groups on one side, both sides kept, a fixed split on every row."""

from pipeline.data.splits import TRAIN, VAL, assign_splits, split_by_group, split_by_ratio


def test_a_group_never_straddles_train_and_val():
    groups = ["P1"] * 5 + ["P2"] * 3 + ["P3"] * 2 + ["P4"] * 4
    splits = split_by_group(groups, 0.7, seed=3)
    by_group = {g: {s for g2, s in zip(groups, splits, strict=True) if g2 == g} for g in groups}
    assert all(len(sides) == 1 for sides in by_group.values())
    assert {TRAIN, VAL} <= set(splits)
    assert split_by_group(groups, 0.7, seed=3) == splits  # seeded


def test_both_sides_kept_at_extreme_ratios():
    assert sorted(split_by_ratio(2, 0.99, seed=0)) == [TRAIN, VAL]
    assert set(split_by_group(["a", "a", "b"], 0.01, seed=0)) == {TRAIN, VAL}
    assert set(split_by_group(["a", "a", "b"], 0.99, seed=0)) == {TRAIN, VAL}
    assert split_by_ratio(1, 0.5, seed=0) in ([TRAIN], [VAL])


def test_assign_splits_fixed_none_and_grouped():
    rows = [{} for _ in range(4)]
    assign_splits(rows, split_ratio=0.5, fixed_split="test", groups=None, seed=0)
    assert [r["split"] for r in rows] == ["test"] * 4
    assign_splits(rows, split_ratio=0.5, fixed_split="", groups=None, seed=0)
    assert [r["split"] for r in rows] == [None] * 4
    untouched = [{} for _ in range(4)]
    assign_splits(untouched, split_ratio=None, fixed_split=None, groups=None, seed=0)
    assert untouched == [{}] * 4
    assign_splits(rows, split_ratio=0.5, fixed_split=None, groups=["a", "a", "b", "b"], seed=1)
    assert rows[0]["split"] == rows[1]["split"] != rows[2]["split"] == rows[3]["split"]
