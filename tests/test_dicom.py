"""DICOM series read as stacks, checked by world coordinates against the DICOM headers themselves.

Every synthetic series is built with pydicom from a few downsampled slices of a real lumbar volume.
"""

import json
import logging
import random
import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from spineseg.cli import main
from spineseg.errors import SpinesegError
from spineseg.io.images import read_image, read_images, stack_output_name, write_labels_like

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
RAS_FROM_LPS = np.array([-1.0, -1.0, 1.0])
SLOPE, INTERCEPT = 2.0, -100.0


@pytest.fixture(scope="module")
def anatomy(realdata):
    """Six axial slices of a real lumbar volume, downsampled to 50 rows x 40 columns, 12-bit (slices, rows, cols)."""
    vol = read_image(realdata / "TUM01_water_img_img_L2-L5.nii.gz").data[10:16, ::8, ::10]
    return np.clip(vol, 0, 4095).astype(np.uint16)


def tilted(about_lr_deg: float = 0.0, about_ap_deg: float = 0.0, plane: str = "axial") -> list[float]:
    """ImageOrientationPatient (row, column cosines, LPS) of a plane turned about the L-R then the A-P axis."""
    base = {"axial": ([1, 0, 0], [0, 1, 0]), "sagittal": ([0, 1, 0], [0, 0, -1])}[plane]
    a, b = np.radians(about_lr_deg), np.radians(about_ap_deg)
    about_lr = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_ap = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    turn = about_ap @ about_lr
    return [round(float(v), 8) for v in np.r_[turn @ base[0], turn @ base[1]]]


