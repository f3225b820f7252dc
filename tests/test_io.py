import json

import numpy as np
import pytest

from spineseg.errors import SpinesegError
from spineseg.io.images import _LPS_TO_RAS, read_image, read_label, save_nifti, save_png, write_labels_like


def _pattern(shape=(20, 16, 5)):
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, shape).astype(np.int16)


def _world_of_display(img, s, r, c):
    """RAS world coordinate of display voxel (slice s, row r, col c)."""
    d = np.zeros(img.data.shape, np.uint8)
    d[s, r, c] = 1
    f = img.to_file_layout(d)
    idx = np.argwhere(f.reshape(f.shape + (1,) * (3 - f.ndim)) == 1)[0]
    return (img.affine @ np.r_[idx, 1.0])[:3]


def test_nifti_any_orientation_gives_same_display(tmp_path):
    data = _pattern()
    lps = _LPS_TO_RAS @ np.diag([0.8, 0.9, 4.0, 1.0])
    save_nifti(tmp_path / "lps.nii.gz", data, lps)
    # same voxels stored as R, A, S (flip the first two axes) and with axes permuted
    ras = lps.copy()
    ras[:, 0] *= -1
    ras[:, 1] *= -1
    ras[:3, 3] = lps[:3, :3] @ [19, 15, 0]
    save_nifti(tmp_path / "ras.nii.gz", data[::-1, ::-1, :], ras)
    perm = lps[:, [2, 0, 1, 3]]
    save_nifti(tmp_path / "perm.nii.gz", np.transpose(data, (2, 0, 1)), perm)
    a = read_image(tmp_path / "lps.nii.gz")
    for name in ("ras", "perm"):
        b = read_image(tmp_path / f"{name}.nii.gz")
        assert np.array_equal(a.data, b.data), name
        assert b.spacing == pytest.approx((0.9, 0.8))
        assert b.slice_thickness == pytest.approx(4.0)
    assert a.data.shape == (5, 16, 20)


def test_display_convention_anterior_top_patient_left_right(tmp_path):
    save_nifti(tmp_path / "v.nii.gz", _pattern(), np.diag([1.0, 1.0, 3.0, 1.0]))  # RAS storage
    img = read_image(tmp_path / "v.nii.gz")
    o = _world_of_display(img, 0, 0, 0)
    assert _world_of_display(img, 0, 5, 0)[1] < o[1]  # lower rows are more posterior (RAS y smaller)
    assert _world_of_display(img, 0, 0, 5)[0] < o[0]  # columns to the right are patient left (RAS x smaller)
    assert _world_of_display(img, 1, 0, 0)[2] > o[2]  # slices go inferior -> superior


def test_labels_written_back_on_source_grid(tmp_path):
    data = _pattern()
    ras = np.diag([1.1, 1.2, 3.0, 1.0])
    ras[:3, 3] = [5, -7, 11]
    save_nifti(tmp_path / "img.nii.gz", data, ras)
    img = read_image(tmp_path / "img.nii.gz")
    lab = (img.data > 500).astype(np.uint8)
    write_labels_like(tmp_path / "lab.nii.gz", lab, img)
    import nibabel as nib

    back = nib.load(str(tmp_path / "lab.nii.gz"))
    assert back.shape == data.shape
    assert np.allclose(back.affine, ras)
    assert np.array_equal(np.asarray(back.dataobj), (data > 500).astype(np.uint8))


def _write_dicom_series(folder, vol, spacing=(0.7, 0.8), thickness=4.0, slope=2.0, intercept=-100.0):
    import pydicom
    from pydicom.uid import generate_uid

    from conftest import new_mr_dataset

    folder.mkdir()
    series = generate_uid()
    order = [2, 0, 3, 1][: vol.shape[0]]
    for n, k in enumerate(order):
        ds = new_mr_dataset()
        ds.SeriesInstanceUID = series
        ds.Modality = "MR"
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # rows -> patient left, columns -> posterior
        ds.ImagePositionPatient = [0.0, 0.0, float(k * thickness)]
        ds.InstanceNumber = 10 - k  # deliberately disagrees with the position order
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = vol[k].astype(np.uint16).tobytes()
        pydicom.dcmwrite(str(folder / f"im{n}.dcm"), ds, enforce_file_format=True)


def test_dicom_series_sorted_by_position_with_rescale(tmp_path):
    vol = np.stack([np.full((6, 8), 10 * (k + 1)) for k in range(4)]).astype(np.uint16)
    vol[:, 0, 0] = 500  # marks the first stored row/column
    _write_dicom_series(tmp_path / "series", vol)
    img = read_image(tmp_path / "series")
    assert img.data.shape == (4, 6, 8)
    assert img.spacing == pytest.approx((0.7, 0.8))
    assert img.slice_thickness == pytest.approx(4.0)
    # ordered inferior -> superior by ImagePositionPatient, rescaled
    assert [float(img.data[k, 3, 3]) for k in range(4)] == [10 * (k + 1) * 2.0 - 100 for k in range(4)]
    # LPS-aligned DICOM is already in the display convention
    assert img.data[0, 0, 0] == 500 * 2 - 100
    # a single file of the series also reads
    one = read_image(sorted((tmp_path / "series").iterdir())[0])
    assert one.data.shape == (1, 6, 8)


