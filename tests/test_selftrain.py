"""Self-training pseudo-labels: accepted only when anatomy vouches for them; corrections always count."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spineseg import NUM_CLASSES
from spineseg.data.phantom import phantom_slice
from spineseg.train.selftrain import IGNORE, SelfTraining, in_small_regions, pseudo_labels

SPACING = 0.78125


@pytest.fixture(scope="module")
def truth():  # a pedicle-level slice (position share 1 on pedicle): body, canal and both laminae
    s = phantom_slice(0, 0, 0, size=256, spacing=SPACING, positions=(0.0, 0.0, 0.0, 1.0))
    assert {1, 2, 3} <= set(np.unique(s.label)), s.meta
    return s.label.astype(np.int64)


def _tiny_overrides() -> dict:
    """Config overrides for a seconds-long training run on the small phantom (a fresh dict each call)."""
    return {"preprocess": {"target_size": 64}, "model": {"base": 4}, "train": {"batch_size": 4, "max_minutes": None}}


def _probs(labels: np.ndarray, confidence: float = 0.95) -> torch.Tensor:
    """Softmax-like maps whose arg-max is ``labels`` with the given confidence."""
    one = F.one_hot(torch.from_numpy(labels), NUM_CLASSES).permute(0, 3, 1, 2).double()
    return one * confidence + (1 - one) * (1 - confidence) / (NUM_CLASSES - 1)


def _speck(labels: np.ndarray) -> tuple[slice, slice]:
    """A 3x3 body speck far behind the laminae, in the background."""
    rows = np.argwhere(labels == 3)[:, 0]
    r = min(rows.max() + 20, labels.shape[0] - 4)
    c = labels.shape[1] // 2
    assert (labels[r - 1:r + 2, c - 1:c + 2] == 0).all()
    return slice(r - 1, r + 2), slice(c - 1, c + 2)


def test_plausible_slice_is_a_target_with_its_speck_corrected(truth):
    lab = truth.copy()
    rs, cs = _speck(lab)
    lab[rs, cs] = 1
    probs = _probs(lab[None])
    unsure = (slice(0, 5), slice(0, 5))  # background corner the network is unsure of
    probs[0, :, unsure[0], unsure[1]] = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=probs.dtype)[:, None, None]
    probs[0, :, rs, cs] = torch.tensor([0.35, 0.4, 0.15, 0.1], dtype=probs.dtype)[:, None, None]  # unsure speck
    targets, accepted = pseudo_labels(probs, torch.tensor([[SPACING, SPACING]]), 0.9)
    t = targets[0].numpy()
    assert accepted == 1
    assert (t[rs, cs] == 0).all()  # the speck post-processing removed is a target although the network is unsure
    assert (t[unsure] == IGNORE).all()  # unsure and unchanged: no target
    confident = np.ones(t.shape, bool)
    confident[unsure] = False
    confident[rs, cs] = False
    assert np.array_equal(t[confident], truth[confident])


def test_a_slice_whose_body_post_processing_had_to_pick_from_pieces_can_be_left_out(truth):
    lab = truth.copy()
    cut = int(np.percentile(np.argwhere(lab == 1)[:, 0], 30))
    band = lab[cut:cut + 2]
    band[band == 1] = 0  # two background rows split the body into a front and a back piece
    spacing = torch.tensor([[SPACING, SPACING]])
    targets, accepted = pseudo_labels(_probs(lab[None]), spacing, 0.9)
    assert accepted == 1  # one piece is kept and passes the order rule
    changed = (targets[0].numpy() != lab) & (targets[0].numpy() != IGNORE)
    assert changed.sum() > 0.05 * (lab > 0).sum()  # the other piece became background
    targets, accepted = pseudo_labels(_probs(lab[None]), spacing, 0.9, max_change=0.05)
    assert accepted == 0 and (targets == IGNORE).all()
    rs, cs = _speck(truth)  # a speck is a small change: still a target under the same limit
    lab = truth.copy()
    lab[rs, cs] = 1
    targets, accepted = pseudo_labels(_probs(lab[None]), spacing, 0.9, max_change=0.05)
    assert accepted == 1 and (targets[0].numpy()[rs, cs] == 0).all()


@pytest.mark.parametrize("break_it", ["no canal", "upside down", "one lamina"])
def test_implausible_slice_gives_no_target(truth, break_it):
    lab = truth.copy()
    if break_it == "no canal":
        lab[lab == 2] = 0
    elif break_it == "upside down":  # laminae in front of the body
        lab = lab[::-1].copy()
    else:
        c = int(np.argwhere(lab == 2)[:, 1].mean())
        lab[:, : c - 2][lab[:, : c - 2] == 3] = 0
    targets, accepted = pseudo_labels(_probs(lab[None]), torch.tensor([[SPACING, SPACING]]), 0.9)
    assert accepted == 0 and (targets == IGNORE).all()


def test_loss_pulls_the_speck_towards_background_and_is_zero_without_targets(truth):
    lab = truth.copy()
    rs, cs = _speck(lab)
    lab[rs, cs] = 1
    logits = torch.log(_probs(lab[None])).float().requires_grad_(True)
    st = SelfTraining(weight=1.0, confidence=0.9)
    loss, accepted = st.loss(logits, torch.tensor([[SPACING, SPACING]]))
    loss.backward()
    assert accepted == 1.0 and float(loss.detach()) > 0
    g = logits.grad[0, :, rs, cs]
    assert (g[0] < 0).all() and (g[1] > 0).all()  # descent raises background, lowers body at the speck
    empty = torch.log(_probs(lab[None][:, ::-1].copy())).float().requires_grad_(True)
    loss, accepted = st.loss(empty, torch.tensor([[SPACING, SPACING]]))
    assert accepted == 0.0 and float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph


def test_a_slice_known_to_hold_no_body_teaches_background_where_the_network_says_body(truth):
    """--unlabeled-no-body: a disc-level slice the network labels with a body (as it does real discs) gets a
    target without one, every body pixel a background target however unsure; the other classes as usual."""
    lab = truth.copy()
    probs = _probs(lab[None]).repeat(2, 1, 1, 1)
    body = lab == 1
    unsure_body = body & (np.add.outer(np.arange(lab.shape[0]), np.arange(lab.shape[1])) % 2 == 0)
    probs[:, :, torch.from_numpy(unsure_body)] = torch.tensor([0.3, 0.4, 0.2, 0.1], dtype=probs.dtype)[None, :, None]
    spacing = torch.tensor([[SPACING, SPACING]] * 2)
    targets, accepted = pseudo_labels(probs, spacing, 0.9, max_change=0.05, no_body=torch.tensor([True, False]))
    flagged, plain = targets[0].numpy(), targets[1].numpy()
    assert accepted == 2  # the body's removal does not count against the change limit
    assert (flagged[body] == 0).all()  # confident or not
    assert (plain[body & ~unsure_body] == 1).all() and (plain[unsure_body] == IGNORE).all()
    other = ~body
    assert np.array_equal(flagged[other], plain[other])
    # a flagged slice still has to pass the order rule without its body
    no_canal = lab.copy()
    no_canal[no_canal == 2] = 0
    targets, accepted = pseudo_labels(_probs(no_canal[None]), spacing[:1], 0.9, no_body=torch.tensor([True]))
    assert accepted == 0 and (targets == IGNORE).all()


def test_targets_are_read_from_the_weak_view_and_learnt_on_the_strong_one(truth):
    """train.pseudo_weak_view: where the network is sure on the weak view and unsure on the strong one, the
    confident weak-view labels are the strong view's targets (the loss is their cross-entropy)."""
    unsure = torch.log(_probs(truth[None], confidence=0.4)).float().requires_grad_(True)
    sure = torch.log(_probs(truth[None], confidence=0.99)).float()
    st = SelfTraining(weight=1.0, confidence=0.9)
    spacing = torch.tensor([[SPACING, SPACING]])
    alone, _ = st.loss(unsure, spacing)
    assert float(alone.detach()) == 0.0  # on its own view nothing is confident, nothing changed: no target
    loss, accepted = st.loss(unsure, spacing, target_logits=sure)
    assert accepted == 1.0
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(unsure.detach(), torch.from_numpy(truth)[None])), rel=1e-5)
    loss.backward()
    g = unsure.grad[0]
    lab = torch.from_numpy(truth)
    assert (g.gather(0, lab[None]) < 0).all()  # descent raises every pixel's weak-view label


