import nibabel as nib
import numpy as np
import pydicom
import pytest

from spineseg.cli import main
from spineseg.io.dicomseg import dicom_sources, write_dicom_seg
from spineseg.io.images import read_image, write_labels_like

ROWS, COLS = 160, 144  # not square: a transposed frame cannot pass for the right one


def write_series(folder, images, spacing=(1.0, 1.0), thickness=4.0):
    """A single-stack MR series; its row direction points to the patient's right (so the display flips the
    columns), its files are named against the spatial order. Returns the SOP instance UIDs by position,
    inferior first."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    uids = []
    for k, pixels in enumerate(images):  # k: position along the normal, inferior first
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Spine", "SPINESEG01", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "MR"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer, ds.InstanceNumber = "test", len(images) - k
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]  # along a row: towards the patient's right
        ds.ImagePositionPatient = [100.0, -80.0, 20.0 + k * thickness]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
        pydicom.dcmwrite(str(folder / f"im{(k * 7) % len(images):03d}.dcm"), ds, enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from spineseg.data.phantom import phantom_slice

    folder = tmp_path_factory.mktemp("dicom") / "series"
    # three phantom slices at 1 mm, flipped left-right into the stored orientation, cropped to ROWS x COLS
    images = [phantom_slice(0, p, 0, size=192, spacing=1.0).image[16:16 + ROWS, 24:24 + COLS, ][:, ::-1] for p in (1, 2, 3)]
    return folder, write_series(folder, [np.clip(i, 0, None) for i in images])


def seg_frames(seg_path):
    """{(segment number, referenced SOP instance UID): frame pixels} of a SEG, read with pydicom."""
    ds = pydicom.dcmread(str(seg_path))
    frames = ds.pixel_array.reshape((-1, ds.Rows, ds.Columns))
    out = {}
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        out[(number, uid)] = frame.astype(bool)
    return ds, out


def check_seg_against_nifti(seg_path, nifti_path, uids):
    """Every frame equals its structure on the NIfTI slice of the instance it references; no empty frames."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    assert seg.number_of_segments == 3
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["Vertebral body", "Vertebral foramen",
                                                                                  "Lamina"]
    assert seg.get_segment_description(2).segmented_property_type.value == "280734009"  # SCT vertebral foramen
    assert seg.get_segment_description(3).segmented_property_type.scheme_designator == "SCT"
    assert {sop for _, _, sop in seg.get_source_image_uids()} == set(uids)
    ds, frames = seg_frames(seg_path)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(uids)
    nifti = nib.load(str(nifti_path))
    labels = np.asarray(nifti.dataobj)  # (column, row, slice)
    # the instance of NIfTI slice k: the one at the same height (uids run inferior first, 4 mm apart from 20 mm)
    heights = [(nifti.affine @ [0, 0, k, 1])[2] for k in range(labels.shape[2])]
    slice_uids = [uids[int(round((z - 20.0) / 4.0))] for z in heights]
    expected = {(n, uid): labels[:, :, k].T == n for k, uid in enumerate(slice_uids) for n in (1, 2, 3)
                if (labels[:, :, k] == n).any()}
    assert set(frames) == set(expected)  # a structure absent from a slice has no frame
    for key, frame in frames.items():
        assert np.array_equal(frame, expected[key]), key
    # highdicom's own reading: the combined label map of every source instance
    stacked = seg.get_pixels_by_source_instance(source_sop_instance_uids=slice_uids, combine_segments=True)
    assert np.array_equal(stacked, np.stack([labels[:, :, k].T for k in range(len(uids))]))


def test_sources_of_a_series_follow_the_display_order(series):
    folder, uids = series
    image = read_image(folder)
    sources = dicom_sources(image)
    assert [s["sop_instance_uid"] for s in sources] == uids  # display slices run inferior -> superior
    assert all(s["series_instance_uid"] == sources[0]["series_instance_uid"] for s in sources)


def test_seg_from_known_labels_round_trips(series, tmp_path):
    folder, uids = series
    image = read_image(folder)
    labels = np.zeros(image.data.shape, np.uint8)
    labels[0, 10:40, 5:30] = 1  # an asymmetric block near the anterior-right corner
    labels[0, 50:60, 60:70] = 2
    labels[1, 70:80, 90:130] = 3  # slice 1: lamina only; slice 2: nothing at all
    write_labels_like(tmp_path / "x.nii.gz", labels, image)
    write_dicom_seg(tmp_path / "x.seg.dcm", labels, image, dicom_sources(image))
    check_seg_against_nifti(tmp_path / "x.seg.dcm", tmp_path / "x.nii.gz", uids)
    _, frames = seg_frames(tmp_path / "x.seg.dcm")
    assert len(frames) == 3


