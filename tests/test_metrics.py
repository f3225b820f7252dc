import numpy as np
import pytest
import torch

from spineseg.data.phantom import phantom_slice
from spineseg.eval.metrics import hausdorff, slice_metrics, summarise


def _pairs():
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):  # random blobs
        a = np.zeros((64, 80), bool)
        b = np.zeros((64, 80), bool)
        a[rng.integers(5, 20):rng.integers(30, 60), rng.integers(5, 30):rng.integers(40, 75)] = True
        b[rng.integers(5, 20):rng.integers(30, 60), rng.integers(5, 30):rng.integers(40, 75)] = True
        a |= rng.random((64, 80)) > 0.97  # scattered pixels: many boundary points
        out.append((a, b))
    s = phantom_slice(0, 1, 0, size=256, spacing=0.78125)  # phantom structure vs a shifted / eroded copy
    from scipy import ndimage as ndi

    for k in (1, 2, 3):
        g = s.label == k
        out.append((ndi.binary_erosion(np.roll(g, 3, axis=1)), g))
    return out


@pytest.mark.parametrize("spacing", [(0.3906, 0.3906), (0.5, 1.3)])
def test_hd_matches_monai(spacing):
    from monai.metrics import compute_hausdorff_distance

    for a, b in _pairs():
        hd, h95 = hausdorff(a, b, spacing, "monai")
        pa, pb = (torch.from_numpy(x[None, None].astype(np.float32)) for x in (a, b))
        m_hd = float(compute_hausdorff_distance(pa, pb, include_background=True, spacing=list(spacing)))
        m_95 = float(compute_hausdorff_distance(pa, pb, include_background=True, percentile=95, spacing=list(spacing)))
        # MONAI computes in float32: agreement to 1e-6 relative
        assert hd == pytest.approx(m_hd, rel=1e-6) and h95 == pytest.approx(m_95, rel=1e-6)


@pytest.mark.parametrize("spacing", [(0.3906, 0.3906), (0.5, 1.3)])
def test_metrics_match_medpy(spacing):
    import medpy.metric.binary as medpy  # the test extra installs it
    for a, b in _pairs():
        hd, h95 = hausdorff(a, b, spacing, "pooled")
        assert hd == pytest.approx(medpy.hd(a, b, voxelspacing=spacing), abs=1e-6)
        assert h95 == pytest.approx(medpy.hd95(a, b, voxelspacing=spacing), abs=1e-6)
        lab_a, lab_b = a.astype(np.uint8), b.astype(np.uint8)
        m = slice_metrics(lab_a, lab_b, spacing)["vertebral_body"]
        assert m["dice"] == pytest.approx(medpy.dc(a, b), abs=1e-6)
        assert m["iou"] == pytest.approx(medpy.jc(a, b), abs=1e-6)
        assert m["ppv"] == pytest.approx(medpy.precision(a, b), abs=1e-6)
        assert m["sensitivity"] == pytest.approx(medpy.sensitivity(a, b), abs=1e-6)


def test_overlap_metrics_match_monai():
    from monai.metrics import compute_iou, compute_dice

    for a, b in _pairs():
        m = slice_metrics(a.astype(np.uint8), b.astype(np.uint8), (1.0, 1.0))["vertebral_body"]
        pa, pb = (torch.from_numpy(x[None, None].astype(np.float32)) for x in (a, b))
        assert m["dice"] == pytest.approx(float(compute_dice(pa, pb)), abs=1e-6)
        assert m["iou"] == pytest.approx(float(compute_iou(pa, pb)), abs=1e-6)


def test_known_values():
    a = np.zeros((20, 20), np.uint8)
    b = np.zeros((20, 20), np.uint8)
    a[5:10, 5:10] = 2
    b[5:10, 7:12] = 2
    m = slice_metrics(a, b, (0.5, 2.0))["vertebral_foramen"]
    assert m["dice"] == pytest.approx(2 * 15 / 50) and m["iou"] == pytest.approx(15 / 35)
    assert m["ppv"] == pytest.approx(15 / 25) and m["hd"] == pytest.approx(4.0)  # 2 columns x 2 mm


def test_empty_cases_are_skipped_or_missing():
    gt = np.zeros((16, 16), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros_like(gt)
    pred[8:12, 8:12] = 3
    m = slice_metrics(pred, gt, (1, 1))
    assert m["vertebral_foramen"] is None  # absent from both: skipped
    assert m["vertebral_body"]["dice"] == 0 and m["vertebral_body"]["hd"] is None  # absent from prediction
    assert m["lamina"]["dice"] == 0 and m["lamina"]["hd95"] is None  # absent from truth
    s = summarise([m, slice_metrics(gt, gt, (1, 1))])
    assert s["vertebral_foramen"]["skipped_absent_both"] == 2 and s["vertebral_foramen"]["n"] == 0
    assert s["vertebral_body"]["n"] == 2 and s["vertebral_body"]["hd_missing"] == 1
    assert s["vertebral_body"]["dice"] == pytest.approx(0.5)
