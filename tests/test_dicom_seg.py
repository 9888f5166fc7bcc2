"""`write_segmentation`: SEG objects of XA files written by pydicom, read back by pydicom and
highdicom (no model: masks given)."""

import highdicom as hd
import numpy as np
import pydicom
from dicom_files import write_xa

from pipeline.dicom_seg import SegAlgorithm, write_segmentation

ALGORITHM = SegAlgorithm(run="20261204-101500", backbone="tiny")


def test_some_frames_of_a_cine_run(tmp_path):
    source = write_xa(tmp_path / "run.dcm", np.zeros((5, 6, 10), np.uint16), bits_stored=12)
    masks = np.zeros((2, 6, 10), bool)
    masks[0, 1:3, 2:7] = True  # frame 2; frame 4 stays empty and is still a SEG frame
    path = write_segmentation(source, [2, 4], masks, tmp_path / "out" / "seg.dcm", ALGORITHM)
    seg = pydicom.dcmread(path)
    uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert seg.NumberOfFrames == 2 and seg.SegmentationType == "BINARY"
    references = [i.DerivationImageSequence[0].SourceImageSequence[0]
                  for i in seg.PerFrameFunctionalGroupsSequence]
    assert [(r.ReferencedSOPInstanceUID, r.ReferencedFrameNumber) for r in references] == [
        (uid, 2), (uid, 4)]
    assert {r.ReferencedSOPClassUID for r in references} == {"1.2.840.10008.5.1.4.1.1.12.1"}
    assert [list(i.FrameContentSequence[0].DimensionIndexValues)
            for i in seg.PerFrameFunctionalGroupsSequence] == [[1, 1], [1, 2]]
    assert seg.PatientName == "Doe^Jane" and seg.PatientBirthDate == "19500101"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmParameters == "run=20261204-101500,backbone=tiny"
    assert np.array_equal(seg.pixel_array.astype(bool), masks)
    read = hd.seg.segread(path)
    assert np.array_equal(read.get_pixels_by_source_frame(uid, [4, 2])[..., 0].astype(bool),
                          masks[::-1])


def test_a_single_frame_image_is_referenced_without_a_frame_number(tmp_path):
    source = write_xa(tmp_path / "one.dcm", np.zeros((6, 10), np.uint8), patient=None)
    masks = np.ones((1, 6, 10), bool)
    seg = pydicom.dcmread(write_segmentation(source, [1], masks, tmp_path / "seg.dcm",
                                             ALGORITHM))
    reference = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0] \
        .SourceImageSequence[0]
    assert "ReferencedFrameNumber" not in reference
    assert seg.PatientID is None or seg.PatientID == ""  # type 2: present, empty
    assert np.array_equal(seg.pixel_array.reshape(1, 6, 10).astype(bool), masks)
