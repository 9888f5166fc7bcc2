"""Real DICOM X-ray angiography objects written with pydicom's own writer, for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"


def write_xa(path: Path, stored: np.ndarray, *, bits_stored: int = 8,
             photometric: str = "MONOCHROME2", angles: tuple[float, float] | None = (30.0, 20.0),
             patient: str | None = "P001", study: str | None = None,
             window: tuple[float, float] | None = None,
             rescale: tuple[float, float] | None = None, pixels: bool = True,
             syntax: str = ExplicitVRLittleEndian, encapsulated: list[bytes] | None = None) -> Path:
    """Write `stored` ((H, W) one frame or (N, H, W) a cine run; uint8 or uint16 stored values)
    as an XA object; `encapsulated` gives compressed frames for a compressed `syntax`."""
    frames = stored[None] if stored.ndim == 2 else stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = XA_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.PatientName, ds.PatientBirthDate, ds.StudyDate = "Doe^Jane", "19500101", "20240102"
    if patient is not None:
        ds.PatientID = patient
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if angles is not None:
        ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = angles
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if encapsulated is not None:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].VR = "OB"
    elif pixels:
        dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
        ds.PixelData = frames.astype(dtype).tobytes()
        ds["PixelData"].VR = "OB" if dtype == np.uint8 else "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
