import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from spineseg.cli import main
from spineseg.data.phantom import phantom_slice
from spineseg.anatomy.order import MIDLINE_MM, check_slice, midline_distance
from spineseg.models.checkpoint import resolve_checkpoint
from spineseg.eval.sanity import check_image, display_to_world, failure_kinds, montage, plane_to_world, run_sanity
from spineseg.io.images import _LPS_TO_RAS, Image, read_image, read_label, save_nifti, save_png, slice_affine

# the slices these tests were written for (the same seeds under the older position mix), each with a body
from spineseg.data.phantom import POSITION_P_BEFORE_2026_11 as BEFORE_DISC_CHANGE  # noqa: E402

BODY, CANAL, LAMINA = 1, 2, 3


def _truth(patient=1, k=2, size=160, spacing=1.25):
    """A phantom slice (pedicle level by default) and the world plane of its display grid."""
    s = phantom_slice(0, patient, k, size=size, spacing=spacing, positions=BEFORE_DISC_CHANGE)
    a = slice_affine(s.spacing)
    return s, np.column_stack([a[:3, 1], a[:3, 0], a[:3, 3]])  # (row, col, 1) -> RAS mm


def _one_sided(label):
    """The lamina of the image-left half (patient right) removed: only one lamina remains."""
    out = label.copy()
    midline = np.argwhere(label == CANAL)[:, 1].mean()
    rows, cols = np.nonzero(label == LAMINA)
    out[rows[cols < midline], cols[cols < midline]] = 0
    return out


@pytest.mark.parametrize("patient,k", [(0, 0), (1, 0), (2, 2), (4, 1)])
def test_phantom_truth_is_in_order_with_both_laminae(patient, k):
    s, plane = _truth(patient, k)
    r = check_slice(s.label, plane)
    assert r["order"] and r["both_laminae"] and r["reason"] == "" and r["area_warning"] == "", r
    assert r["regions_vertebral_body"] == r["regions_vertebral_foramen"] == 1


def test_prediction_flipped_front_to_back_fails():
    s, plane = _truth()
    r = check_slice(s.label[::-1], plane)  # body behind the canal, laminae in front
    assert not r["order"]
    assert "body not anterior of the canal" in r["reason"] and "canal not anterior of the laminae" in r["reason"]


def test_body_on_the_back_muscles_fails():
    s, plane = _truth()
    label = np.where(s.label == BODY, 0, s.label)
    lamina_back = np.argwhere(s.label == LAMINA)[:, 0].max()
    body = np.argwhere(s.label == BODY)
    shift = lamina_back + 4 - body[:, 0].min()  # the whole body moved behind the laminae
    label[body[:, 0] + shift, body[:, 1]] = BODY
    r = check_slice(label, plane)
    assert not r["order"] and "body not anterior of the canal" in r["reason"]


def test_directions_come_from_the_world_plane_not_the_rows():
    s, plane = _truth()
    rows_anterior = plane.copy()  # a grid whose rows run posterior -> anterior
    rows_anterior[:, 0] *= -1
    assert check_slice(s.label[::-1], rows_anterior)["order"]
    assert not check_slice(s.label, rows_anterior)["order"]


def test_one_sided_lamina_is_not_both_laminae():
    s, plane = _truth()
    r = check_slice(_one_sided(s.label), plane)
    assert r["order"] and not r["both_laminae"]  # order holds; the missing lamina is its own finding
    assert r["lamina_right_mm2"] < 0.1 * r["lamina_left_mm2"]  # the image-left half is the patient's right


def _half_body(label):
    """The body's image-right half removed (a partial body, as on some real disc-level slices)."""
    out = label.copy()
    rows, cols = np.nonzero(label == BODY)
    cut = np.median(cols)
    out[rows[cols > cut], cols[cols > cut]] = 0
    return out