def test_filled_in_sources_are_used(series, tmp_path):
    """Once the reader fills Image.sources, the SEG references exactly those instances."""
    folder, uids = series
    image = read_image(folder)
    image.sources = dicom_sources(image)
    image.source = str(tmp_path / "moved")  # nothing left to read beside the image: only its sources
    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 20:30, 20:30] = 2
    labels[0, 40:45, 20:30] = 2  # tells slice 0 from the others
    write_labels_like(tmp_path / "x.nii.gz", labels, image)
    write_dicom_seg(tmp_path / "x.seg.dcm", labels, image, dicom_sources(image))
    check_seg_against_nifti(tmp_path / "x.seg.dcm", tmp_path / "x.nii.gz", uids)


def test_predict_writes_seg_matching_the_label_map(series, tmp_path, capsys):
    folder, uids = series
    out = tmp_path / "out"
    assert main(["predict", "--model", "pretrained", "--input", str(folder), "--out", str(out), "--dicom-seg",
                 "--no-overlays", "--quiet"]) == 0
    assert (out / "series.seg.dcm").exists()
    check_seg_against_nifti(out / "series.seg.dcm", out / "series.nii.gz", uids)
    _, frames = seg_frames(out / "series.seg.dcm")
    assert {n for n, _ in frames} == {1, 2, 3}  # the model found every structure somewhere


def test_non_dicom_input_gets_no_seg(tmp_path, capsys):
    from spineseg.data.phantom import phantom_slice
    from spineseg.io.images import save_slice_nifti

    s = phantom_slice(0, 1, 0, size=160, spacing=1.2)
    save_slice_nifti(tmp_path / "p.nii.gz", s.image, s.spacing)
    assert main(["predict", "--model", "pretrained", "--input", str(tmp_path / "p.nii.gz"), "--out",
                 str(tmp_path / "out"), "--dicom-seg", "--no-overlays", "--quiet"]) == 0
    assert "not a DICOM input" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.seg.dcm"))


def test_no_structure_anywhere_gives_no_seg(series, tmp_path):
    """A SEG needs one non-empty frame; highdicom would otherwise fill it with empty ones."""
    from spineseg.errors import SpinesegError

    folder, _ = series
    image = read_image(folder)
    with pytest.raises(SpinesegError, match="no structure"):
        write_dicom_seg(tmp_path / "x.seg.dcm", np.zeros(image.data.shape, np.uint8), image, dicom_sources(image))
    assert not (tmp_path / "x.seg.dcm").exists()


# Type 2 patient and study attributes that de-identification tools often delete outright
DELETED_BY_ANONYMISERS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                          "StudyID", "AccessionNumber", "ReferringPhysicianName")


def test_seg_from_a_de_identified_series(tmp_path):
    """A series whose anonymiser deleted the Type 2 patient / study attributes still gets a valid SEG, with
    those attributes present and empty, referencing every instance."""
    import highdicom as hd

    rng = np.random.default_rng(0)
    uids = write_series(tmp_path / "s", [rng.integers(0, 1000, (24, 20)) for _ in range(2)])
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(f))
        for keyword in DELETED_BY_ANONYMISERS:
            delattr(ds, keyword)
        ds.save_as(str(f))
    image = read_image(tmp_path / "s")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 5:10, 4:9] = 2
    write_dicom_seg(tmp_path / "x.seg.dcm", labels, image, dicom_sources(image))
    seg = hd.seg.segread(str(tmp_path / "x.seg.dcm"))
    assert {sop for _, _, sop in seg.get_source_image_uids()} == set(uids)
    for keyword in DELETED_BY_ANONYMISERS:
        assert keyword in seg and not seg[keyword].value, keyword  # Type 2: present, empty


def test_seg_refused_clearly_without_a_study_uid(tmp_path):
    from spineseg.errors import SpinesegError

    rng = np.random.default_rng(0)
    write_series(tmp_path / "s", [rng.integers(0, 1000, (24, 20)) for _ in range(2)])
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(f))
        del ds.StudyInstanceUID
        ds.save_as(str(f))
    image = read_image(tmp_path / "s")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[:, 5:10, 4:9] = 2
    with pytest.raises(SpinesegError, match=r"StudyInstanceUID") as err:
        write_dicom_seg(tmp_path / "x.seg.dcm", labels, image, dicom_sources(image))
    assert "'FileDataset' object" not in str(err.value) and str(tmp_path / "s") in str(err.value)
    assert not (tmp_path / "x.seg.dcm").exists()


def test_seg_of_a_sagittal_series_is_refused_saying_why(tmp_path):
    """Display slices of a sagittal series cut across its images, so no frame can reference one instance: the
    refusal says that, not a count of instances against slices."""
    from spineseg.errors import SpinesegError

    rng = np.random.default_rng(0)
    write_series(tmp_path / "s", [rng.integers(0, 1000, (24, 20)) for _ in range(3)])
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(f))
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows run posterior, columns inferior
        ds.ImagePositionPatient = [4.0 * int(ds.InstanceNumber), -80.0, 20.0]
        ds.save_as(str(f))
    image = read_image(tmp_path / "s")
    assert image.num_slices == 24  # axial display slices, one per image row
    with pytest.raises(SpinesegError, match=r"not axial") as err:
        dicom_sources(image)
    assert str(tmp_path / "s") in str(err.value)
