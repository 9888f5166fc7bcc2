"""The image file formats read here, by suffix, and the error for a file that cannot be used.

The bottom of `pipeline.data`'s readers: `pipeline.data.dicom` (DICOM files) and
`pipeline.data.images` (every accepted format, DICOM through `dicom`) both build on it, so
neither imports the other back.
"""

from __future__ import annotations

from pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
"""Suffixes of the formats Pillow and tifffile read; anything else is tried as DICOM."""


class ImageError(UserError, ValueError):
    """An image or mask file that cannot be used; the message names the file."""