def test_the_drawn_midline_is_the_axis_the_lamina_sides_are_counted_by():
    s, plane = _truth()
    label = _half_body(s.label)  # the half body's centroid tilts the body-canal axis
    r = check_slice(label, plane)
    d = midline_distance(label, plane)
    px_mm2 = float(np.prod(s.spacing))
    lamina = label == LAMINA
    assert (d[lamina] < -MIDLINE_MM).sum() * px_mm2 == pytest.approx(r["lamina_left_mm2"], abs=0.05)
    assert (d[lamina] > MIDLINE_MM).sum() * px_mm2 == pytest.approx(r["lamina_right_mm2"], abs=0.05)
    assert r["lamina_right_mm2"] > 1.5 * r["lamina_left_mm2"]  # the tilt moves lamina to the patient's right ...
    full = check_slice(s.label, plane)
    sides = sorted((full["lamina_left_mm2"], full["lamina_right_mm2"]))
    assert sides[0] > 0.75 * sides[1]  # ... where with the whole body the sides are near even
    assert abs(d[label == CANAL].mean()) < 1e-6  # the line passes through the canal's centre
    assert np.ptp(d[:, 80]) > 10.0  # and is tilted: not a column of the grid
    assert midline_distance(np.where(label == CANAL, 0, label), plane) is None


def test_montage_draws_the_midline_only_where_both_laminae_are_not_found(tmp_path):
    from matplotlib.image import imread

    s, plane = _truth()
    one_sided = _one_sided(s.label)
    pngs = {}
    for name, label in (("both", s.label), ("one", one_sided)):
        row = check_slice(label, plane)
        row = {**{f"{k}_raw": v for k, v in row.items()}, **{f"{k}_post": v for k, v in row.items()}}
        panel = {"image": s.image, "raw": label, "post": label, "spacing": s.spacing, "row": row, "label": name}
        for with_plane in (False, True):
            path = tmp_path / f"{name}_{with_plane}.png"
            montage([{**panel, "plane": plane} if with_plane else panel], path, name)
            pngs[name, with_plane] = imread(path)[..., :3]
    assert np.array_equal(pngs["both", False], pngs["both", True])  # both laminae found: no line
    drawn = np.abs(pngs["one", True] - pngs["one", False]).sum(-1) > 0.1
    assert drawn.sum() > 30
    yellow = pngs["one", True][drawn]
    assert (yellow[:, 2] < 0.5 * yellow[:, 0]).mean() > 0.5  # the changed pixels are yellow-ish