def _records(n=3):
    from spineseg.data.dataset import SliceRecord
    from spineseg.preprocess.pipeline import PreprocessConfig, preprocess_slice

    cfg = PreprocessConfig(target_size=96, target_spacing=2.0)
    out = []
    for i in range(n):
        s = phantom_slice(0, i, i, size=128, spacing=1.5)
        x, _, g = preprocess_slice(s.image, (1.5, 1.5), cfg)
        out.append(SliceRecord("c", "c", i, x, None, g))
    return out


def test_the_weak_view_has_the_strong_views_geometry_and_none_of_its_intensity_changes():
    from spineseg.data.augment import AugmentConfig
    from spineseg.data.dataset import SliceDataset

    recs = _records()
    strong_a = AugmentConfig(gamma=0.4, bias=0.3, noise=0.1, blur=0.3)
    strong_b = AugmentConfig(gamma=0.8, bias=0.0, noise=0.4, blur=1.0, intensity=0.3)
    a, b = SliceDataset(recs, strong_a, seed=4, weak_view=True), SliceDataset(recs, strong_b, seed=4, weak_view=True)
    plain = SliceDataset(recs, strong_a, seed=4)
    for i in range(len(recs)):
        ia, ib = a[i], b[i]
        assert torch.equal(ia["weak"], ib["weak"])  # no intensity setting reaches the weak view
        assert not torch.equal(ia["weak"], ia["image"]) and not torch.equal(ib["image"], ia["image"])
        assert torch.equal(ia["image"], plain[i]["image"])  # asking for a weak view leaves the strong one as it was
    # an intensity change that is affine on the content: the strong view is that affine map of the weak view,
    # pixel for pixel (same rotation, scale and shift)
    affine = SliceDataset(recs, AugmentConfig(intensity=0.3, rotate_deg=30.0), seed=9, weak_view=True)
    for i in range(len(recs)):
        it = affine[i]
        w, s = it["weak"].flatten().double(), it["image"].flatten().double()
        content = w != 0
        A = torch.stack([w[content], torch.ones_like(w[content])], 1)
        fit = torch.linalg.lstsq(A, s[content, None]).solution
        assert float((A @ fit - s[content, None]).abs().max()) < 1e-4
        assert float(fit[0]) != pytest.approx(1.0, abs=1e-6) or float(fit[1]) != pytest.approx(0.0, abs=1e-6)


