import numpy as np
import pytest

from spineseg.data.phantom import phantom_slice
from spineseg.anatomy.postprocess import anatomical_postprocess

# the slices these tests were written for (the same seeds under the older position mix), each with a body
from spineseg.data.phantom import POSITION_P_BEFORE_2026_11 as BEFORE_DISC_CHANGE  # noqa: E402

SPACING = (0.78125, 0.78125)


@pytest.fixture(scope="module")
def truth():
    return [phantom_slice(0, p, k, size=256, spacing=SPACING[0], positions=BEFORE_DISC_CHANGE) for p in range(6)
            for k in range(2)]


def _regions(mask):
    from scipy import ndimage as ndi

    return ndi.label(mask, structure=np.ones((3, 3)))[1]


def test_a_correct_label_map_is_left_as_it_is(truth):
    from scipy import ndimage as ndi

    for s in truth:
        if ndi.label(s.label == 1)[1] > 1:
            continue  # a detached osteophyte labelled as body is not anatomy this rule keeps
        assert np.array_equal(anatomical_postprocess(s.label, s.spacing), s.label), s.meta


def test_both_laminae_survive_when_they_do_not_touch(truth):
    s = truth[0]
    lab = s.label.copy()
    cols = np.argwhere(lab == 3)[:, 1]
    mid = int(np.argwhere(lab == 2)[:, 1].mean())
    lab[:, mid - 3:mid + 4][lab[:, mid - 3:mid + 4] == 3] = 0  # cut the arch at the midline
    assert _regions(lab == 3) == 2 and cols.min() < mid < cols.max()
    out = anatomical_postprocess(lab, s.spacing)
    assert _regions(out == 3) == 2 and (out == 3).sum() == (lab == 3).sum()


def test_the_body_next_to_the_canal_wins_over_a_larger_blob_on_the_psoas(truth):
    s = truth[1]
    lab = s.label.copy()
    rows, cols = np.argwhere(lab == 1).T
    psoas = np.zeros_like(lab, bool)
    h, w = np.ptp(rows) + 10, np.ptp(cols) // 2 + 25
    r0, c0 = rows.min(), max(0, cols.min() - w - 30)
    psoas[r0:r0 + h, c0:c0 + w] = True
    lab[psoas & (lab == 0)] = 1
    assert (psoas & (lab == 1)).sum() > (s.label == 1).sum()  # the false blob is the larger one
    out = anatomical_postprocess(lab, s.spacing)
    assert np.array_equal(out == 1, s.label == 1)


def test_lamina_fragments_in_front_of_the_canal_or_far_away_are_removed(truth):
    s = truth[2]
    lab = s.label.copy()
    body_rows = np.argwhere(lab == 1)[:, 0]
    lab[body_rows.min() - 12:body_rows.min() - 6, 100:110] = 3  # in front of the body
    lab[2:8, 2:8] = 3  # a corner of the image, far from the canal
    out = anatomical_postprocess(lab, s.spacing)
    assert np.array_equal(out == 3, s.label == 3)


def test_holes_in_body_and_canal_are_filled_and_the_canal_is_one_region(truth):
    s = truth[3]
    lab = s.label.copy()
    for k in (1, 2):
        r, c = np.argwhere(lab == k).mean(0).astype(int)
        lab[r - 1:r + 2, c - 1:c + 2] = 0
    r, c = np.argwhere(s.label == 2)[0]
    lab[r - 30:r - 27, c:c + 3] = 2  # a canal speck elsewhere
    out = anatomical_postprocess(lab, s.spacing)
    assert np.array_equal(out == 1, s.label == 1) and np.array_equal(out == 2, s.label == 2)


def test_a_body_speck_on_a_disc_level_slice_is_no_body():
    s = next(x for x in (phantom_slice(0, p, k, size=256, spacing=SPACING[0]) for p in range(40) for k in range(5))
             if x.meta["position"] == "disc")
    assert not (s.label == 1).any()
    lab = s.label.copy()
    r, c = np.argwhere(lab == 2).min(0)
    lab[r - 12:r - 7, c:c + 5] = 1  # 25 px = 15 mm2 in front of the canal
    assert np.array_equal(anatomical_postprocess(lab, s.spacing), s.label)


def test_a_body_far_from_the_canal_is_no_body_and_one_near_it_is_kept(truth):
    from scipy import ndimage as ndi

    from spineseg.anatomy.postprocess import BODY_REACH_MM

    s = truth[4]
    body = s.label == 1
    canal_centre = np.argwhere(s.label == 2).mean(0)
    mm = s.spacing[0]

    def moved(rows: float, cols: float) -> np.ndarray:
        """The label map with the body shifted by (rows, cols) pixels, onto background."""
        lab = s.label.copy()
        lab[body] = 0
        shifted = ndi.shift(body.astype(float), (rows, cols), order=0) > 0.5
        lab[shifted & (lab == 0)] = 1
        return lab

    def edge_mm(lab):
        return ndi.distance_transform_edt(lab != 1, sampling=s.spacing)[tuple(np.round(canal_centre).astype(int))]

    far = moved(-(BODY_REACH_MM + 15) / mm, -(BODY_REACH_MM + 15) / mm)  # onto a bowel loop, say
    assert edge_mm(far) > BODY_REACH_MM
    assert not (anatomical_postprocess(far, s.spacing) == 1).any()
    near = moved(-8 / mm, 0)  # 8 mm further forward: still the body
    assert edge_mm(near) < BODY_REACH_MM
    assert np.array_equal(anatomical_postprocess(near, s.spacing) == 1, near == 1)


def test_working_on_the_labels_bounding_box_changes_nothing(truth):
    from spineseg.anatomy.postprocess import _postprocess

    rng = np.random.default_rng(0)
    for s in truth:
        lab = s.label.copy()
        rows, cols = np.nonzero(lab)
        for _ in range(6):  # specks and blobs of every class, some far out, some touching the structures
            r, c = rng.integers(rows.min() - 20, rows.max() + 20), rng.integers(cols.min() - 20, cols.max() + 20)
            lab[max(r, 0):r + rng.integers(1, 12), max(c, 0):c + rng.integers(1, 12)] = rng.integers(0, 4)
        r, c = np.argwhere(lab == 1).mean(0).astype(int) if (lab == 1).any() else (0, 0)
        lab[r - 2:r + 2, c - 2:c + 2] = 0  # a hole
        lab[0, 5:9] = 1  # a body speck on the image border
        assert np.array_equal(anatomical_postprocess(lab, s.spacing), _postprocess(lab, s.spacing)), s.meta


def test_of_several_body_candidates_within_reach_the_one_in_front_of_and_nearest_the_canal_wins():
    """Two larger false bodies within BODY_REACH_MM of the canal: one in front of it but further away, one
    behind it and closer. The true body (in front, nearest) is kept; both decoys go."""
    rows, cols = np.mgrid[:200, :200]
    spacing = (1.0, 1.0)
    lab = np.zeros((200, 200), np.uint8)
    lab[(rows - 100) ** 2 + (cols - 100) ** 2 <= 36] = 2  # canal, centre (100, 100)
    body = ((rows - 76) / 15.0) ** 2 + ((cols - 100) / 20.0) ** 2 <= 1  # in front, edge 9 mm from the centre
    lab[body] = 1
    lab[60:105, 123:163] = 1  # larger, in front, edge 23 mm from the centre
    lab[110:150, 70:130] = 1  # larger still, behind the canal, edge 10 mm from the centre
    out = anatomical_postprocess(lab, spacing)
    assert np.array_equal(out == 1, body) and np.array_equal(out == 2, lab == 2)
