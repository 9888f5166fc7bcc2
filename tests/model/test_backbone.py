import pytest
import torch

from pipeline.model.backbone import (
    CheckpointMismatchError,
    MissingWeightsError,
    build_backbone,
    features_from_tokens,
    image_features,
    trunk_tokens,
    write_official_checkpoint,
)
from pipeline.model.lora import attach_lora


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def test_tiny_forward_image_matches_sam3_output_layout():
    backbone = build_backbone("tiny")
    with torch.inference_mode():
        out = backbone.forward_image(torch.randn(2, 3, 252, 252))
    assert out["vision_features"].shape == (2, 256, 18, 18)
    assert [tuple(f.shape) for f in out["backbone_fpn"]] == [
        (2, 256, 72, 72), (2, 256, 36, 36), (2, 256, 18, 18)]
    assert torch.equal(out["vision_features"], out["backbone_fpn"][-1])
    assert out["sam2_backbone_out"] is None


@pytest.mark.parametrize("levels", [("1x",), ("2x", "4x"), ("1x", "2x", "4x")])
def test_image_features_equal_forward_image_for_the_levels_asked(levels):
    backbone = build_backbone("tiny")
    _randomise(backbone, seed=2)
    x = torch.randn(2, 3, 252, 252)
    with torch.inference_mode():
        fpn = dict(zip(("4x", "2x", "1x"), backbone.forward_image(x)["backbone_fpn"], strict=True))
        out = image_features(backbone, x, levels)
    assert list(out) == list(levels)
    for lvl in levels:
        assert torch.equal(out[lvl], fpn[lvl]), lvl


def test_image_features_skip_the_other_branches_and_go_through_lora():
    peft_model = attach_lora(build_backbone("tiny"), r=4, alpha=8, dropout=0.0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: LoRA changes the output
    convs = peft_model.get_base_model().vision_backbone.convs
    ran = []
    for i, conv in enumerate(convs):
        conv.register_forward_pre_hook(lambda *_, i=i: ran.append(i))
    x = torch.randn(1, 3, 252, 252)
    with torch.inference_mode():
        adapted = image_features(peft_model, x, ("1x",))["1x"]
        expected = peft_model.forward_image(x)["vision_features"]
        with peft_model.disable_adapter():
            frozen = image_features(peft_model, x, ("1x",))["1x"]
    assert ran == [2, 0, 1, 2, 3, 2]  # 1x alone; forward_image runs all four branches
    assert torch.equal(adapted, expected) and not torch.allclose(adapted, frozen)


def test_tiny_weights_are_seeded():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_official_layout_checkpoint_loads_every_key(tmp_path):
    source = build_backbone("tiny")
    _randomise(source, seed=1)
    path = tmp_path / "sam3.pt"
    write_official_checkpoint(source, path)
    state = torch.load(path)
    # Parts of the full model that the vision backbone does not use sit beside it.
    state["model"]["detector.transformer.encoder.weight"] = torch.zeros(3)
    state["model"]["tracker.maskmem.weight"] = torch.zeros(3)
    sam2_neck = "detector.backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"
    state["model"][sam2_neck] = torch.zeros(1)
    torch.save(state, path)
    loaded = build_backbone("tiny", checkpoint=path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_checkpoint_missing_a_tensor_is_refused_by_name(tmp_path):
    path = tmp_path / "sam3.pt"
    write_official_checkpoint(build_backbone("tiny"), path)
    state = torch.load(path)
    key = "detector.backbone.vision_backbone.trunk.blocks.2.attn.qkv.weight"
    del state["model"][key]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        build_backbone("tiny", checkpoint=path)


def test_checkpoint_with_a_misshapen_tensor_is_refused_by_name(tmp_path):
    path = tmp_path / "sam3.pt"
    write_official_checkpoint(build_backbone("tiny"), path)
    state = torch.load(path)
    key = "detector.backbone.vision_backbone.convs.0.conv_1x1.weight"
    state["model"][key] = torch.zeros(2, 2)
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="convs.0.conv_1x1.weight has shape"):
        build_backbone("tiny", checkpoint=path)


def test_sam3_without_weights_says_what_to_do():
    with pytest.raises(MissingWeightsError) as info:
        build_backbone("sam3")
    text = str(info.value)
    assert "--checkpoint" in text and "huggingface.co/facebook/sam3" in text
    assert "HF_TOKEN" in text and "--backbone tiny" in text


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        build_backbone("tiny", checkpoint=tmp_path / "nope.pt")


def test_lora_targets_attention_only_and_adapter_changes_features(tmp_path):
    peft_model = attach_lora(build_backbone("tiny"))
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters()
                    if "lora_A" in n}
    assert lora_modules and all(n.split(".")[-2] == "attn" for n in lora_modules)
    assert not any("patch_embed" in n for n in lora_modules)
    assert {n.split(".")[-1] for n in lora_modules} == {"qkv", "proj"}
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(1, 3, 252, 252)
    with torch.inference_mode():
        frozen = build_backbone("tiny").forward_image(x)["vision_features"]
        adapted = build_backbone("tiny", adapter=tmp_path / "adapter").forward_image(x)
        direct = peft_model.eval().forward_image(x)["vision_features"]
    assert not torch.allclose(frozen, adapted["vision_features"], atol=1e-3)
    torch.testing.assert_close(adapted["vision_features"], direct)