def write_series(folder, pixels, orientation=(1, 0, 0, 0, 1, 0), origin=(-20.0, -30.0, 10.0), step=4.0,
                 spacing=(0.9, 1.1), series_uid=None, names=None, first_instance=1, time="100000",
                 photometric="MONOCHROME2", bits_stored=12, offsets=None, **attributes) -> list:
    """One stack of single-frame MR images (slice k at ``origin + offsets[k] * normal``); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    orientation = np.asarray(orientation, float)
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = [k * step for k in range(len(pixels))] if offsets is None else offsets
    series_uid = series_uid or generate_uid()
    paths = []
    for k, (plane, offset) in enumerate(zip(pixels, offsets)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series_uid
        ds.FrameOfReferenceUID, ds.Modality = "1.2.3.5", "MR"
        ds.InstanceNumber = first_instance + k
        ds.AcquisitionDate, ds.AcquisitionTime = "20240102", time
        ds.Rows, ds.Columns = plane.shape
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = step
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 5) for v in np.asarray(origin) + offset * normal]
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(plane, np.uint16).tobytes()
        path = folder / (names[k] if names else f"im{first_instance + k:03d}.dcm")
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        paths.append(path)
    return paths


def dicom_pixels(path):
    """RAS world position (mm) and modality value of every pixel of one file, from its own header."""
    ds = pydicom.dcmread(str(path))
    cosines = np.asarray(ds.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    rows, cols = np.mgrid[: ds.Rows, : ds.Columns]
    lps = (np.asarray(ds.ImagePositionPatient, float) + cols[..., None] * cosines[:3] * col_spacing
           + rows[..., None] * cosines[3:] * row_spacing)
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return (lps * RAS_FROM_LPS).reshape(-1, 3), values.ravel()


def voxel_indices(world, affine):
    """Voxel indices of world points on a grid; every point must sit on a voxel centre."""
    ijk = (np.linalg.inv(affine) @ np.c_[world, np.ones(len(world))].T)[:3].T
    assert np.abs(ijk - np.rint(ijk)).max() < 1e-3, "a DICOM pixel falls between voxels"
    return np.rint(ijk).astype(int)


def assert_on_dicom_grid(voxels, affine, files, expected=None):
    """``voxels`` (file layout) hold every pixel of ``files`` at its world position, and nothing else."""
    seen = []
    for path in files:
        world, values = dicom_pixels(path)
        ijk = voxel_indices(world, affine)
        assert np.all(ijk >= 0) and np.all(ijk < voxels.shape), f"{path.name} lies outside the grid"
        want = values if expected is None else expected(values)
        assert np.array_equal(voxels[tuple(ijk.T)], want), path.name
        seen.append(ijk)
    seen = np.concatenate(seen)
    assert len(np.unique(seen, axis=0)) == len(seen) == voxels.size


def display_world(img):
    """RAS world position of every display voxel ``(S, H, W, 3)``."""
    order = img.to_file_layout(np.arange(img.data.size).reshape(img.data.shape))
    ijk = np.indices(order.shape).reshape(3, -1)
    world = np.empty((img.data.size, 3))
    world[order.ravel()] = (img.affine @ np.r_[ijk, np.ones((1, ijk.shape[1]))])[:3].T
    return world.reshape(img.data.shape + (3,))


def assert_sources_follow_display_slices(img, files):
    """``img.sources[s]`` names the instance in whose plane display slice ``s`` lies, with its UIDs."""
    world = display_world(img) * RAS_FROM_LPS
    assert len(img.sources) == img.num_slices == len(files)
    for s, source in enumerate(img.sources):
        ds = pydicom.dcmread(source["path"], stop_before_pixels=True)
        cosines = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
        height = (world[s] - np.asarray(ds.ImagePositionPatient, float)) @ np.cross(*cosines)
        assert np.abs(height).max() < 1e-3, f"display slice {s} is not the plane of {source['path']}"
        assert source["sop_instance_uid"] == ds.SOPInstanceUID and source["sop_class_uid"] == ds.SOPClassUID
        assert source["series_instance_uid"] == ds.SeriesInstanceUID
        assert source["study_instance_uid"] == ds.StudyInstanceUID
        assert source["frame_of_reference_uid"] == ds.FrameOfReferenceUID
        assert source["instance_number"] == ds.InstanceNumber
    assert sorted(src["path"] for src in img.sources) == sorted(map(str, files))


def shuffled_names(count, seed):
    """File names without extension in an order unrelated to position or acquisition."""
    names = [f"IM{n:04x}" for n in random.Random(seed).sample(range(1 << 16), count)]
    return names


# ----------------------------------------------------------------------------------------------- tests

def test_oblique_stack_and_its_labels_lie_at_the_dicom_pixel_positions(anatomy, tmp_path):
    files = write_series(tmp_path / "oblique", anatomy[:4], tilted(about_lr_deg=14, about_ap_deg=-9), step=4.5)
    (img,) = read_images(tmp_path / "oblique")
    assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files)
    assert_sources_follow_display_slices(img, files)
    # the nearest display orientation still holds: down = posterior, right = patient left, next slice = superior
    world = display_world(img)
    assert np.all(np.diff(world[..., 1], axis=1) < 0) and np.all(np.diff(world[..., 0], axis=2) < 0)
    assert np.all(np.diff(world[..., 2], axis=0) > 0)
    assert img.spacing == pytest.approx((0.9, 1.1)) and img.slice_thickness == pytest.approx(4.5)
    # a label map written back: each DICOM pixel's world position carries the label of that pixel's value
    bins = np.percentile(img.data, [50, 75, 90])
    write_labels_like(tmp_path / "labels.nii.gz", np.digitize(img.data, bins).astype(np.uint8), img)
    written = nib.load(str(tmp_path / "labels.nii.gz"))
    assert_on_dicom_grid(np.asarray(written.dataobj), written.affine, files,
                         expected=lambda values: np.digitize(values, bins))


def test_two_tilted_slabs_of_one_series_become_two_stacks_in_acquisition_order(anatomy, tmp_path):
    folder, series = tmp_path / "slabs", generate_uid()
    names = shuffled_names(6, seed=1)
    # the lower slab was acquired second and carries the lower instance numbers; the upper one starts one step
    # above the lower one's last slice, so only their orientations tell the slabs apart
    lower_orientation = tilted(about_lr_deg=12)
    lower = write_series(folder, anatomy[:3], lower_orientation, origin=(-20, -30, 0), series_uid=series,
                         names=names[:3], first_instance=1, time="100500")
    above = np.array([-20, -30, 0]) + 3 * 4.0 * np.cross(lower_orientation[:3], lower_orientation[3:])
    upper = write_series(folder, anatomy[3:], tilted(about_lr_deg=-8, about_ap_deg=5), origin=above,
                         series_uid=series, names=names[3:], first_instance=4, time="100100")
    images = read_images(folder)
    assert [(im.stack, im.stack_count) for im in images] == [(0, 2), (1, 2)]
    for img, files in zip(images, (upper, lower)):
        assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files)
        assert_sources_follow_display_slices(img, files)
    assert [stack_output_name("case", im) for im in images] == ["case_stack0", "case_stack1"]
    with pytest.raises(SpinesegError, match="holds 2 image stacks") as refused:
        read_image(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("differ", [{"EchoNumbers": [1, 2]},
                                    {"ImageType": [["DERIVED", "PRIMARY", "DIXON", "WATER"],
                                                   ["DERIVED", "PRIMARY", "DIXON", "FAT"]]}])
def test_echoes_and_dixon_images_at_the_same_positions_become_separate_stacks(anatomy, tmp_path, differ):
    (keyword, (first, second)), = differ.items()
    folder = tmp_path / "mixed"
    one = write_series(folder, anatomy[:3], series_uid="1.2.9", first_instance=1, **{keyword: first})
    two = write_series(folder, anatomy[:3] // 2, series_uid="1.2.9", first_instance=4, **{keyword: second})
    images = read_images(folder)
    assert len(images) == 2
    for img, files in zip(images, (one, two)):
        assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files)


def test_duplicate_positions_that_cannot_be_split_are_refused_naming_the_files(anatomy, tmp_path):
    folder = tmp_path / "twice"
    write_series(folder, anatomy[:3], series_uid="1.2.9", first_instance=1)
    write_series(folder, anatomy[:3] // 2, series_uid="1.2.9", first_instance=4)
    with pytest.raises(SpinesegError, match="share a slice position") as refused:
        read_images(folder)
    assert "im001.dcm = im004.dcm" in str(refused.value) and "\n" not in str(refused.value)


def test_monochrome1_is_inverted_to_bright_means_signal(anatomy, tmp_path):
    write_series(tmp_path / "m2", anatomy[:2])
    write_series(tmp_path / "m1", 4095 - anatomy[:2], photometric="MONOCHROME1", bits_stored=12)
    normal, inverted = read_image(tmp_path / "m2"), read_image(tmp_path / "m1")
    assert np.array_equal(inverted.data, normal.data)
    assert np.array_equal(normal.data, anatomy[:2] * SLOPE + INTERCEPT)


@pytest.mark.parametrize("offsets,runs,why", [([0, 4, 12, 16, 20], [2, 3], "8.00 mm.*1 missing slice"),
                                              ([0, 4, 8, 13, 18], [3, 2], "5.00 mm.*uneven spacing")])
def test_a_gap_or_uneven_step_splits_the_stack_at_true_positions(anatomy, tmp_path, caplog, offsets, runs, why):
    files = write_series(tmp_path / "gap", anatomy[:5], offsets=offsets, names=shuffled_names(5, seed=2))
    with caplog.at_level(logging.WARNING, logger="spineseg"):
        images = read_images(tmp_path / "gap")
    assert [im.num_slices for im in images] == runs
    starts = np.cumsum([0] + runs)
    for img, a, b in zip(images, starts[:-1], starts[1:]):
        assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files[a:b])
        assert img.slice_thickness == pytest.approx(offsets[a + 1] - offsets[a])
    assert len(caplog.records) == 1
    assert re.search(why, caplog.records[0].getMessage())


def test_files_that_are_not_dicom_images_are_named_and_corrupt_images_refused(anatomy, tmp_path, caplog):
    folder = tmp_path / "series"
    files = write_series(folder, anatomy[:3])
    (folder / "notes.txt").write_text("scanned on the old coil\n")
    report = pydicom.Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID, report.SOPInstanceUID = BASIC_TEXT_SR, report.file_meta.MediaStorageSOPInstanceUID
    pydicom.dcmwrite(str(folder / "REPORT"), report, enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="spineseg"):
        (img,) = read_images(folder)
    assert img.num_slices == 3
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "notes.txt" in message and "REPORT" in message
    truncated = files[1].read_bytes()
    files[1].write_bytes(truncated[: len(truncated) - 500])
    with pytest.raises(SpinesegError) as refused:
        read_images(folder)
    assert files[1].name in str(refused.value)


def test_two_series_in_one_folder_give_one_stack_each(anatomy, tmp_path):
    folder = tmp_path / "study"
    later = write_series(folder, anatomy[:3], series_uid="1.2.77", time="113000", SeriesNumber=5)
    earlier = write_series(folder, anatomy[3:], series_uid="1.2.66", time="090000", SeriesNumber=7, first_instance=4)
    images = read_images(folder)
    assert [im.sources[0]["series_instance_uid"] for im in images] == ["1.2.66", "1.2.77"]
    for img, files in zip(images, (earlier, later)):
        assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files)


@pytest.mark.parametrize("attributes,problem", [({"NumberOfFrames": 2}, "multi-frame"),
                                                ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB",
                                                  "PlanarConfiguration": 0}, "colour")])
def test_multiframe_and_colour_refused_in_one_line(anatomy, tmp_path, attributes, problem):
    (path,) = write_series(tmp_path / "odd", anatomy[:1])
    ds = pydicom.dcmread(str(path))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.repeat(anatomy[0], 3).tobytes()  # room for either reading
    ds.save_as(str(path))
    with pytest.raises(SpinesegError) as refused:
        read_images(tmp_path / "odd")
    assert problem in refused.value.problem and refused.value.path == str(path)
    assert "\n" not in str(refused.value)


def test_info_lists_every_stack_and_flags_a_sagittal_one(anatomy, tmp_path, capsys):
    folder = tmp_path / "mixed-planes"
    write_series(folder, anatomy[:3], tilted(about_lr_deg=10), time="100000", names=shuffled_names(3, seed=3))
    write_series(folder, anatomy[3:], tilted(about_ap_deg=4, plane="sagittal"), spacing=(1.0, 0.8), step=3.0,
                 time="100200", first_instance=4)
    images = read_images(folder)
    assert main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stack_count"] == 2 and len(info["stacks"]) == 2
    for img, stack in zip(images, info["stacks"]):
        assert stack["orientation"] == "".join(nib.aff2axcodes(img.affine))
        assert np.allclose(stack["affine"], img.affine, atol=1e-5) and stack["slices"] == 3
    axial, sagittal = info["stacks"]
    assert axial["pixel_spacing_mm"] == pytest.approx([0.9, 1.1]) and sagittal["pixel_spacing_mm"] == [1.0, 0.8]
    assert axial["slice_spacing_mm"] == pytest.approx(4, abs=1e-4)
    assert sagittal["slice_spacing_mm"] == pytest.approx(3, abs=1e-4)
    assert "note" not in axial and "looks sagittal" in sagittal["note"]
    assert axial["orientation"] == "LPS" and sagittal["orientation"][2] in "LR"


def test_a_stack_whose_normal_points_inferior_is_shown_inferior_to_superior_with_its_sources(anatomy, tmp_path):
    upside_down = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # columns run anterior, so the slice normal points inferior
    files = write_series(tmp_path / "flipped", anatomy[:4], upside_down, names=shuffled_names(4, seed=4))
    (img,) = read_images(tmp_path / "flipped")
    assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files)
    assert np.all(np.diff(display_world(img)[..., 2], axis=0) > 0)  # display slices still run inferior -> superior
    assert_sources_follow_display_slices(img, files)


def _pixels(count, rows=20, cols=16):
    return np.random.default_rng(count).integers(0, 4000, (count, rows, cols)).astype(np.uint16)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("geometry,problem", [
    ({"spacing": (0.0, 0.0)}, r"invalid PixelSpacing \[0.0, 0.0\]"),
    ({"spacing": (float("nan"), 1.0)}, "invalid PixelSpacing"),
    ({"spacing": (-0.9, -1.1)}, "must be above 0"),
    ({"orientation": (0, 0, 0, 0, 0, 0)}, "invalid ImageOrientationPatient"),
    ({"orientation": (1, 0, 0, 1, 0, 0)}, "not parallel")])
def test_invalid_pixel_spacing_or_orientation_is_refused_naming_the_file(tmp_path, count, geometry, problem):
    files = write_series(tmp_path / "bad", _pixels(count), **geometry)
    with pytest.raises(SpinesegError, match=problem) as e:
        read_images(tmp_path / "bad")
    assert e.value.path in {str(f) for f in files}  # names the file, so the command line prints one line


def test_a_stack_does_not_start_across_a_gap_either(tmp_path, caplog):
    """z = 0, 4, 8, 16, 24, 28: after the first gap, 16 -> 24 is a second gap, not a new 8 mm stack."""
    offsets = [0, 4, 8, 16, 24, 28]
    files = write_series(tmp_path / "gaps", _pixels(6), offsets=offsets)
    with caplog.at_level(logging.WARNING, logger="spineseg"):
        images = read_images(tmp_path / "gaps")
    assert [im.num_slices for im in images] == [3, 1, 2]
    for img, (a, b) in zip(images, [(0, 3), (3, 4), (4, 6)]):
        assert_on_dicom_grid(img.to_file_layout(img.data), img.affine, files[a:b])
    assert [im.slice_thickness for im in images] == pytest.approx([4.0, 4.0, 4.0])  # no 8 mm step anywhere
    assert len(caplog.records) == 2 and all("1 missing slice" in r.getMessage() for r in caplog.records)