def test_split_body_or_canal_fails_on_raw_and_is_reported_beside_post():
    s, _ = _truth()
    split = s.label.copy()
    body_cols = np.argwhere(s.label == BODY)[:, 1]
    cut = (body_cols.min() + body_cols.max()) // 2
    split[:, cut][split[:, cut] == BODY] = 0  # a one-pixel gap through the body
    canal = split == CANAL
    canal_rows = np.flatnonzero(canal.any(1))
    r0 = (canal_rows[0] + canal_rows[-1]) // 2
    c0 = np.flatnonzero(canal[r0])[canal[r0].sum() // 2]
    for r in (r0, r0 + 1):  # a two-row gap through the canal ...
        split[r][split[r] == CANAL] = 0
    split[r0, c0] = split[r0 + 1, c0 + 1] = CANAL  # ... bridged only diagonally: two 4-connected regions
    assert ndi.label(split == CANAL, structure=np.ones((3, 3)))[1] == 1  # one region for 8-connectivity
    img = Image(s.image[None].astype(np.float32), s.spacing, 4.0, "phantom", np.eye(4), (160, 160), None)
    row = check_image(img, split[None], s.label[None])[0]
    assert not row["order_raw"] and "body in 2 regions" in row["reason_raw"]
    assert "canal in 2 regions" in row["reason_raw"]
    assert row["order_post"] and row["regions_vertebral_body_post"] == 1


def test_failures_are_counted_by_kind():
    reasons = ["canal in 2 regions; body in 3 regions", "body in 2 regions", "canal missing; lamina missing",
               "body not anterior of the canal"]
    assert failure_kinds(reasons) == {"body in pieces": 2, "body not anterior of the canal": 1, "canal in pieces": 1,
                                      "canal missing": 1, "lamina missing": 1}


def test_disc_level_slice_without_body_passes_on_canal_and_laminae():
    s, plane = _truth(5, 2)  # a disc-level phantom slice
    assert s.meta["position"] == "disc"
    r = check_slice(np.where(s.label == BODY, 0, s.label), plane)
    assert r["order"] and not r["body_found"] and r["both_laminae"]
    r = check_slice(np.where(s.label == BODY, 0, s.label)[::-1], plane)  # ... but not in the wrong direction
    assert not r["order"] and "canal not anterior of the laminae" in r["reason"]


def test_area_outside_the_anatomical_range_is_a_warning_not_an_order_failure():
    s, plane = _truth()
    r = check_slice(s.label, plane * np.array([2.0, 2.0, 1.0]))  # the same labels on a 2x coarser grid: 4x areas
    assert r["order"] and "body" in r["area_warning"] and "mm2 outside" in r["area_warning"]


# ----------------------------------------------------------------------------------------------- world geometry

def _world_by_file_layout(img, s, r, c):
    d = np.zeros(img.data.shape, np.uint8)
    d[s, r, c] = 1
    f = img.to_file_layout(d)
    idx = np.argwhere(f.reshape(f.shape + (1,) * (3 - f.ndim)) == 1)[0]
    return (img.affine @ np.r_[idx, 1.0])[:3]


def _storages(tmp_path, image, label, spacing):
    """One slice stored as NIfTI in L,P,S, flipped to R,A,S, with permuted axes, tilted 20 deg (oblique), and as MHA."""
    import SimpleITK as sitk

    lps = _LPS_TO_RAS @ np.diag([spacing[1], spacing[0], 4.0, 1.0])
    h, w = image.shape
    flipped = lps @ np.array([[-1, 0, 0, w - 1], [0, -1, 0, h - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    perm = lps[:, [2, 0, 1, 3]]
    t = np.deg2rad(20)
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    layouts = {"lps": (lambda a: a.T[:, :, None], lps), "ras": (lambda a: a.T[::-1, ::-1, None], flipped),
               "perm": (lambda a: a.T[None], perm), "oblique": (lambda a: a.T[:, :, None], rotated @ lps)}
    paths = {}
    for name, (to_file, affine) in layouts.items():
        save_nifti(tmp_path / f"{name}.nii.gz", to_file(image).astype(np.float32), affine)
        save_nifti(tmp_path / f"{name}_lab.nii.gz", to_file(label).astype(np.uint8), affine)
        paths[name] = (tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_lab.nii.gz")
    for kind, arr in (("", image.astype(np.float32)), ("_lab", label.astype(np.uint8))):
        im = sitk.GetImageFromArray(arr[None])  # stored in L, P, S, the ITK convention
        im.SetSpacing((spacing[1], spacing[0], 4.0))
        sitk.WriteImage(im, str(tmp_path / f"mha{kind}.mha"))
    paths["mha"] = (tmp_path / "mha.mha", tmp_path / "mha_lab.mha")
    return paths


def test_display_indices_map_to_the_file_world(tmp_path):
    s, _ = _truth()
    for name, (path, _) in _storages(tmp_path, s.image, s.label, (1.25, 1.1)).items():
        img = read_image(path)
        m = display_to_world(img)
        for r, c in ((0, 0), (7, 3), (150, 120)):
            assert m[:3] @ [0, r, c, 1] == pytest.approx(_world_by_file_layout(img, 0, r, c), abs=1e-4), name


def test_same_verdict_whatever_the_storage_orientation(tmp_path):
    s, _ = _truth()
    verdicts = {}
    for label, tag in ((s.label, "truth"), (s.label[::-1].copy(), "flipped")):
        (tmp_path / tag).mkdir()
        for name, (path, lab_path) in _storages(tmp_path / tag, s.image, label, s.spacing).items():
            img, lab = read_image(path), read_label(lab_path)
            row = check_image(img, lab.data, lab.data)[0]
            verdicts[(tag, name)] = (row["order_post"], row["reason_post"], row["both_laminae_post"])
    assert {v for (t, _), v in verdicts.items() if t == "truth"} == {(True, "", True)}
    flipped = {v for (t, _), v in verdicts.items() if t == "flipped"}
    assert len(flipped) == 1 and not next(iter(flipped))[0]


def test_plane_of_a_volume_slice_includes_its_position():
    data = np.zeros((3, 8, 8), np.float32)
    img = Image(data, (1.0, 1.0), 4.0, "mem", np.eye(4), data.shape, None)
    assert plane_to_world(img, 2)[2, 2] - plane_to_world(img, 0)[2, 2] == pytest.approx(8.0)  # 2 slices x 4 mm up


# ----------------------------------------------------------------------------------------------- command

class _KnownPredictor:
    """Stands in for Predictor: raw = the truth with the body cut in two, post = the truth."""

    name, postprocess = "known", "largest"

    def predict_both(self, image):
        truth = np.stack([_truth(p)[0].label for p in range(image.num_slices)])
        raw = truth.copy()
        cut = (np.argwhere(truth[0] == BODY)[:, 1].min() + np.argwhere(truth[0] == BODY)[:, 1].max()) // 2
        raw[:, :, cut][raw[:, :, cut] == BODY] = 0
        return raw, truth


def test_report_keeps_raw_and_post_apart_per_slice_input_and_overall(tmp_path):
    volume = np.stack([_truth(p)[0].image for p in range(2)]).astype(np.float32)
    save_nifti(tmp_path / "vol.nii.gz", np.transpose(volume, (2, 1, 0)), slice_affine((1.25, 1.25), 4.0))
    rep = run_sanity(_KnownPredictor(), [tmp_path / "vol.nii.gz"], tmp_path / "out", progress=False)
    assert [(r["order_raw"], r["order_post"]) for r in rep["rows"]] == [(False, True)] * 2
    assert all("body in 2 regions" in r["reason_raw"] for r in rep["rows"])
    summary = json.loads((tmp_path / "out" / "sanity.json").read_text())
    assert summary["inputs"]["vol"]["raw"]["order_pass"] == 0 and summary["inputs"]["vol"]["post"]["order_pass"] == 2
    assert summary["overall"]["post"]["both_laminae_fraction"] == 1.0
    assert summary["overall"]["raw"]["failures"] == {"body in pieces": 2} and summary["overall"]["post"]["failures"] == {}
    header = (tmp_path / "out" / "sanity.csv").read_text().splitlines()[0].split(",")
    assert {"order_raw", "order_post", "regions_vertebral_body_raw", "regions_vertebral_body_post",
            "area_warning_raw", "both_laminae_post"} <= set(header)
    assert (tmp_path / "out" / "montage_vol.png").stat().st_size > 20000


def test_cli_on_a_folder_of_png_slices(tmp_path, capsys):
    folder = tmp_path / "pngs"
    for p in range(2):
        s = phantom_slice(0, p, 0, size=160, spacing=1.25)
        save_png(folder / f"slice_{p}.png", s.image.astype(np.float32))
    out = tmp_path / "out"
    assert main(["sanity", "--model", "pretrained", "--input", str(folder), "--spacing", "1.25", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pngs: order raw" in printed and "post" in printed
    rows = list(csv.DictReader((out / "sanity.csv").open()))
    assert [r["source"] for r in rows] == ["slice_0", "slice_1"] and {r["input"] for r in rows} == {"pngs"}
    for r in rows:  # post-processing only removes regions
        assert int(r["regions_lamina_post"]) <= int(r["regions_lamina_raw"])
    report = json.loads((out / "sanity.json").read_text())
    assert report["inputs"]["pngs"]["slices"] == 2 and set(report["overall"]) == {"slices", "raw", "post"}
    import torch
    assert report["engine"] == ("torch" if torch.cuda.is_available() else "onnx")  # the default engine, recorded
    shipped = resolve_checkpoint("pretrained")  # the report names the very file that ran
    assert report["model_sha256"] == hashlib.sha256(Path(shipped).read_bytes()).hexdigest()
    assert report["checkpoint"] == str(shipped)
    assert main(["sanity", "--model", "pretrained", "--input", str(folder), "--spacing", "1.25", "--out",
                 str(tmp_path / "t"), "--engine", "torch", "--quiet"]) == 0
    assert json.loads((tmp_path / "t" / "sanity.json").read_text())["engine"] == "torch"
    assert [p.name for p in out.glob("montage_*.png")] == ["montage_pngs.png"]
    assert main(["sanity", "--model", "pretrained", "--input", str(folder), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "--spacing" in err and err.count("\n") == 1


def test_sanity_command_on_a_real_volume(realdata, tmp_path, capsys):
    out = tmp_path / "tum01"
    volume = realdata / "TUM01_water_img_img_L2-L5.nii.gz"
    assert main(["sanity", "--model", "pretrained", "--input", str(volume), "--out", str(out), "--slices", "12:15",
                 "--quiet"]) == 0
    rows = list(csv.DictReader((out / "sanity.csv").open()))
    assert [int(r["slice"]) for r in rows] == [12, 13, 14]
    for r in rows:  # raw and post are both reported; post-processing never adds regions
        assert r["order_raw"] in ("True", "False") and r["order_post"] in ("True", "False")
        assert int(r["regions_vertebral_body_post"]) <= int(r["regions_vertebral_body_raw"])
    assert "order raw" in capsys.readouterr().out
    assert (out / "montage_TUM01_water_img_img_L2-L5.png").stat().st_size > 20000


@pytest.mark.parametrize("patient,k", [(0, 0), (1, 0), (2, 2), (4, 1), (5, 3)])
def test_half_a_body_is_lopsided_and_a_whole_one_is_not(patient, k):
    from spineseg.anatomy.order import LOPSIDED_BODY

    s, plane = _truth(patient, k)
    whole, half = check_slice(s.label, plane), check_slice(_half_body(s.label), plane)
    assert whole["body_balance"] >= 0.6  # a whole body straddles the midline through the canal
    assert half["body_balance"] < LOPSIDED_BODY <= whole["body_balance"]
    assert check_slice(np.where(s.label == BODY, 0, s.label), plane)["body_balance"] is None


@pytest.mark.parametrize("patient,k", [(0, 2), (0, 3)])
def test_a_whole_body_of_a_rotated_spine_is_balanced_about_the_lamina_axis(patient, k):
    s, plane = _truth(patient, k)  # axially rotated: the world anterior-posterior line cuts the body unevenly
    assert check_slice(s.label, plane)["body_balance"] >= 0.9


class _HalfBodyPredictor(_KnownPredictor):
    """post = the truth of patients 1 and 2 with half of each body removed; raw = the truth with its body
    replaced by a speck (9 pixels, about 14 mm^2) on one side."""

    def predict_both(self, image):
        truth = np.stack([_truth(p)[0].label for p in range(1, 1 + image.num_slices)])
        raw = np.where(truth == BODY, 0, truth)
        for t, r in zip(truth, raw):
            row, col = np.argwhere(t == BODY).min(0)
            r[row:row + 3, col:col + 3] = BODY
        return raw, np.stack([_half_body(t) for t in truth])


def test_report_counts_lopsided_bodies_per_stage(tmp_path):
    volume = np.stack([_truth(p)[0].image for p in (1, 2)]).astype(np.float32)
    save_nifti(tmp_path / "vol.nii.gz", np.transpose(volume, (2, 1, 0)), slice_affine((1.25, 1.25), 4.0))
    run_sanity(_HalfBodyPredictor(), [tmp_path / "vol.nii.gz"], tmp_path / "out", progress=False)
    summary = json.loads((tmp_path / "out" / "sanity.json").read_text())["overall"]
    assert summary["raw"]["lopsided_bodies"] == 0 and summary["post"]["lopsided_bodies"] == 2
    rows = list(csv.DictReader((tmp_path / "out" / "sanity.csv").open()))
    # both are lopsided, but a raw speck is not a body: only the post-processed half bodies are counted
    assert all(float(r["body_balance_post"]) < 0.25 and float(r["body_balance_raw"]) < 0.25 for r in rows)
