"""Review videos: the frame rate a DICOM header gives, the overlay, MP4 and GIF read back."""

from fractions import Fraction

import av
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from pipeline.review_video import DEFAULT_RATE, frame_rate, overlay, write_review_video


def _header(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_frame_rate_from_cine_rate_else_frame_time_else_the_default():
    assert frame_rate(_header(CineRate=30, FrameTime=100)) == (Fraction(30), "Cine Rate")
    assert frame_rate(_header(FrameTime="66.666667")) == (Fraction(15), "Frame Time")
    assert frame_rate(_header(FrameTime=80)) == (Fraction(25, 2), "Frame Time")
    assert frame_rate(_header())[0] == DEFAULT_RATE
    assert frame_rate(_header(CineRate=0, FrameTime=""))[0] == DEFAULT_RATE


def test_overlay_tints_mask_pixels_only():
    frames = np.full((1, 2, 2), 100, np.uint8)
    masks = np.array([[[True, False], [False, False]]])
    out = overlay(frames, masks)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, 0, 0].tolist() == [178, 50, 50] and out[0, 1, 1].tolist() == [100] * 3


def test_mp4_and_gif_hold_every_frame_at_the_rate(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 21, 30)).astype(np.uint8)
    masks = frames > 200
    path, note = write_review_video(frames, masks, tmp_path / "review", Fraction(25, 2))
    assert path.name == "review.mp4" and note is None
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(25, 2)
        assert sum(1 for _ in container.decode(video=0)) == 5
    path, _ = write_review_video(frames, masks, tmp_path / "review", Fraction(10), "gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 100
    assert not list(tmp_path.glob("*.part"))
