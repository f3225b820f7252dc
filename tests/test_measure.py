import csv

import numpy as np
import pytest

from spineseg.errors import SpinesegError
from spineseg.infer.measure import (MEASUREMENT_COLUMNS, StenosisThresholds, mean_thickness_mm, measure_image,
                                    measure_slice, slice_positions_mm, write_measurements)


def _grid_mm(shape, spacing, centre=(0.0, 0.0)):
    rows = (np.arange(shape[0]) - shape[0] / 2) * spacing[0] - centre[0]
    cols = (np.arange(shape[1]) - shape[1] / 2) * spacing[1] - centre[1]
    return np.meshgrid(rows, cols, indexing="ij")


def spine_slice(angle_deg, spacing, ap_semi=7.0, transverse_semi=11.0, shape=(150, 150), centre=(1.3, -2.1)):
    """Elliptic canal (semi-axes AP x transverse, mm) with the body in front of it and the laminae behind,
    the whole spine turned by ``angle_deg`` in the image plane."""
    rows, cols = _grid_mm(shape, spacing, centre)
    ap = np.array([np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))])  # anterior -> posterior
    u = rows * ap[0] + cols * ap[1]  # along AP
    v = -rows * ap[1] + cols * ap[0]  # across
    labels = np.zeros(shape, np.uint8)
    labels[((u + ap_semi + 14) / 12) ** 2 + (v / 20) ** 2 <= 1] = 1
    labels[(np.abs(u - ap_semi - 3) <= 3) & (np.abs(v) <= 14)] = 3
    labels[(u / ap_semi) ** 2 + (v / transverse_semi) ** 2 <= 1] = 2
    return labels


@pytest.mark.parametrize("angle_deg, spacing", [(0, (0.4, 0.4)), (23, (0.5, 0.3)), (-38, (0.3, 0.55)),
                                                (67, (0.45, 0.45)), (140, (0.35, 0.6))])
def test_rotated_ellipse_area_exact_and_diameters_within_a_pixel(angle_deg, spacing):
    labels = spine_slice(angle_deg, spacing)
    m = measure_slice(labels, spacing)
    assert m["canal_area_mm2"] == pytest.approx(np.pi * 7.0 * 11.0, rel=0.01)
    pixel = max(spacing)
    assert abs(m["canal_ap_mm"] - 14.0) <= pixel
    assert abs(m["canal_transverse_mm"] - 22.0) <= pixel


def test_other_structures_measured_in_mm():
    spacing = (0.5, 0.25)
    labels = spine_slice(30, spacing, shape=(120, 240))
    m = measure_slice(labels, spacing)
    assert m["body_area_mm2"] == pytest.approx((labels == 1).sum() * 0.125)
    assert m["lamina_area_mm2"] == pytest.approx((labels == 3).sum() * 0.125)
    assert abs(m["lamina_thickness_mm"] - 6.0) <= 0.5  # the plate drawn 6 mm thick


@pytest.mark.parametrize("thickness, angle_deg, spacing", [(5.0, 10, (0.4, 0.4)), (6.5, 50, (0.6, 0.35)),
                                                           (8.0, 100, (0.3, 0.5))])
def test_plate_thickness_within_a_pixel(thickness, angle_deg, spacing):
    rows, cols = _grid_mm((200, 200), spacing)
    d = np.array([np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))])
    plate = (np.abs(-rows * d[1] + cols * d[0]) <= thickness / 2) & (np.abs(rows * d[0] + cols * d[1]) <= 13)
    assert abs(mean_thickness_mm(plate, spacing) - thickness) <= max(spacing)


def test_plate_cut_by_the_image_border():
    plate = np.zeros((40, 60), bool)
    plate[-6:, :] = True  # 6 pixels thick along the bottom edge, running out of the image on three sides
    assert 4.0 <= mean_thickness_mm(plate, (1.0, 1.0)) <= 7.0


def test_no_canal_gives_no_canal_values_and_no_flag():
    labels = spine_slice(0, (0.5, 0.5))
    labels[labels == 2] = 0
    m = measure_slice(labels, (0.5, 0.5))
    assert m["canal_area_mm2"] is None and m["canal_ap_mm"] is None and m["stenosis"] is None
    assert m["body_area_mm2"] > 0


