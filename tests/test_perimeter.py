"""The perimeter (total-variation) term on unlabelled slices: what it measures, that it trains, that runs use it."""

import csv

import pytest
import torch

from spineseg import NUM_CLASSES
from spineseg.anatomy.postprocess import BODY, CANAL, LAMINA
from spineseg.errors import SpinesegError
from spineseg.train.losses import SegLoss, perimeter_loss
from spineseg.train.loop import Trainer
from spineseg.train.steps import GeneratorStep

TINY = {"preprocess": {"target_size": 64}, "model": {"base": 4, "clusters": 8},
        "train": {"batch_size": 4, "lr": 1e-3, "max_minutes": None}}


def _maps(*squares, size=40, channel=BODY):
    """Sharp softmax maps, (1, C, size, size): the squares ``(row, col, side)`` in ``channel``, background elsewhere."""
    probs = torch.zeros(1, NUM_CLASSES, size, size)
    probs[:, 0] = 1
    for r, c, s in squares:
        probs[0, :, r:r + s, c:c + s] = 0
        probs[0, channel, r:r + s, c:c + s] = 1
    return probs


def test_it_is_the_outline_per_pixel_so_the_same_area_in_pieces_costs_more():
    one = _maps((10, 10, 8))  # 64 px, outline 32 px
    four = _maps((4, 4, 4), (4, 24, 4), (24, 4, 4), (24, 24, 4))  # 64 px, outline 64 px
    grid = 39 * 39 * 2  # the forward-difference grid of each of the two channels
    assert float(perimeter_loss(one, (BODY, CANAL))) * grid == pytest.approx(32, rel=0.05)
    assert float(perimeter_loss(four, (BODY, CANAL))) == pytest.approx(2 * float(perimeter_loss(one, (BODY, CANAL))),
                                                                      rel=0.05)
    # only the named structures count: laminae are thin and may be two regions
    lamina_specks = _maps((4, 4, 4), (24, 24, 4), channel=LAMINA)
    flat = float(perimeter_loss(_maps(), (BODY, CANAL)))  # only the square root's smoothing, 1e-4 a pixel
    assert flat < 2e-4 and float(perimeter_loss(lamina_specks, (BODY, CANAL))) == pytest.approx(flat, abs=1e-7)


def _step(weight):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, NUM_CLASSES, 3, padding=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    step = GeneratorStep(model, opt, SegLoss(0.0, 0.0), torch.amp.GradScaler("cuda", enabled=False),
                         torch.device("cpu"), False, perimeter_weight=weight)
    return model, step


def test_the_term_trains_the_unlabelled_output_towards_fewer_outlines_and_only_when_weighted():
    torch.manual_seed(1)
    image, labels = torch.randn(2, 1, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    unlabeled = torch.randn(2, 1, 32, 32)  # noise: a speckled prediction
    spacing = torch.ones(2, 2)

    def outline(model):
        with torch.no_grad():
            return float(perimeter_loss(torch.softmax(model(unlabeled), 1), (BODY, CANAL)))

    model, step = _step(1.0)
    before = outline(model)
    for _ in range(40):
        logs = step(image, labels, False, unlabeled, spacing)
    assert logs["loss_perimeter"] > 0
    assert outline(model) < 0.5 * before
    # weight 0: the term is neither computed nor learnt (the supervised loss here is 0 as well)
    model, step = _step(0.0)
    start = [p.detach().clone() for p in model.parameters()]
    logs = step(image, labels, False, unlabeled, spacing)
    assert "loss_perimeter" not in logs
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_a_run_with_only_the_perimeter_term_uses_it_and_one_without_unlabelled_slices_is_refused(small_phantom,
                                                                                                 tmp_path):
    sets = {"train": {"epochs": 1, "domain_weight": 0.0, "perimeter_weight": 5.0}}
    t = Trainer(small_phantom, "unet", tmp_path / "tv", overrides=TINY, sets=sets, progress=False,
                cache=tmp_path / "cache", unlabeled=[small_phantom / "imagesTr"])
    assert t.step.perimeter_weight == 5.0 and t.step.domain is None and t.step.self_training is None
    t.fit()
    with open(tmp_path / "tv" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(float(r["loss_perimeter"]) > 0 and not r["loss_domain"] for r in rows)
    with pytest.raises(SpinesegError, match="perimeter_weight is set but it acts on unlabelled slices"):
        Trainer(small_phantom, "unet", tmp_path / "none", overrides=TINY, sets=sets, progress=False,
                cache=tmp_path / "cache")