def test_the_change_term_weighs_the_corrected_pixels_by_themselves_and_nothing_else(truth):
    """train.pseudo_change_weight: the speck's pixels get w x the mean CE over the changed pixels on top of their share
    of the plain mean; the gradient on every other pixel is the plain term's."""
    lab = truth.copy()
    rs, cs = _speck(lab)
    lab[rs, cs] = 1
    spacing = torch.tensor([[SPACING, SPACING]])

    def grad(change_weight):
        logits = torch.log(_probs(lab[None])).float().requires_grad_(True)
        loss, _ = SelfTraining(1.0, 0.9, change_weight=change_weight).loss(logits, spacing)
        loss.backward()
        return logits.grad[0]

    plain, weighted = grad(0.0), grad(0.5)
    speck = torch.zeros(lab.shape, dtype=torch.bool)
    speck[rs, cs] = True
    assert torch.allclose(plain[:, ~speck], weighted[:, ~speck])
    # CE's gradient on a pixel is (p - onehot) / n: the change term adds 0.5 x that over the 9 speck pixels alone
    p = _probs(lab[None]).float()[0][:, speck]
    extra = 0.5 * (p - F.one_hot(torch.zeros(9, dtype=torch.long), NUM_CLASSES).T.float()) / 9
    assert torch.allclose(weighted[:, speck] - plain[:, speck], extra, atol=1e-6)
    assert (weighted[0, speck] < plain[0, speck]).all()  # descent raises background there more strongly