def test_png_needs_spacing(tmp_path):
    save_png(tmp_path / "a.png", (np.arange(64 * 48).reshape(48, 64) % 255).astype(np.uint8))
    with pytest.raises(SpinesegError, match="spacing"):
        read_image(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png", spacing=0.5)
    assert img.data.shape == (1, 48, 64) and img.spacing == (0.5, 0.5)


def test_a_palette_png_mask_keeps_its_class_indices(tmp_path):
    from PIL import Image as PILImage

    classes = np.zeros((40, 50), np.uint8)
    classes[5:15, 10:40], classes[18:24, 20:30], classes[28:34, 12:38] = 1, 2, 3
    mask = PILImage.fromarray(classes, mode="P")
    mask.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0, 255, 165, 0] + [0] * 744)  # blue body, green canal, orange lamina
    mask.save(tmp_path / "mask.png")
    lab = read_label(tmp_path / "mask.png", spacing=0.5)
    assert np.array_equal(lab.data[0], classes)  # the indices, not the colours' grey levels
    grey = read_image(tmp_path / "mask.png", spacing=0.5)  # as an image, a palette PNG is what it looks like
    assert float(grey.data[0][20, 25]) != 2.0


@pytest.mark.parametrize("content,msg", [(b"", "empty"), (b"not an image at all" * 10, "cannot read")])
def test_corrupt_files_name_the_file(tmp_path, content, msg):
    f = tmp_path / "broken.nii.gz"
    f.write_bytes(content)
    with pytest.raises(SpinesegError, match=msg) as e:
        read_image(f)
    assert "broken.nii.gz" in str(e.value)


def test_nan_image_and_bad_labels_rejected(tmp_path):
    data = np.zeros((8, 8, 1), np.float32)
    data[2, 2] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(SpinesegError, match="NaN"):
        read_image(tmp_path / "nan.nii.gz")
    lab = np.zeros((8, 8, 1), np.uint8)
    lab[0, 0] = 7
    save_nifti(tmp_path / "lab.nii.gz", lab, np.eye(4))
    with pytest.raises(SpinesegError, match="outside 0-3"):
        read_label(tmp_path / "lab.nii.gz")