def test_stenosis_grades_and_configurable_thresholds():
    t = StenosisThresholds()
    assert t.grade(150, 15) == "none"
    assert t.grade(99, 15) == "relative" and t.grade(150, 11.9) == "relative"
    assert t.grade(74, 15) == "absolute" and t.grade(150, 9.9) == "absolute"
    assert t.grade(100, 12) == "none"  # the thresholds are strict: "below"
    custom = StenosisThresholds.parse("130,90", "14,11")
    assert custom.grade(120, 15) == "relative" and custom.grade(85, 15) == "absolute" and custom.grade(150, 13) == "relative"
    for bad in ("75,100", "100", "a,b", "100,-1"):
        with pytest.raises(SpinesegError):
            StenosisThresholds.parse(bad, None)


def test_phantom_stenosis_flags_agree_with_its_ground_truth():
    """The phantom's stenotic slices (AP 6-10 mm, area < 100 mm2 by construction) are what the Verbiest AP
    criterion calls absolute stenosis; its normal canals (AP ~11-17 mm) must never be flagged absolute."""
    from spineseg.data.phantom import phantom_slice

    from spineseg.data.phantom import _patient_params

    # the first four virtual patients of seed 0 with a stenotic level; their five slices cover all five levels
    stenotic = [p for p in range(100) if _patient_params(0, p)["stenosis_level"] >= 0][:4]
    slices = [phantom_slice(0, p, k, size=192, spacing=1.0) for p in stenotic for k in range(5)]
    truth = np.array([s.meta["stenosis"] for s in slices])
    flags = [measure_slice(s.label, s.spacing)["stenosis"] for s in slices]
    assert truth.sum() >= 4
    agree = np.mean([(f == "absolute") == t for f, t in zip(flags, truth)])
    assert agree >= 0.9, list(zip(flags, truth))
    assert all(f != "none" for f, t in zip(flags, truth) if t)  # no stenotic slice goes unflagged


def test_slice_positions_and_numbers_follow_the_file(tmp_path):
    from spineseg.io.images import read_image, save_nifti

    # slices stored superior -> inferior (a flipped slice axis), 4 mm apart, the top one at z = 30 mm
    affine = np.diag([0.5, 0.5, -4.0, 1.0])
    affine[:3, 3] = [0, 0, 30.0]
    save_nifti(tmp_path / "v.nii.gz", np.zeros((40, 40, 3), np.int16), affine)
    image = read_image(tmp_path / "v.nii.gz")
    labels = np.zeros((3, 40, 40), np.uint8)
    labels[2, 10:20, 10:20] = 2  # the display's top slice (superior) = the file's first slice
    rows = measure_image(labels, image, "v")
    assert [r["slice"] for r in rows] == [0, 1, 2]
    assert [r["position_mm"] for r in rows] == pytest.approx([30.0, 26.0, 22.0])  # along +S (RAS z)
    assert rows[0]["canal_area_mm2"] == pytest.approx(100 * 0.25) and rows[1]["canal_area_mm2"] is None
    assert slice_positions_mm(image)[2] == pytest.approx(rows[0]["position_mm"])


