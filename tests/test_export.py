import contextlib
import io
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, make_dataset
from PIL import Image
from sam3.model_builder import _load_checkpoint

from pipeline.cli import export_main as main
from pipeline.cli import predict_main
from pipeline.config import TrainConfig
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.data.native_samples import NativeSampling
from pipeline.data.samples import SegmentationSamples
from pipeline.export import ExportError, export, load_exported
from pipeline.model.backbone import (
    PRESETS,
    _build_backbone,
    build_backbone,
    write_official_checkpoint,
)
from pipeline.predict import load_run
from pipeline.train.launch import train

EXTRA = {  # parts of the full SAM 3 checkpoint that the vision backbone does not use
    "detector.transformer.encoder.layers.0.weight": torch.randn(4, 4),
    "detector.backbone.language_backbone.encoder.weight": torch.randn(3, dtype=torch.bfloat16),
    "detector.backbone.vision_backbone.sam2_convs.0.conv_1x1.weight": torch.randn(2),
    "tracker.maskmem_backbone.weight": torch.randn(5),
}


def _official_checkpoint(path):
    """A tiny backbone with random weights, saved in sam3.pt's layout with the other parts."""
    source = build_backbone("tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    write_official_checkpoint(source, path)
    whole = torch.load(path)
    whole["model"].update(EXTRA)
    torch.save(whole, path)
    return whole["model"]


def _train(dataset, tmp_path, name, epochs=1, **kw):
    return train(TrainConfig(data=str(dataset), backbone="tiny", cache_dir=str(tmp_path / "c"),
                             run_dir=str(tmp_path / name), epochs=epochs, batch_size=4,
                             loader_workers=0, overlays=0, tensorboard=False,
                             extract_missing=True, **kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, run, source state): a tiny run on an official-layout checkpoint whose LoRA moved
    away from its zero start (end-to-end steps at a high rate: two, as the first only moves the
    detail decoder's fusion convs away from their zero start; one validation, after both),
    trained with deep supervision, whose auxiliary head the exported head leaves out."""
    root = tmp_path_factory.mktemp("export")
    source = _official_checkpoint(root / "sam3.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        run = _train(make_dataset(root / "data", 6), root, "run",
                     checkpoint=str(root / "sam3.pt"), e2e_every=1, epochs=2, val_every=2,
                     warmup=0.0, lr=1e-2, deep_supervision=1)
    return root, run, source


class _Sam3Image(torch.nn.Module):
    """What SAM 3's `_load_checkpoint` fills: `backbone` (+ no interactive predictor)."""

    def __init__(self):
        super().__init__()
        self.backbone = _build_backbone(PRESETS["tiny"])
        self.inst_interactive_predictor = None


def test_export_merges_lora_into_the_official_checkpoint(trained, tmp_path):
    root, run, source = trained
    assert main(["--run", str(run), "--checkpoint", str(root / "sam3.pt"),
                 "--out", str(tmp_path / "sam3_vessels.pt")]) == 0
    exported = torch.load(tmp_path / "sam3_vessels.pt", weights_only=True)
    assert list(exported) == ["model"] and list(exported["model"]) == list(source)
    changed = {k for k in source if not torch.equal(exported["model"][k], source[k])}
    depth = PRESETS["tiny"].depth  # the attention qkv and proj weights of every block, only
    assert changed == {f"detector.backbone.vision_backbone.trunk.blocks.{b}.attn.{m}.weight"
                       for b in range(depth) for m in ("qkv", "proj")}
    assert all(exported["model"][k].dtype == v.dtype for k, v in source.items())

    sam3_model, printed = _Sam3Image(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        _load_checkpoint(sam3_model, str(tmp_path / "sam3_vessels.pt"))  # SAM 3's own loader
    assert "missing" not in printed.getvalue()
    lora = build_backbone("tiny", checkpoint=root / "sam3.pt", adapter=run / "adapter")
    frozen = build_backbone("tiny", checkpoint=root / "sam3.pt")
    x = torch.randn(2, 3, 252, 252)
    with torch.no_grad():
        expected = lora.forward_image(x)
        merged = sam3_model.backbone.eval().forward_image(x)
        reloaded = build_backbone("tiny", checkpoint=tmp_path / "sam3_vessels.pt").forward_image(x)
        before = frozen.forward_image(x)["vision_features"]
    assert not torch.allclose(before, expected["vision_features"], atol=1e-4)
    for out in (merged, reloaded):
        for a, b in zip(out["backbone_fpn"], expected["backbone_fpn"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_head_beside_it_gives_the_runs_masks(trained, tmp_path):
    root, run, _ = trained
    out, head = export(run, tmp_path / "sam3_vessels.pt", root / "sam3.pt")
    assert head == tmp_path / "sam3_vessels_head.pt"
    model, views = load_exported(out, head, amp="off")
    assert not any(k.startswith("aux_heads.") for k in torch.load(head)["decoder"])
    reference, _, _, run_views = load_run(run, torch.device("cpu"))
    assert len(reference.decoder.aux_heads) == 1
    assert views == run_views
    samples = SegmentationSamples(read_manifest(root / "data" / "manifest.csv"),
                                  resolution=252, views=views,
                                  native=NativeSampling(crop=None, max_side=1024))
    batch = {key: torch.stack([torch.as_tensor(samples[i][key]) for i in range(3)])
             for key in ("image", "pixels", "box", "view")}
    with torch.no_grad():
        torch.testing.assert_close(model.infer(batch, live=True),
                                   reference.infer(batch, live=True), rtol=1e-4, atol=1e-4)


def test_tiny_without_a_checkpoint_and_a_wrong_checkpoint(dataset, tmp_path):
    run = _train(dataset, tmp_path, "seeded", e2e_every=0)
    out, _ = export(run, tmp_path / "tiny_vessels.pt")  # the seeded weights, official layout
    seeded = build_backbone("tiny")
    loaded = build_backbone("tiny", checkpoint=out)
    assert torch.equal(loaded.state_dict()["vision_backbone.convs.0.conv_1x1.weight"],
                       seeded.state_dict()["vision_backbone.convs.0.conv_1x1.weight"])
    _official_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ExportError, match="is not the checkpoint .* trained on"):
        export(run, tmp_path / "x.pt", tmp_path / "other.pt")
    with pytest.raises(ExportError, match="config.json is missing: export a finished"):
        export(tmp_path / "c", tmp_path / "x.pt")


def test_export_never_writes_over_what_it_reads_and_asks_before_replacing(trained, tmp_path,
                                                                           capsys):
    root, run, _ = trained
    checkpoint = ["--checkpoint", str(root / "sam3.pt")]
    kept = {p: p.read_bytes() for p in (run / "best.pt", root / "sam3.pt")}
    for out, target in ((run / "best.pt", run / "best.pt"), (root / "sam3.pt", root / "sam3.pt"),
                        (run / "last.pt", run / "last.pt")):
        assert main(["--run", str(run), *checkpoint, "--out", str(out)]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: --out {out} would overwrite {target}, "), error
    assert all(p.read_bytes() == b for p, b in kept.items())
    out = tmp_path / "vessels.pt"
    out.write_bytes(b"mine")
    assert main(["--run", str(run), *checkpoint, "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {out} exists; pass --overwrite to replace it, or choose another --out")
    assert out.read_bytes() == b"mine"
    assert main(["--run", str(run), *checkpoint, "--out", str(out), "--overwrite"]) == 0
    assert list(torch.load(out, weights_only=True)) == ["model"]


def test_the_readmes_segment_block_runs_as_written_and_matches_predict(trained, tmp_path,
                                                                        monkeypatch):
    root, run, _ = trained
    export(run, tmp_path / "sam3_vessels.pt", root / "sam3.pt")
    image = root / "data" / "img" / "000.png"  # view LAO, 64 x 64
    shutil.copy(image, tmp_path / "angio.png")
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(from pipeline\.export import load_exported, segment\n.*?)```",
                      readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block, scope)  # noqa: S102 - the README's own example
    mask, probability = scope["mask"], scope["probability"]
    with pytest.warns(UserWarning, match="the run learnt no C-arm angles: `angles` is ignored"):
        scope["segment"](scope["model"], scope["views"], "angio.png", view="LAO",
                         angles=(30.0, 20.0))
    assert mask.shape == probability.shape == (64, 64) and mask.dtype == bool
    assert np.array_equal(mask, probability > 0.5)
    # The probabilities the run's own model gives, as predict runs it (mirror TTA included).
    reference, _, config, views = load_run(run, torch.device("cpu"))
    assert config.mirror_tta
    dataset = SegmentationSamples(read_manifest(root / "data" / "manifest.csv")[:1],
                                  resolution=252, views=views, native=config.native_whole)
    batch = {key: torch.stack([torch.as_tensor(dataset[0][key])])
             for key in ("image", "pixels", "box", "view")}
    with torch.no_grad():
        logits = reference.infer(batch, live=True, tile_size=config.tile_size, mirror=True)
    unmirrored = torch.sigmoid(reference.infer(batch, live=True)[0, 0])
    expected = torch.sigmoid(logits[0, 0])
    assert not torch.allclose(expected, unmirrored, atol=1e-4)  # mirroring shows
    torch.testing.assert_close(torch.from_numpy(probability), expected, rtol=1e-4, atol=1e-4)
    manifest = write_manifest(tmp_path / "one.csv", [{"image": image, "view": "LAO"}])
    assert predict_main(["--run", str(run), "--data", str(manifest), "--out",
                         str(tmp_path / "pred"), "--device", "cpu", "--loader-workers", "0"]) == 0
    predicted = np.asarray(Image.open(next((tmp_path / "pred").glob("*_mask.png")))) > 0
    assert np.array_equal(mask, predicted)