def test_empty_folder_and_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpinesegError, match="empty"):
        read_image(tmp_path / "empty")
    with pytest.raises(SpinesegError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")


def test_real_axial_volumes(realdata):
    for name in ("TUM01_water_img_img_L2-L5.nii.gz", "TUM02_water_img_img_L2-L5.nii.gz"):
        img = read_image(realdata / name)
        assert img.data.shape == (29, 400, 400)
        assert img.spacing == pytest.approx((1.0185, 1.0185), abs=1e-3)
        assert img.slice_thickness == pytest.approx(4.0, abs=1e-3)
        o = _world_of_display(img, 0, 0, 0)
        assert _world_of_display(img, 0, 10, 0)[1] < o[1]  # anterior at the top
        assert _world_of_display(img, 0, 0, 10)[0] < o[0]  # patient left on image right
        assert _world_of_display(img, 3, 0, 0)[2] > o[2]


@pytest.mark.parametrize("thick_axis,plane", [(0, "sagittal"), (1, "coronal"), (2, None)])
def test_info_says_when_a_file_looks_sagittal_or_coronal(tmp_path, capsys, thick_axis, plane):
    from spineseg.cli import main

    zooms = [0.9, 0.8, 0.7]
    zooms[thick_axis] = 4.0  # the slices are cut across the axis with the large spacing
    affine = np.diag(zooms + [1.0])
    save_nifti(tmp_path / "v.nii.gz", _pattern((8, 8, 8)), affine)
    assert main(["info", str(tmp_path / "v.nii.gz")]) == 0
    (stack,) = json.loads(capsys.readouterr().out)["stacks"]
    assert stack["orientation"] == "RAS" and stack["slice_spacing_mm"] == 4.0 and stack["slices"] == 8
    assert np.allclose(stack["affine"], affine)
    if plane is None:
        assert "note" not in stack and stack["plane"] == "axial"
    else:
        assert stack["note"] == f"looks {plane}: spineseg expects axial slices"


def _nifti_with_raw_pixdim(path, pixdim, shape=(8, 8, 3)):
    """A NIfTI whose header holds ``pixdim`` as given, with qform_code = sform_code = 0 (nibabel would fix it)."""
    import struct

    import nibabel as nib

    img = nib.Nifti1Image(_pattern(shape), np.eye(4))
    raw = bytearray(img.to_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)  # pixdim[1:4]
    raw[252:256] = struct.pack("<2h", 0, 0)  # qform_code, sform_code
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("pixdim,problem", [((0.0, 0.0, 4.0), "pixdim 0|0 along an in-plane axis"),
                                            ((0.7, 0.0, 4.0), "0 along an in-plane axis"),
                                            ((float("nan"), 0.7, 4.0), "invalid pixel spacing in the NIfTI header")])
def test_nifti_without_in_plane_pixdim_is_refused_not_read_as_1_mm(tmp_path, pixdim, problem):
    f = _nifti_with_raw_pixdim(tmp_path / "p0.nii", pixdim)
    with pytest.raises(SpinesegError, match=problem) as e:
        read_image(f)
    assert str(e.value).startswith(f"{f}: ")
    img = read_image(_nifti_with_raw_pixdim(tmp_path / "ok.nii", (0.7, 0.8, 4.0)))  # a valid pixdim still reads
    assert img.spacing == pytest.approx((0.8, 0.7)) and img.slice_thickness == pytest.approx(4.0)


def _metaimage(path, ndims, sizes, spacing_line=True):
    header = [f"ObjectType = Image", f"NDims = {ndims}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
              f"DimSize = {' '.join(map(str, sizes))}", "ElementType = MET_SHORT"]
    if spacing_line:
        header.insert(4, "ElementSpacing = " + " ".join(["0.5"] * ndims))
    header.append("ElementDataFile = LOCAL")
    data = np.arange(int(np.prod(sizes)), dtype="<i2") % 300
    path.write_bytes(("\n".join(header) + "\n").encode() + data.tobytes())
    return path


@pytest.mark.parametrize("ndims,sizes,spacing_line,problem", [
    (2, (8, 8), False, "no pixel spacing in the header \\(no ElementSpacing\\)"),
    (3, (8, 8, 2), False, "no pixel spacing"),
    (4, (8, 8, 3, 2), True, "expected a 2D or 3D image, got a 4D image")])
def test_itk_image_without_spacing_or_with_four_dimensions_is_refused(tmp_path, ndims, sizes, spacing_line, problem):
    f = _metaimage(tmp_path / "x.mha", ndims, sizes, spacing_line)
    with pytest.raises(SpinesegError, match=problem) as e:
        read_image(f)
    assert str(e.value).startswith(f"{f}: ")
    ok = read_image(_metaimage(tmp_path / "ok.mha", 3, (8, 8, 2)))  # the same with its spacing reads
    assert ok.spacing == pytest.approx((0.5, 0.5))


def test_nrrd_without_spacing_is_refused(tmp_path):
    import SimpleITK as sitk

    im = sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8))
    im.SetSpacing((0.5, 0.7))
    sitk.WriteImage(im, str(tmp_path / "ok.nrrd"))
    assert read_image(tmp_path / "ok.nrrd").spacing == pytest.approx((0.7, 0.5))
    lines = (tmp_path / "ok.nrrd").read_bytes().split(b"\n")
    (tmp_path / "no.nrrd").write_bytes(b"\n".join(li for li in lines if not li.startswith(b"space directions")))
    with pytest.raises(SpinesegError, match="no pixel spacing"):
        read_image(tmp_path / "no.nrrd")


def test_multipage_tiff_is_refused_naming_it(tmp_path):
    from PIL import Image as PILImage

    pages = [PILImage.fromarray(np.full((32, 32), v, np.uint8)) for v in (10, 200)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(SpinesegError, match="holds 2 pages") as e:
        read_image(tmp_path / "stack.tif", spacing=0.5)
    assert str(tmp_path / "stack.tif") in str(e.value)
    pages[0].save(tmp_path / "one.tif")
    assert read_image(tmp_path / "one.tif", spacing=0.5).data.shape == (1, 32, 32)


@pytest.mark.parametrize("spacing", [-0.5, 0.0, float("nan"), float("inf")])
def test_raster_spacing_must_be_finite_and_positive(tmp_path, spacing):
    save_png(tmp_path / "a.png", (np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8))
    with pytest.raises(SpinesegError, match="above 0"):
        read_image(tmp_path / "a.png", spacing=spacing)


@pytest.mark.parametrize("affine,problem", [(np.diag([0.0, 1.0, 1.0, 1.0]), "0 is not a spacing"),
                                            (np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                             "two voxel axes point the same way")])
def test_degenerate_sform_is_refused_in_one_error(tmp_path, affine, problem):
    import nibabel as nib

    img = nib.Nifti1Image(_pattern((8, 8, 2)), np.eye(4))
    img.set_qform(np.eye(4), code=0)
    img.set_sform(affine, code=2)  # the sform's columns are the voxel axes
    nib.save(img, str(tmp_path / "d.nii"))
    with pytest.raises(SpinesegError, match=problem):
        read_image(tmp_path / "d.nii")


def test_a_write_that_fails_leaves_the_earlier_file_whole_and_nothing_beside_it(tmp_path):
    from pathlib import Path

    from spineseg.io.atomic import atomic_path

    target = tmp_path / "out.json"
    target.write_text("finished earlier")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            assert target.read_text() == "finished earlier"  # the writer never touches the target itself
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "finished earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
