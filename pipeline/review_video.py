"""A review video of one DICOM run: its frames with the predicted vessels overlaid in red.

MP4 (H.264, yuv420p) through PyAV, whose wheel ships FFmpeg and libx264; an animated GIF
(Pillow) when PyAV is missing or cannot encode, or when asked for. The video holds pixels and
timing only: no title, comment or other metadata from the DICOM header.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.durable import write_atomically

VIDEO_FORMATS = ("mp4", "gif", "none")
OVERLAY_COLOR = np.array([255, 0, 0], np.uint16)
DEFAULT_RATE = Fraction(15)
"""Frames per second of a run whose header has neither Cine Rate nor Frame Time."""


def frame_rate(header) -> tuple[Fraction, str]:
    """(frames per second, where it came from) of a DICOM run: Cine Rate (0018,0040), else
    1000 / Frame Time (0018,1063, ms), else `DEFAULT_RATE`."""
    cine = header.get("CineRate")
    if cine not in (None, "") and float(cine) > 0:
        return Fraction(str(float(cine))).limit_denominator(1000), "Cine Rate"
    frame_time = header.get("FrameTime")
    if frame_time not in (None, "") and float(frame_time) > 0:
        return (Fraction(1000) / Fraction(str(float(frame_time)))).limit_denominator(1000), \
            "Frame Time"
    return DEFAULT_RATE, "default, no Cine Rate or Frame Time"


def overlay(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """frames (N, H, W) or (N, H, W, 3) uint8, masks (N, H, W) bool -> (N, H, W, 3) uint8 with
    the mask's pixels halfway to red (rounded half up)."""
    rgb = frames if frames.ndim == 4 else np.repeat(frames[..., None], 3, axis=-1)
    out = rgb.copy()
    out[masks] = (rgb[masks].astype(np.uint16) + OVERLAY_COLOR + 1) // 2
    return out


def write_review_video(frames: np.ndarray, masks: np.ndarray, out_stem: Path, rate: Fraction,
                       video_format: str = "mp4") -> tuple[Path, str | None]:
    """Write `overlay(frames, masks)` at `rate` frames per second to `out_stem` + ".mp4" (or
    ".gif"); returns (the path, a note when the MP4 fell back to GIF)."""
    pictures = overlay(frames, masks)
    note = None
    if video_format == "mp4":
        try:
            return _write_mp4(pictures, out_stem.with_suffix(".mp4"), rate), None
        except (ImportError, OSError, ValueError) as err:  # no PyAV, or no encoder
            note = f"MP4 not written ({type(err).__name__}: {err}); a GIF instead"
    return _write_gif(pictures, out_stem.with_suffix(".gif"), rate), note


def _write_mp4(pictures: np.ndarray, path: Path, rate: Fraction) -> Path:
    import av

    height, width = pictures.shape[1:3]
    # yuv420p needs even sides: pad the last row / column by repeating it
    pictures = np.pad(pictures, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    part = path.with_name(path.name + ".part")
    with av.open(str(part), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = pictures.shape[2], pictures.shape[1]
        stream.pix_fmt = "yuv420p"
        # veryfast: 3.5x faster than x264's default preset for the same size (BENCHMARKS.md)
        stream.options = {"crf": "18", "preset": "veryfast"}
        for picture in pictures:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    part.replace(path)
    return path


def _write_gif(pictures: np.ndarray, path: Path, rate: Fraction) -> Path:
    from io import BytesIO

    from PIL import Image

    images = [Image.fromarray(picture) for picture in pictures]
    buffer = BytesIO()
    # GIF delays are in hundredths of a second: the nearest to the run's rate
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=round(1000 / float(rate), -1), loop=0)
    write_atomically(path, buffer.getvalue())
    return path
