"""A DICOM Segmentation object (SEG) for the predicted frames of one DICOM run, with highdicom.

highdicom (0.28) builds every module of the SEG (patient and study copied from the source,
general equipment, the segment and its algorithm identification, the binary pixel encoding),
but it refuses a multi-frame source without a Frame of Reference, which is every XA cine run
("Only a single frame is supported when the source image has no Frame of Reference UID",
highdicom issues #200 and #284). So it is given a single-frame stand-in of the run (its header,
one frame, a single-frame SOP class) and the object is then widened to the predicted frames:

- one SEG frame per predicted source frame, in frame order, empty frames included;
- each frame's Derivation Image Sequence names the source's SOP Class and Instance UID and its
  Referenced Frame Number;
- a second dimension index, Temporal Position Index (Frame Content Sequence) = the source frame
  number, since segment number alone no longer tells the frames apart.

highdicom reads the result back (`highdicom.seg.segread(...).get_pixels_by_source_frame`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline.durable import write_atomically

TOOL = "sam3-vessel-cache"
STAND_IN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography: single frame, no FoR
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Type 2 attributes of the patient and study modules highdicom copies: present (empty when the
source has none), as the standard requires."""


def tool_version() -> str:
    try:
        return version(TOOL)
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


@dataclass(frozen=True)
class SegAlgorithm:
    """How the masks were made, for the SEG's algorithm identification."""

    run: str
    """The train_head.py run directory's name."""
    backbone: str


def write_segmentation(source: Path, frames: list[int], masks: np.ndarray, out: Path,
                       algorithm: SegAlgorithm) -> Path:
    """Write the SEG of `frames` (source frame numbers from 1, ascending) of the DICOM file
    `source` to `out`: masks (len(frames), H, W) bool at the frames' own size."""
    import pydicom
    from pydicom.pixels import pack_bits

    if masks.shape[0] != len(frames) or list(frames) != sorted(set(frames)):
        raise ValueError(f"{len(frames)} ascending frame numbers for {masks.shape[0]} masks")
    header = pydicom.dcmread(source, stop_before_pixels=True)
    seg = _one_frame_seg(header, masks[0], algorithm)
    sop_class = header.SOPClassUID
    for item in [*seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence,
                 *seg.get("SourceImageSequence", [])]:
        item.ReferencedSOPClassUID = sop_class
    multi_frame = "NumberOfFrames" in header
    template = seg.PerFrameFunctionalGroupsSequence[0]
    per_frame = []
    for index, frame in enumerate(frames, start=1):
        item = copy.deepcopy(template)
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        reference.ReferencedSOPClassUID = sop_class
        if multi_frame:
            reference.ReferencedFrameNumber = frame
        content = item.FrameContentSequence[0]
        content.DimensionIndexValues = [1, index]
        content.TemporalPositionIndex = frame
        per_frame.append(item)
    seg.PerFrameFunctionalGroupsSequence = per_frame
    seg.DimensionIndexSequence.append(_temporal_dimension(seg))
    seg.NumberOfFrames = len(frames)
    seg.PixelData = pack_bits(masks.astype(np.uint8))  # frames packed end to end, padded to even
    out.parent.mkdir(parents=True, exist_ok=True)
    from io import BytesIO

    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    write_atomically(out, buffer.getvalue())
    return out


def _one_frame_seg(header, mask: np.ndarray, algorithm: SegAlgorithm):
    """highdicom's SEG of frame 1 of a single-frame stand-in of `header` (see the docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    stand_in = copy.deepcopy(header)
    stand_in.SOPClassUID = STAND_IN_SOP_CLASS
    if "NumberOfFrames" in stand_in:
        del stand_in.NumberOfFrames
    for keyword in TYPE_2:
        if keyword not in stand_in:
            setattr(stand_in, keyword, None)
    identification = hd.AlgorithmIdentificationSequence(
        name=TOOL, family=codes.cid7162.ArtificialIntelligence, version=tool_version(),
        parameters={"run": algorithm.run, "backbone": algorithm.backbone})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="vessel",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.BloodVessel,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification)
    return hd.seg.Segmentation(
        source_images=[stand_in], pixel_array=mask[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=TOOL,
        manufacturer_model_name="ViewConditionedDecoder", software_versions=tool_version(),
        device_serial_number="none", content_label="VESSEL",
        content_description=f"vessel masks of run {algorithm.run}"[:64],
        omit_empty_frames=False)


def _temporal_dimension(seg):
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    dimension = Dataset()
    dimension.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    dimension.DimensionIndexPointer = Tag("TemporalPositionIndex")
    dimension.FunctionalGroupPointer = Tag("FrameContentSequence")
    dimension.DimensionDescriptionLabel = "Temporal Position Index"
    return dimension