def test_measurements_csv_and_narrowest_slice_summary(tmp_path):
    rows = [{"case": "v", "stack": 0, "slice": i, "position_mm": 4.0 * i, "canal_area_mm2": a, "canal_ap_mm": ap,
             "canal_transverse_mm": 20.0, "body_area_mm2": 900.0, "lamina_area_mm2": 300.0, "lamina_thickness_mm": 6.0,
             "stenosis": s} for i, (a, ap, s) in enumerate([(180.0, 14.0, "none"), (70.0, 8.0, "absolute"),
                                                            (95.0, 13.0, "relative")])]
    rows.append({"case": "single", "stack": 0, "slice": 0, "position_mm": 0.0, "canal_area_mm2": None,
                 "canal_ap_mm": None, "canal_transverse_mm": None, "body_area_mm2": 0.0, "lamina_area_mm2": 0.0,
                 "lamina_thickness_mm": None, "stenosis": None})
    write_measurements(tmp_path, rows)
    with open(tmp_path / "measurements.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == MEASUREMENT_COLUMNS == ("case", "stack", "slice", "position_mm", "canal_area_mm2",
                                                      "canal_ap_mm", "canal_transverse_mm", "body_area_mm2",
                                                      "lamina_area_mm2", "lamina_thickness_mm", "stenosis",
                                                      "canal_note")
    assert len(table) == 5 and table[4][4] == "" and table[4][-1] == ""
    with open(tmp_path / "measurements_summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 1  # only the volume gets a summary
    assert summary[0]["narrowest_slice"] == "1" and summary[0]["stenosis"] == "absolute"
    assert summary[0]["slices_relative"] == "1" and summary[0]["slices_absolute"] == "1"


def test_a_canal_fragment_or_a_canal_in_pieces_is_measured_but_not_graded_nor_the_narrowest():
    from spineseg.data.phantom import phantom_slice
    from spineseg.infer.measure import CANAL, MIN_CANAL_MM2, narrowest

    s = phantom_slice(0, 0, 0, size=160, spacing=1.2)
    whole = measure_slice(s.label, s.spacing)
    assert whole["stenosis"] is not None and whole["canal_note"] is None
    fragment = np.where(s.label == CANAL, 0, s.label)
    r, c = np.argwhere(s.label == CANAL)[0]
    fragment[r:r + 3, c:c + 3] = CANAL  # 9 pixels, 13 mm2: what an oblique end slice may keep
    small = measure_slice(fragment, s.spacing)
    assert small["canal_area_mm2"] < MIN_CANAL_MM2 and small["stenosis"] is None and "fragment" in small["canal_note"]
    split = s.label.copy()
    cols = np.argwhere(s.label == CANAL)[:, 1]
    split[:, (cols.min() + cols.max()) // 2] = np.where(split[:, (cols.min() + cols.max()) // 2] == CANAL, 0,
                                                        split[:, (cols.min() + cols.max()) // 2])
    pieces = measure_slice(split, s.spacing)
    assert pieces["stenosis"] is None and "2 pieces" in pieces["canal_note"]
    stray = s.label.copy()
    stray[r - 30:r - 28, c:c + 2] = CANAL  # 4 stray pixels far from the canal: left out, the canal still graded
    kept = measure_slice(stray, s.spacing)
    assert kept["stenosis"] == whole["stenosis"] and kept["canal_area_mm2"] == whole["canal_area_mm2"]
    assert kept["canal_transverse_mm"] == whole["canal_transverse_mm"] and "stray" in kept["canal_note"]
    rows = [{"case": "v", "stack": 0, "slice": i, "position_mm": 4.0 * i, **m} for i, m in enumerate((whole, small, pieces))]
    summary = narrowest(rows)
    assert summary["narrowest_slice"] == 0 and summary["measured_slices"] == 1 and summary["ungraded_slices"] == 2


def test_a_failed_summary_write_leaves_no_summary_of_an_earlier_run(tmp_path, monkeypatch):
    """measurements.csv and measurements_summary.csv describe one run: when writing the summary fails (a full
    disk), the earlier run's summary must not stay beside the new measurements."""
    import spineseg.infer.measure as measure

    def volume(case, area):
        return [{"case": case, "stack": 0, "slice": i, "position_mm": 4.0 * i, "canal_area_mm2": area, "canal_ap_mm": 14.0,
                 "canal_transverse_mm": 20.0, "body_area_mm2": 900.0, "lamina_area_mm2": 300.0,
                 "lamina_thickness_mm": 6.0, "stenosis": "none"} for i in range(2)]

    write_measurements(tmp_path, volume("earlier", 180.0))
    assert "earlier" in (tmp_path / "measurements_summary.csv").read_text()
    real_write = measure.atomic_write_text

    def write_failing_summary(path, text):
        if path.name == "measurements_summary.csv":
            raise OSError(28, "No space left on device", str(path))
        real_write(path, text)

    monkeypatch.setattr(measure, "atomic_write_text", write_failing_summary)
    with pytest.raises(OSError):
        write_measurements(tmp_path, volume("later", 150.0))
    measurements = (tmp_path / "measurements.csv").read_text()
    summary = tmp_path / "measurements_summary.csv"
    summary_cases = {r["case"] for r in csv.DictReader(summary.open())} if summary.exists() else set()
    measured_cases = {r["case"] for r in csv.DictReader(measurements.splitlines())}
    assert summary_cases <= measured_cases, (summary_cases, measured_cases)


def test_the_absolute_stenosis_thresholds_are_strict_too():
    t = StenosisThresholds()
    assert t.grade(75, 15) == "relative" and t.grade(74.9, 15) == "absolute"
    assert t.grade(150, 10) == "relative" and t.grade(150, 9.99) == "absolute"
