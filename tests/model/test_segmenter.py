import torch

from pipeline.config import TrainConfig
from pipeline.model.segmenter import build_segmenter


def test_train_mode_keeps_drop_path_off_so_live_features_match_the_cache():
    """The cache is extracted in eval mode; in train mode (end-to-end steps) the trunk must give
    the same features, only LoRA dropout may differ (0 here), and checkpointing stays on."""
    config = TrainConfig(backbone="tiny", device="cpu", lora_dropout=0.0, e2e_every=0)
    model = build_segmenter(config, num_views=2, use_angles=False)
    trunk = model.backbone.get_base_model().vision_backbone.trunk
    assert any(getattr(m, "drop_prob", 0) > 0 for m in trunk.modules())  # SAM 3's setting
    image = torch.randint(0, 256, (2, 3, 252, 252), dtype=torch.uint8)
    with torch.no_grad():
        model.eval()
        cached = model.live_features(image)["1x"]
        model.train()
        assert trunk.training  # activation checkpointing depends on it
        torch.manual_seed(1)
        first = model.live_features(image)["1x"]
        torch.manual_seed(2)
        second = model.live_features(image)["1x"]
    torch.testing.assert_close(first, cached, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, cached, rtol=1e-5, atol=1e-6)
