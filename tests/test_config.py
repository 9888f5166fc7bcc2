import argparse
import dataclasses
import re

import pytest
from conftest import REPO

from pipeline.config import (
    ExtractConfig,
    TrainConfig,
    _field_docs,
    add_arguments,
    describe,
    from_arguments,
)
from pipeline.data.augment import CopyPlan


@pytest.mark.parametrize("cls", [ExtractConfig, TrainConfig])
def test_every_field_is_a_documented_flag(cls):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    actions = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(cls):
        assert field.name in actions, field.name
        assert len(actions[field.name].help) > 20, field.name
        assert "--" + field.name.replace("_", "-") in actions[field.name].option_strings
    text = " ".join(parser.format_help().split())  # argparse formats help with %: escaped
    if cls is ExtractConfig:  # its codec help holds a "%"
        assert "about 10 % of disk" in text


def test_flags_parse_into_the_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(["--backbone", "tiny", "--levels", "4x,1x", "--epochs", "3",
                              "--no-image-branch", "--decoder", "legacy", "--device", "cpu",
                              "--lr", "0.002"])
    config = from_arguments(TrainConfig, args)
    assert config.levels == ("1x", "4x") and config.epochs == 3 and config.lr == 0.002
    assert config.image_branch is False and config.amp == "off"  # auto resolves to off on CPU


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "vit_h"}, "--backbone must be one of"),
    ({"levels": ("2x",)}, "--levels must include 1x"),
    ({"levels": ("1x", "8x")}, "--levels must include 1x"),
    ({"amp": "fp8"}, "--amp must be"),
    ({"augment_copies": 33}, "between 0 and 32"),
    ({"augment": "flips", "augment_copies": 6}, "between 0 and 5"),
    ({"augment": "elastic"}, "--augment must be one of"),
    ({"device": "tpu"}, "--device must be"),
])
def test_contradictory_or_unknown_settings_are_refused(kwargs, message):
    for cls in (ExtractConfig, TrainConfig):
        with pytest.raises(ValueError, match=message):
            cls(**{"device": "cpu", **kwargs})


def test_stage_specific_checks():
    with pytest.raises(ValueError, match="--codec must be one of"):
        ExtractConfig(device="cpu", codec="gzip")
    with pytest.raises(ValueError, match="--refresh-cache needs end-to-end steps"):
        TrainConfig(device="cpu", refresh_cache=True, e2e_every=0)
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        TrainConfig(device="cpu", workers=4, batch_size=2)
    # A setting of the decoder not chosen is refused, not silently ignored.
    with pytest.raises(ValueError, match="--width: only --decoder legacy reads this, and "
                                         "--decoder is detail"):
        TrainConfig(device="cpu", width=32)
    with pytest.raises(ValueError, match="--crop-size, --mirror-tta: only --decoder detail"):
        TrainConfig(device="cpu", decoder="legacy", crop_size=128, mirror_tta=False)


def test_training_config_names_the_cache_it_needs():
    config = TrainConfig(device="cpu", backbone="tiny", levels=("1x", "2x"), augment_copies=1,
                         adapter="runs/x/adapter", augment_seed=2)
    extract = config.extract_config()
    assert extract.copy_plan == config.copy_plan == CopyPlan("random", 1, 2)
    assert (extract.backbone, extract.levels, extract.amp, extract.adapter,
            extract.augment_copies) == ("tiny", ("1x", "2x"), "off", "runs/x/adapter", 1)
    assert config.extract_config(adapter="other").adapter == "other"


def test_given_fields_are_only_the_flags_on_the_command_line():
    from pipeline.config import given_fields

    assert given_fields(TrainConfig, ["--resume", "runs/x", "--epochs", "30", "--lr", "1e-4"]) == {
        "resume", "epochs", "lr"}  # 30 and 1e-4 are the defaults: still given, still checked


def test_step_budget_rule():
    from pipeline.config import MAX_STEPS, MIN_STEPS, default_steps

    # 14 images at batch 16: one step an epoch; the floor decides.
    assert TrainConfig(device="cpu").total_steps(14) == default_steps(14, 16) == MIN_STEPS
    assert default_steps(16 * 100, 16) == 2000  # 20 epochs of 100 steps
    assert default_steps(50_000, 16) == MAX_STEPS  # 3125 steps an epoch: capped
    assert TrainConfig(device="cpu", steps=123).total_steps(14) == 123
    assert TrainConfig(device="cpu", epochs=3, batch_size=4).total_steps(14) == 3 * 4
    assert TrainConfig(device="cpu", epochs=0, steps=0).total_steps(14) == MIN_STEPS  # 0: unset


def test_validation_interval():
    assert TrainConfig(device="cpu").validation_interval(600, 14) == 40  # about 15 a run
    assert TrainConfig(device="cpu", val_every=7).validation_interval(600, 14) == 7
    assert TrainConfig(device="cpu", epochs=2, batch_size=4).validation_interval(8, 14) == 4
    assert TrainConfig(device="cpu", steps=5).validation_interval(5, 14) == 1


def test_step_budget_flags_are_checked():
    with pytest.raises(ValueError, match="give --steps or --epochs, not both"):
        TrainConfig(device="cpu", steps=10, epochs=2)
    with pytest.raises(ValueError, match="--steps must be >= 0"):
        TrainConfig(device="cpu", steps=-1)
    with pytest.raises(ValueError, match="--loss must be one of"):
        TrainConfig(device="cpu", loss="focal")
    with pytest.raises(ValueError, match="--warmup in"):
        TrainConfig(device="cpu", warmup=1.0)


def test_help_shows_defaults_as_they_are_typed():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    text = " ".join(parser.format_help().split())
    assert "(default: 1x); comma-separated" in text and "(default: none)" in text
    assert "('" not in text and "(default: ())" not in text and "(default: None)" not in text
    assert "default: every visible GPU." in text  # the docstring's own words, not "()"


def test_resume_help_and_readme_name_exactly_the_resumable_flags():
    from pipeline.train.setup import RESUMABLE

    flags = {"--" + name.replace("_", "-") for name in RESUMABLE}
    help_text = " ".join(_field_docs(TrainConfig)["resume"].split())
    assert set(re.findall(r"--[a-z-]+", help_text.split("only", 1)[1])) == flags
    readme = " ".join((REPO / "README.md").read_text().split())
    sentence = readme.split("A resume keeps the run's own settings;", 1)[1].split(". ")[0]
    assert set(re.findall(r"--[a-z-]+", sentence)) == flags


def test_the_printed_config_is_every_field_in_lines_of_100_columns():
    for config in (TrainConfig(backbone="tiny", device="cpu", levels=("1x", "4x")),
                   ExtractConfig(backbone="tiny", device="cpu")):
        text = describe(config)
        assert text.startswith("config: data=demo backbone=tiny ")
        assert max(map(len, text.splitlines())) <= 100
        pairs = dict(p.split("=", 1) for p in text.removeprefix("config:").split())
        assert list(pairs) == [f.name for f in dataclasses.fields(config)]
        assert pairs["checkpoint"] == "-" and pairs["gpus"] == "-"
    assert pairs["levels"] == "1x" and "levels=1x,4x" in describe(
        TrainConfig(backbone="tiny", device="cpu", levels=("1x", "4x")))