def test_a_run_passes_the_change_weight_to_self_training_and_refuses_it_without(small_phantom, tmp_path):
    from spineseg.errors import SpinesegError
    from spineseg.train.loop import Trainer

    tiny = _tiny_overrides()
    kw = dict(overrides=tiny, progress=False, cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    t = Trainer(small_phantom, "unet", tmp_path / "on", **kw,
                sets={"train": {"epochs": 1, "pseudo_weight": 1.0, "pseudo_change_weight": 0.25,
                                "pseudo_change_structures": ["vertebral_body"], "pseudo_change_max_area_mm2": 20.0,
                                "pseudo_require_body": True}})
    assert t.step.self_training.change_weight == 0.25 and t.step.self_training.change_labels.tolist() == [1]
    assert t.step.self_training.change_max_area_mm2 == 20.0 and t.step.self_training.require_body
    with pytest.raises(SpinesegError, match="pseudo_change_weight is set but self-training is off"):
        Trainer(small_phantom, "unet", tmp_path / "off", **kw, sets={"train": {"pseudo_change_weight": 0.25}})


def test_the_change_term_leaves_out_slices_known_to_hold_no_body(truth):
    """On a --unlabeled-no-body slice every body pixel is a changed pixel: the weak label, not a correction. The
    change term leaves such a slice to the plain term (run C, which counted them, dropped whole vertebral bodies)."""
    lab = truth.copy()
    spacing = torch.tensor([[SPACING, SPACING]])

    def grad(change_weight):
        logits = torch.log(_probs(lab[None])).float().requires_grad_(True)
        loss, _ = SelfTraining(1.0, 0.9, change_weight=change_weight).loss(logits, spacing, torch.tensor([True]))
        loss.backward()
        return logits.grad

    assert torch.allclose(grad(0.0), grad(0.5))


def test_the_change_term_counts_only_the_corrections_of_the_structures_it_is_given(truth):
    """train.pseudo_change_structures: with the body alone, a removed body speck gets the term and a removed lamina
    piece does not (it keeps the plain term's gradient); with every structure, both do."""
    lab = truth.copy()
    rs, cs = _speck(lab)
    lab[rs, cs] = 1  # a body speck behind the laminae: removed by post-processing
    lamina_speck = (slice(rs.start, rs.stop), slice(cs.start + 12, cs.stop + 12))
    assert (lab[lamina_speck] == 0).all()
    lab[lamina_speck] = 3  # a third, isolated lamina piece: removed too
    spacing = torch.tensor([[SPACING, SPACING]])

    def grad(change_weight, structures=("vertebral_body", "vertebral_foramen", "lamina")):
        logits = torch.log(_probs(lab[None])).float().requires_grad_(True)
        loss, _ = SelfTraining(1.0, 0.9, change_weight=change_weight, change_structures=structures).loss(logits, spacing)
        loss.backward()
        return logits.grad[0]

    body, lamina = torch.zeros(lab.shape, dtype=torch.bool), torch.zeros(lab.shape, dtype=torch.bool)
    body[rs, cs], lamina[lamina_speck] = True, True
    plain, every, body_only = grad(0.0), grad(0.5), grad(0.5, ("vertebral_body",))
    assert not torch.allclose(every[:, lamina], plain[:, lamina])  # all structures: the lamina piece is counted
    assert torch.allclose(body_only[:, lamina], plain[:, lamina])  # body only: it is not
    assert not torch.allclose(body_only[:, body], plain[:, body])  # ... while the body speck is


def test_the_change_term_with_an_area_limit_counts_a_speck_and_not_a_removed_piece(truth):
    """train.pseudo_change_max_area_mm2: a removed 3 x 3 body speck (5.5 mm²) is under a 20 mm² limit and gets the
    term; a removed 7 x 7 lamina piece (30 mm²) is over it and keeps the plain term's gradient; without the limit
    both get it."""
    lab = truth.copy()
    rs, cs = _speck(lab)
    lab[rs, cs] = 1
    piece = (slice(rs.start - 2, rs.stop + 2), slice(cs.start + 10, cs.stop + 14))
    assert (lab[piece] == 0).all() and lab[piece].size == 49
    lab[piece] = 3  # a third, isolated lamina piece: removed by post-processing
    spacing = torch.tensor([[SPACING, SPACING]])

    def grad(change_weight, max_area=None):
        logits = torch.log(_probs(lab[None])).float().requires_grad_(True)
        loss, _ = SelfTraining(1.0, 0.9, change_weight=change_weight, change_max_area_mm2=max_area).loss(logits,
                                                                                                          spacing)
        loss.backward()
        return logits.grad[0]

    body, lamina = torch.zeros(lab.shape, dtype=torch.bool), torch.zeros(lab.shape, dtype=torch.bool)
    body[rs, cs], lamina[piece] = True, True
    plain, any_size, limited = grad(0.0), grad(0.5), grad(0.5, 20.0)
    assert not torch.allclose(any_size[:, lamina], plain[:, lamina])
    assert torch.allclose(limited[:, lamina], plain[:, lamina])  # the piece is over the limit
    assert not torch.allclose(limited[:, body], plain[:, body])  # the speck is under it
    assert not torch.allclose(limited[:, body], any_size[:, body])  # ... and the term's mean is over the speck alone
    # the limit is in mm²: at twice the pixel size the speck's 9 pixels are 22 mm², over it
    coarse = torch.tensor([[2 * SPACING, 2 * SPACING]])
    assert not in_small_regions(torch.from_numpy(lab[None]), coarse, 20.0)[0][body].any()
    assert in_small_regions(torch.from_numpy(lab[None]), spacing, 20.0)[0][body].all()


def test_with_require_body_a_slice_without_a_body_teaches_nothing_unless_listed_as_disc_level(truth):
    """train.pseudo_require_body: a slice whose map has canal and laminae but no body passes the order rule (disc
    level), so by default it is a target, one that would teach a dropped vertebral body to stay dropped. With the
    option it gives none, unless --unlabeled-no-body lists it; a slice with a body is a target either way."""
    no_body = truth.copy()
    no_body[no_body == 1] = 0
    probs = torch.cat([_probs(no_body[None]), _probs(no_body[None]), _probs(truth[None])])
    spacing = torch.tensor([[SPACING, SPACING]] * 3)
    listed = torch.tensor([False, True, False])
    targets, accepted = pseudo_labels(probs, spacing, 0.9, no_body=listed)
    assert accepted == 3
    targets, accepted = pseudo_labels(probs, spacing, 0.9, no_body=listed, require_body=True)
    assert accepted == 2 and (targets[0] == IGNORE).all()
    assert np.array_equal(targets[1].numpy(), no_body) and np.array_equal(targets[2].numpy(), truth)
    st = SelfTraining(1.0, 0.9, require_body=True)
    assert st.loss(torch.log(probs[:1]).float(), spacing[:1])[1] == 0.0


def test_the_random_convolution_reaches_labelled_slices_and_not_unlabelled_ones(small_phantom, tmp_path):
    """augment.random_conv randomises the phantom's appearance; an unlabelled real slice keeps its own (self-training
    and the domain critic learn from it)."""
    from spineseg.data.dataset import make_loader
    from spineseg.train.loop import Trainer

    tiny = _tiny_overrides()
    kw = dict(overrides=tiny, progress=False, cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    runs = {}
    for p in (0.0, 1.0):
        t = Trainer(small_phantom, "unet", tmp_path / f"rc{p}", **kw,
                    sets={"train": {"epochs": 1, "pseudo_weight": 1.0}, "augment": {"random_conv": p}})
        labelled = next(iter(make_loader(t.data.train, 4, False, t.augment, seed=3)))["image"]
        unlabelled = next(t._unlabeled_batches(3, None))["image"]
        runs[p] = labelled, unlabelled
    assert not torch.allclose(runs[0.0][0], runs[1.0][0], atol=1e-3)
    assert torch.equal(runs[0.0][1], runs[1.0][1])


def _slice_label_gradient(loss_fn, labels: np.ndarray, hint: torch.Tensor, spacing: torch.Tensor, area: float):
    """Logits of two copies of ``labels`` with ``hint`` added to the body logit, the slice-label term with the first
    slice flagged and the second not, and its gradient on the logits."""
    logits = torch.log(_probs(np.stack([labels, labels]))).float()
    logits[:, 1] += hint
    logits.requires_grad_(True)
    loss = loss_fn(logits, spacing, torch.tensor([True, False]), area)
    loss.backward()
    return logits, loss, logits.grad


def test_the_body_label_pushes_the_most_body_like_pixels_of_a_flagged_slice_and_nothing_else(truth):
    """train.body_label_weight: on a slice known to hold a body, the term is near 0 where the network draws a body
    of the given area, and where it dropped the body only the ``area`` worth of most body-like pixels get a
    gradient, towards body; an unflagged slice gets none."""
    from spineseg.train.selftrain import body_presence_loss

    spacing = torch.tensor([[SPACING, SPACING]] * 2)
    area = 200.0
    k = round(area / SPACING ** 2)
    with_body = torch.log(_probs(truth[None])).float()
    assert float(body_presence_loss(with_body, spacing[:1], torch.tensor([True]), area)) < 0.06  # -log 0.95

    dropped = truth.copy()
    dropped[dropped == 1] = 0  # the network left the body out
    hint = torch.zeros(truth.shape, dtype=torch.float32)
    hint[truth == 1] = 0.5  # the body's own pixels are a little more body-like than the background
    logits, loss, g = _slice_label_gradient(body_presence_loss, dropped, hint, spacing, area)
    assert float(loss.detach()) > 2.0
    assert torch.all(g[1] == 0)  # the unflagged slice
    pushed = g[0, 1] < 0  # descent raises the body logit there
    assert int(pushed.sum()) == k and bool((truth[pushed.numpy()] == 1).all())  # inside the dropped body only
    assert int((g[0].abs().sum(0) > 0).sum()) == k  # and nowhere else
    none = body_presence_loss(logits, spacing, torch.tensor([False, False]), area)
    assert float(none.detach()) == 0.0


def test_a_run_takes_a_body_list_only_with_its_weight_and_never_a_slice_listed_both_ways(small_phantom, tmp_path,
                                                                                        monkeypatch):
    """--unlabeled-body: the listed slices arrive flagged at the step, the weight reaches the term, and a list
    without its weight (or the reverse), or a slice in both lists, is refused before any training."""
    from spineseg.errors import SpinesegError
    from spineseg.train import steps
    from spineseg.train.loop import Trainer

    images = sorted((small_phantom / "imagesTr").iterdir())
    body_csv, no_body_csv = tmp_path / "body.csv", tmp_path / "no_body.csv"
    body_csv.write_text(f"image,slice\n{images[1].name},0\n{images[2].name},0\n")
    no_body_csv.write_text(f"image,slice\n{images[0].name},0\n")
    seen = []
    original = steps.body_presence_loss

    def spy(logits, spacing, has_body, area):
        seen.append((has_body.clone(), area))
        return original(logits, spacing, has_body, area)

    monkeypatch.setattr(steps, "body_presence_loss", spy)
    tiny = _tiny_overrides()
    kw = dict(overrides=tiny, progress=False, cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    on = {"train": {"epochs": 1, "pseudo_weight": 1.0, "domain_batch_size": 16, "body_label_weight": 0.5,
                    "body_label_area_mm2": 150.0}}
    t = Trainer(small_phantom, "unet", tmp_path / "b", sets=on, unlabeled_body=body_csv,
                unlabeled_no_body=no_body_csv, **kw)
    assert t.step.self_training.body_weight == 0.5
    assert {(r.case_id, r.index) for r in t.unlabeled if r.has_body} == {(images[1].name.split(".")[0], 0),
                                                                         (images[2].name.split(".")[0], 0)}
    t.fit()
    assert seen and all(int(f.sum()) == 2 and a == 150.0 for f, a in seen)
    import csv
    with open(tmp_path / "b" / "log.csv", newline="") as fh:
        assert all(float(r["loss_body"]) >= 0 for r in csv.DictReader(fh))  # the term is in the run's log
    other = tmp_path / "other_body.csv"
    other.write_text(f"image,slice\n{images[3].name},0\n")
    with pytest.raises(SpinesegError, match="differs in content"):  # a resumed run refuses another list
        Trainer(None, None, tmp_path / "b", resume=True, sets={"train": {"epochs": 2}}, progress=False,
                cache=tmp_path / "cache", unlabeled_body=other)
    with pytest.raises(SpinesegError, match="go together"):
        Trainer(small_phantom, "unet", tmp_path / "w", sets={"train": {"epochs": 1, "pseudo_weight": 1.0}},
                unlabeled_body=body_csv, **kw)
    with pytest.raises(SpinesegError, match="go together"):
        Trainer(small_phantom, "unet", tmp_path / "l", sets=on, **kw)
    no_body_csv.write_text(f"image,slice\n{images[2].name},0\n")
    with pytest.raises(SpinesegError, match="both as holding a body and as holding none"):
        Trainer(small_phantom, "unet", tmp_path / "x", sets=on, unlabeled_body=body_csv,
                unlabeled_no_body=no_body_csv, **kw)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_the_no_body_label_pushes_down_the_most_body_like_pixels_of_a_flagged_slice_only(truth):
    """train.no_body_label_weight: on a slice known to hold no body, a drawn body is pushed down where it is most
    body-like (the area's worth of pixels), nowhere else; near 0 where no body is drawn; unflagged slices untouched."""
    from spineseg.train.selftrain import body_absence_loss

    spacing = torch.tensor([[SPACING, SPACING]] * 2)
    area = 200.0
    k = round(area / SPACING ** 2)
    disc = truth.copy()
    disc[disc == 1] = 0
    assert float(body_absence_loss(torch.log(_probs(disc[None])).float(), spacing[:1], torch.tensor([True]),
                                   area)) < 0.06
    hint = torch.zeros(truth.shape, dtype=torch.float32)
    hint[truth == 1] = torch.linspace(0, 0.5, int((truth == 1).sum()))  # some body pixels more body-like than others
    _, loss, g = _slice_label_gradient(body_absence_loss, truth, hint, spacing, area)
    assert float(loss.detach()) > 2.0
    assert torch.all(g[1] == 0)
    pushed_down = g[0, 1] > 0  # descent lowers the body logit there
    assert int(pushed_down.sum()) == k and int((g[0].abs().sum(0) > 0).sum()) == k
    assert float(hint[pushed_down].min()) >= float(hint[(truth == 1) & ~pushed_down.numpy()].max())  # the most body-like


def test_a_run_passes_the_no_body_weight_and_refuses_it_without_the_list(small_phantom, tmp_path, monkeypatch):
    from spineseg.errors import SpinesegError
    from spineseg.train import steps
    from spineseg.train.loop import Trainer

    images = sorted((small_phantom / "imagesTr").iterdir())
    no_body_csv = tmp_path / "no_body.csv"
    no_body_csv.write_text(f"image,slice\n{images[0].name},0\n")
    seen = []
    original = steps.body_absence_loss

    def spy(logits, spacing, no_body, area):
        seen.append(int(no_body.sum()))
        return original(logits, spacing, no_body, area)

    monkeypatch.setattr(steps, "body_absence_loss", spy)
    tiny = _tiny_overrides()
    kw = dict(overrides=tiny, progress=False, cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    on = {"train": {"epochs": 1, "pseudo_weight": 1.0, "domain_batch_size": 16, "no_body_label_weight": 0.5}}
    t = Trainer(small_phantom, "unet", tmp_path / "nb", sets=on, unlabeled_no_body=no_body_csv, **kw)
    assert t.step.self_training.no_body_weight == 0.5
    t.fit()
    assert seen and all(n == 1 for n in seen)
    with pytest.raises(SpinesegError, match="no_body_label_weight weighs a term on the --unlabeled-no-body slices"):
        Trainer(small_phantom, "unet", tmp_path / "x", sets=on, **kw)


class _FixedLogits(torch.nn.Module):
    """A "network" whose output is a learnable tensor of logits, whatever its input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, image):
        return self.logits


def test_the_labelled_no_body_term_pushes_down_a_false_body_on_a_labelled_slice_without_one(truth):
    """train.labelled_no_body_weight: in the supervised step, a labelled slice whose reference holds no body (a
    disc-level slice) on which the network draws one gets the weighted no-body term: a gradient lowering the body
    logit on the area's worth of most body-like pixels, nowhere else; a slice whose reference has a body gets none."""
    from spineseg.train.steps import GeneratorStep

    disc = truth.copy()
    disc[disc == 1] = 0
    labels = torch.from_numpy(np.stack([disc, truth]))
    drawn = torch.log(_probs(np.stack([truth, truth]))).float()  # the network draws a body on both slices
    spacing = torch.tensor([[SPACING, SPACING]] * 2)
    area, weight = 200.0, 0.5
    k = round(area / SPACING ** 2)

    def grad(w: float) -> tuple[torch.Tensor, dict]:
        model = _FixedLogits(drawn)
        step = GeneratorStep(model, torch.optim.SGD(model.parameters(), lr=0.0),
                             lambda logits, lab: F.cross_entropy(logits, lab), torch.amp.GradScaler("cuda", enabled=False),
                             torch.device("cpu"), None, labelled_no_body_weight=w, body_area_mm2=area)
        logs = step(torch.zeros(2, 1, *truth.shape), labels, False, spacing=spacing)
        return model.logits.grad.clone(), logs

    (g0, logs0), (g1, logs1) = grad(0.0), grad(weight)
    assert "loss_no_body_labelled" not in logs0 and logs1["loss_no_body_labelled"] > 2.0
    extra = g1 - g0
    assert torch.all(extra[1] == 0)  # the slice with a body in its reference
    pushed_down = extra[0, 1] > 0  # descent lowers the body logit there
    assert int(pushed_down.sum()) == k and int((extra[0].abs().sum(0) > 1e-12).sum()) == k
    assert bool((truth[pushed_down.numpy()] == 1).all())  # on the false body
    assert logs1["loss_g"] == pytest.approx(logs0["loss_g"] + weight * logs1["loss_no_body_labelled"], rel=1e-6)


def test_a_run_passes_the_labelled_no_body_weight_and_the_slices_spacing(small_phantom, tmp_path, monkeypatch):
    """The weight and the area reach the step, and every training step gets its batch's pixel spacing."""
    from spineseg.train import steps
    from spineseg.train.loop import Trainer

    seen = []
    original = steps.body_absence_loss

    def spy(logits, spacing, no_body, area):
        seen.append((tuple(spacing.shape), area))
        return original(logits, spacing, no_body, area)

    monkeypatch.setattr(steps, "body_absence_loss", spy)
    tiny = _tiny_overrides()
    on = {"train": {"epochs": 1, "labelled_no_body_weight": 0.5, "body_label_area_mm2": 150.0}}
    t = Trainer(small_phantom, "unet", tmp_path / "lnb", sets=on, overrides=tiny, progress=False,
                cache=tmp_path / "cache")
    assert t.step.labelled_no_body_weight == 0.5 and t.step.body_area_mm2 == 150.0
    t.fit()
    assert seen and all(shape[1] == 2 and a == 150.0 for shape, a in seen)
    import csv
    with open(tmp_path / "lnb" / "log.csv", newline="") as fh:
        assert all(float(r["loss_no_body_labelled"]) >= 0 for r in csv.DictReader(fh))


def test_a_slice_list_saved_by_a_spreadsheet_is_read_or_refused_in_one_line(small_phantom, tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark (read as meant); its "Unicode text" is UTF-16 (refused,
    naming the file, not a UnicodeDecodeError); a short row names the list; PNG slices without a spacing name
    the flag that gives it."""
    from spineseg.errors import SpinesegError
    from spineseg.io.images import save_png
    from spineseg.train.data import check_unlabeled_spacing, read_slice_list, unlabeled_cases

    cases = unlabeled_cases([small_phantom / "imagesTr"])
    name = cases[0].image.name
    lst = tmp_path / "list.csv"
    lst.write_text(f"image,slice\n{name},0\n", encoding="utf-8-sig")
    assert read_slice_list(lst, cases) == {(cases[0].case_id, 0)}
    lst.write_text(f"image,slice\n{name},0\n", encoding="utf-16")
    with pytest.raises(SpinesegError, match=r"not UTF-8 text.*\(--unlabeled-body\)") as err:
        read_slice_list(lst, cases, "--unlabeled-body")
    assert err.value.path == str(lst)
    lst.write_text(f"image,slice\n{name}\n")
    with pytest.raises(SpinesegError, match=r"line 2: no slice given.*\(--unlabeled-no-body\)") as err:
        read_slice_list(lst, cases)
    assert err.value.path == str(lst)
    png = tmp_path / "png"
    png.mkdir()
    save_png(png / "a.png", np.full((32, 32), 9, np.uint8))
    with pytest.raises(SpinesegError, match="--unlabeled-spacing") as err:
        check_unlabeled_spacing(unlabeled_cases([png]), None)
    assert err.value.path == str(png / "a.png")
    check_unlabeled_spacing(unlabeled_cases([png]), 0.8)


@pytest.mark.parametrize("layout", ["files", "dicom folders"])
def test_two_unlabelled_inputs_of_one_name_are_refused_naming_both(small_phantom, tmp_path, layout):
    """siteA/scan.nii.gz and siteB/scan.nii.gz (or two series folders T2_AX) would be one case id, so a slice
    list naming scan.nii.gz,0 would mark both."""
    import shutil

    from spineseg.errors import SpinesegError
    from spineseg.train.data import unlabeled_cases

    src = sorted((small_phantom / "imagesTr").iterdir())[:2]
    paths = []
    for site, f in zip(("siteA", "siteB"), src):
        if layout == "files":
            (tmp_path / site).mkdir()
            paths.append(shutil.copy(f, tmp_path / site / "scan.nii.gz"))
        else:
            (tmp_path / site / "T2_AX").mkdir(parents=True)
            (tmp_path / site / "T2_AX" / "IM0001.dcm").write_bytes(b"stand-in")
            paths.append(tmp_path / site / "T2_AX")
    with pytest.raises(SpinesegError, match="two unlabelled images have the name") as err:
        unlabeled_cases([tmp_path / "siteA", tmp_path / "siteB"] if layout == "files" else paths)
    assert "siteA" in str(err.value) and "siteB" in str(err.value)
    assert len(unlabeled_cases([tmp_path / "siteA"] if layout == "files" else paths[:1])) == 1
