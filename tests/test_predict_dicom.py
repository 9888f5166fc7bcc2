"""`predict` on DICOM runs: XA files written by pydicom -> SEG, review video, frames.csv, scores.

One tiny run is trained (module fixture) on the masked frames of the runs, imported with `import
dicom`; predicting the runs then finds those frames' features in its cache.
"""

import csv
import json
from fractions import Fraction
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_files import write_xa
from PIL import Image

from pipeline.cli import predict_main
from pipeline.config import TrainConfig
from pipeline.data.dicom import read_frames
from pipeline.data.dicom_import import import_dicom
from pipeline.data.manifest import UNKNOWN_VIEW, read_manifest
from pipeline.dicom_seg import TOOL
from pipeline.predict_dicom import frame_key
from pipeline.train.launch import train

H, W = 45, 58  # odd, not square: the video pads to even sides, masks keep this size
IDENTIFIERS = ("P001", "P002", "Doe", "Jane", "19500101", "20240102")


def _frames(rng, n: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """n stored frames (0..top) with a dark vertical vessel that drifts, and its masks."""
    stored = rng.integers(top // 2, top, (n, H, W))
    masks = np.zeros((n, H, W), bool)
    for i in range(n):
        masks[i, :, 20 + 2 * i: 24 + 2 * i] = True
    stored[masks] //= 4
    return stored, masks


def _timing(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def cathlab(tmp_path_factory):
    root = tmp_path_factory.mktemp("cathlab")
    rng = np.random.default_rng(5)
    runs, truth = root / "runs", {}
    a, truth["runA"] = _frames(rng, 4, 4096)
    write_xa(runs / "room1" / "runA.dcm", a.astype(np.uint16), bits_stored=12,
             angles=(30.0, 20.0), patient="P001")
    _timing(runs / "room1" / "runA.dcm", CineRate=15)
    b, truth["runB"] = _frames(rng, 3, 256)
    write_xa(runs / "room1" / "runB.dcm", (255 - b).astype(np.uint8), photometric="MONOCHROME1",
             angles=(-31.0, -18.0), patient="P001")
    _timing(runs / "room1" / "runB.dcm", FrameTime=40.0)  # 25 fps
    c, truth["runC"] = _frames(rng, 3, 256)
    write_xa(runs / "room2" / "runC.dcm", c.astype(np.uint8), angles=None, patient="P002")
    masks = root / "masks"
    masks.mkdir()
    for name, frame in (("runA", 1), ("runA", 3), ("runB", 2), ("runC", 2)):
        Image.fromarray(truth[name][frame - 1].astype(np.uint8) * 255).save(
            masks / f"{name}_{frame}.png")
    manifest = import_dicom(runs, root / "train.csv", frames_dir=root / "frames",
                            masks_dir=masks, split_ratio=None, split_column="train").manifest
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf"))
        run = train(TrainConfig(data=str(manifest), backbone="tiny", cache_dir=str(root / "c"),
                                run_dir=str(root / "run"), epochs=1, batch_size=4, e2e_every=0,
                                extract_missing=True, allow_empty_val=True, loader_workers=0,
                                overlays=0, device="cpu"))
    return {"root": root, "runs": runs, "masks": masks, "run": Path(run)}


def _predict(cathlab, out, *extra) -> int:
    return predict_main(["--run", str(cathlab["run"]), "--out", str(out), "--device", "cpu",
                         "--loader-workers", "0", *map(str, extra)])


def _csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _manifest_masks(cathlab, tmp_path) -> dict[tuple[str, int], np.ndarray]:
    """(run stem, frame) -> the mask `predict` writes for that frame through a manifest of every
    frame imported by `import dicom`."""
    manifest = import_dicom(cathlab["runs"], tmp_path / "all.csv", frames_dir=tmp_path / "f",
                            all_frames=True, split_ratio=None).manifest
    assert predict_main(["--run", str(cathlab["run"]), "--data", str(manifest), "--out",
                         str(tmp_path / "manifest"), "--device", "cpu", "--loader-workers", "0",
                         "--overlays", "0"]) == 0
    samples = {s.row: s for s in read_manifest(manifest)}
    masks = {}
    for row in _csv(tmp_path / "manifest" / "predictions.csv"):
        sample = samples[int(row["row"])]
        masks[sample.source.stem, sample.frame] = np.asarray(Image.open(row["mask"])) > 0
    return masks


def test_runs_give_a_seg_a_video_and_frames_csv_equal_to_manifest_predictions(cathlab, tmp_path,
                                                                              capsys):
    out = tmp_path / "pred"
    assert _predict(cathlab, out, "--data", cathlab["runs"], "--masks", cathlab["masks"]) == 0
    console = capsys.readouterr().out
    assert "runC.dcm: no Positioner Primary/Secondary Angle" in console
    assert "predicted with the unknown view" in console
    runs = {r["run"]: r for r in _csv(out / "runs.csv")}
    assert set(runs) == {"room1/runA", "room1/runB", "room2/runC"}
    # the masked frames were trained on, so extracted: reused here, the rest live
    assert [(runs[n]["cached"], runs[n]["live"]) for n in sorted(runs)] == [
        ("2", "2"), ("1", "2"), ("1", "2")]
    expected = _manifest_masks(cathlab, tmp_path)
    for name, frames in (("room1/runA", 4), ("room1/runB", 3), ("room2/runC", 3)):
        source = pydicom.dcmread(cathlab["runs"] / f"{name}.dcm", stop_before_pixels=True)
        seg = pydicom.dcmread(out / name / "seg.dcm")
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.NumberOfFrames == frames
        assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == \
            source.StudyInstanceUID
        assert seg.SegmentSequence[0].SegmentLabel == "vessel"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == TOOL and "run=run" in algorithm.AlgorithmParameters
        references = [item.DerivationImageSequence[0].SourceImageSequence[0]
                      for item in seg.PerFrameFunctionalGroupsSequence]
        assert {r.ReferencedSOPInstanceUID for r in references} == {source.SOPInstanceUID}
        assert [int(r.ReferencedFrameNumber) for r in references] == list(range(1, frames + 1))
        stem = Path(name).name
        pixels = seg.pixel_array.reshape(frames, H, W).astype(bool)
        for i in range(frames):
            assert np.array_equal(pixels[i], expected[stem, i + 1]), (name, i + 1)
        # highdicom reads it back by source frame
        by_frame = hd.seg.segread(out / name / "seg.dcm").get_pixels_by_source_frame(
            source.SOPInstanceUID, [2, 1])
        assert np.array_equal(by_frame[..., 0].astype(bool), pixels[[1, 0]])
        table = _csv(out / name / "frames.csv")
        assert [int(r["frame"]) for r in table] == list(range(1, frames + 1))
        assert [int(r["vessel_pixels"]) for r in table] == [int(p.sum()) for p in pixels]
    runa = _csv(out / "room1" / "runA" / "frames.csv")
    assert [bool(r["dice"]) for r in runa] == [True, False, True, False]
    assert {r["view"] for r in runa} == {"LAO30_CRA20"}
    report = json.loads((out / "report.json").read_text())
    assert report["predict"]["n"] == 4
    assert {v: s["n"] for v, s in report["predict"]["per_view"].items()} == {
        "LAO30_CRA20": 2, "RAO30_CAU20": 1, UNKNOWN_VIEW: 1}
    assert {r: s["n"] for r, s in report["per_run"].items()} == {
        "room1/runA": 2, "room1/runB": 1, "room2/runC": 1}
    _check_video(out / "room1" / "runA" / "review.mp4", frames=4, rate=Fraction(15))
    _check_video(out / "room1" / "runB" / "review.mp4", frames=3, rate=Fraction(25))
    _check_video(out / "room2" / "runC" / "review.mp4", frames=3, rate=Fraction(15))  # default
    # Only the SEG carries identifiers: not the CSVs, report, videos or console.
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            for identifier in (*IDENTIFIERS, source.StudyInstanceUID):
                assert identifier.encode() not in data, (path, identifier)
    for identifier in IDENTIFIERS:
        assert identifier not in console


def _check_video(path: Path, *, frames: int, rate: Fraction) -> None:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == rate
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames
    assert decoded[0].shape == (H + 1, W, 3)  # padded to even sides


def test_a_frame_range_of_one_file_and_a_gif(cathlab, tmp_path):
    out = tmp_path / "pred"
    run = cathlab["runs"] / "room1" / "runA.dcm"
    assert _predict(cathlab, out, "--data", run, "--frames", "2-3", "--video", "gif") == 0
    seg = pydicom.dcmread(out / "runA" / "seg.dcm")
    frames = [int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
              for item in seg.PerFrameFunctionalGroupsSequence]
    assert frames == [2, 3]
    with Image.open(out / "runA" / "review.gif") as gif:
        assert gif.n_frames == 2 and gif.info["duration"] == 70  # 15 fps, in 10 ms steps
    # the frame keys are those of the PNGs `import dicom` writes
    png = cathlab["root"] / "frames" / "room1" / "runA_1.png"
    from pipeline.data.manifest import file_sha256

    assert frame_key(read_frames(run)[0]) == file_sha256(png)


def test_problems_are_named_before_any_model_work(cathlab, tmp_path, capsys):
    from pydicom.uid import MPEG4HP41

    bad = tmp_path / "bad"
    write_xa(bad / "video.dcm", np.zeros((2, 8, 8), np.uint8), syntax=MPEG4HP41,
             encapsulated=[b"\x00" * 16])
    (bad / "broken.dcm").write_bytes(b"not dicom at all")
    write_xa(bad / "short.dcm", np.zeros((3, 8, 8), np.uint8))
    # a mistyped run is named first (a path: no reading at all)
    assert predict_main(["--run", str(tmp_path / "no-run"), "--data", str(bad), "--out",
                         str(tmp_path / "p"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --run {tmp_path / 'no-run'}: run "
                                              "directory not found")
    # then the DICOM problems, every one, before the run is loaded
    code = _predict(cathlab, tmp_path / "p", "--data", bad, "--frames", "5-9")
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: DICOM problems (nothing was predicted)")
    assert "video.dcm: transfer syntax MPEG-4" in err and "broken.dcm: " in err
    assert "short.dcm: no frame in --frames 5-9 (it has frames 1-3)" in err
    assert err.count("\n") == 4  # the title and one line per problem
    assert not (tmp_path / "p").exists()
    assert _predict(cathlab, tmp_path / "q", "--data", bad / "short.dcm", "--frames",
                    "x") == 1
    assert "--frames 'x': give FIRST-LAST" in capsys.readouterr().err
    # DICOM flags given with a manifest: refused as contradictory arguments (exit 2)
    (tmp_path / "a.csv").write_text("image,mask,view,split\n")
    assert _predict(cathlab, tmp_path / "r", "--data", tmp_path / "a.csv", "--frames", "1-2") == 2
    assert "--frames: for DICOM runs only" in capsys.readouterr().err