def test_adapter_directory_without_weights_is_named(tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        build_backbone("tiny", adapter=tmp_path / "adapter")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("lora_after", [False, True])
def test_tokens_after_a_block_through_the_rest_equal_forward_image(block, lora_after):
    """trunk_tokens(K) then features_from_tokens(K) is forward_image split in two (fp32)."""
    backbone = build_backbone("tiny")
    _randomise(backbone, seed=3)
    model = backbone
    if lora_after:
        model = attach_lora(backbone, r=4, alpha=8, dropout=0.0, after_block=block)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a trained adapter after K
    x = torch.randn(2, 3, 252, 252)
    with torch.inference_mode():
        out = model.forward_image(x)
        tokens = trunk_tokens(model, x, block)
        split = features_from_tokens(model, tokens, block, ("1x", "2x", "4x"))
        if lora_after:
            with model.disable_adapter():
                frozen = model.forward_image(x)["vision_features"]
    assert tokens.shape == (2, 18, 18, 64)
    assert _relative(split["1x"], out["vision_features"]) < 1e-5
    for level, expected in zip(("4x", "2x", "1x"), out["backbone_fpn"], strict=True):
        assert _relative(split[level], expected) < 1e-5, level
    if lora_after:  # the adapter after K does act on the output
        assert _relative(frozen, out["vision_features"]) > 1e-3


def test_lora_after_a_block_targets_only_the_later_blocks(tmp_path):
    from peft import PeftModel

    from pipeline.model.lora import adapter_changes_tokens, first_adapted_block

    model = attach_lora(build_backbone("tiny"), r=4, after_block=1)
    blocks = {int(n.split("trunk.blocks.")[1].split(".")[0]) for n, _ in model.named_parameters()
              if "lora_A" in n}
    assert blocks == {2, 3}
    model.save_pretrained(tmp_path / "adapter")
    assert first_adapted_block(tmp_path / "adapter") == 2
    assert not adapter_changes_tokens(tmp_path / "adapter", 1)
    assert adapter_changes_tokens(tmp_path / "adapter", 2)
    assert adapter_changes_tokens(tmp_path / "adapter", None)
    plain = PeftModel.from_pretrained(build_backbone("tiny"), str(tmp_path / "adapter"))
    assert {n for n, _ in plain.named_parameters() if "lora_" in n} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="after_block must be in 0..2"):
        attach_lora(build_backbone("tiny"), after_block=3)


def test_an_unreachable_hub_fails_at_once_with_one_message(monkeypatch, caplog):
    import time

    import huggingface_hub.constants as hub

    from pipeline.model.backbone import MissingWeightsError, resolve_checkpoint

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match=r"(?s)127.0.0.1:9 unreachable.*--checkpoint"):
        resolve_checkpoint("sam3", None)
    assert time.perf_counter() - start < 10  # today: 29 s of retries
    assert "Retrying" not in caplog.text
