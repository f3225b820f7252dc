"""Self-training on unlabelled real slices with anatomically accepted pseudo-labels (`train --unlabeled`
with `train.pseudo_weight` > 0).

On every unlabelled batch the generator's own prediction becomes a target where anatomy vouches for it:

- the arg-max map is post-processed (:func:`spineseg.anatomy.postprocess.anatomical_postprocess`: one canal,
  the body next to it, up to two laminae behind it, specks removed, small holes filled);
- the slice is accepted only when the post-processed map passes the anatomical order rule *and* shows both
  laminae (:func:`spineseg.anatomy.order.check_slice`), and the post-processing changed at most
  ``train.pseudo_max_change`` of the raw foreground (a few specks, not half a body: where the network split
  the body in two, as at disc level, which piece is right is exactly what it does not know); other slices
  contribute nothing;
- on an accepted slice, cross-entropy is taken on the pixels the network is confident about
  (max probability >= ``train.pseudo_confidence``) and on every pixel the post-processing changed (a speck,
  a second body piece, a filled hole): those corrections are what the raw prediction must learn.
- with ``train.pseudo_change_weight`` > 0, the changed pixels also get a term of their own, the mean
  cross-entropy over them alone (not on ``--unlabeled-no-body`` slices, whose every body pixel "changes": counted,
  they taught the network to drop whole vertebral bodies, run C in ``results/dixon-disc``); with
  ``train.pseudo_change_structures`` only the corrections of those structures (a pixel whose raw or corrected label
  is one); with ``train.pseudo_change_max_area_mm2`` only the corrections of small raw regions (a speck removed, a
  small hole filled: the pixel's raw region, 8-connected in its raw label, is no larger), not a removed piece of
  lamina or body. In the plain mean they are a few dozen pixels among some 10^5 confident ones.
  On 12 unlabelled batches of the shipped model's training, the median gradient norm of the plain term was 0.012,
  of the domain term (x 0.01) 0.16, and of the mean over the changed pixels alone 213.

This teaches the raw network the clean-up that post-processing does, on the real images' own appearance
(pseudo-labelling after Lee 2013, with a plausibility filter in place of a confidence-only one). It also
reinforces what the model already believes where anatomy cannot tell (a disc labelled as body is a
plausible body), so it is off by default and kept only where it measurably helps.

With ``train.pseudo_weak_view`` the target is read from a *weak* view of the slice (the same random geometry,
no intensity change) and the loss is taken on the *strong* view the network trains on (gamma, bias field, blur,
noise, contrast): consistency regularisation as in FixMatch (Sohn et al. 2020). Without it, target and
prediction come from the one view, so the confident pixels, which are most of every target, agree with the
prediction by construction and teach almost nothing; only the few corrected pixels do. With it, every confident
pixel asks the network to give the same answer when a real slice's contrast, noise and bias change, which is
what differs between one real scanner's images and another's.

With ``train.pseudo_require_body`` a slice without a body in its accepted map gives no target unless it is known to
lie at disc level: otherwise a vertebral slice whose body the network dropped passes the order rule as a disc-level
slice, and its target teaches the network to drop that body again (runs C, C3 and C4 lost bodies on whole images).

Slices known to lie at disc level (``train --unlabeled-no-body``: a slice list, e.g. from the fat fraction
of a Dixon pair, where the disc has none and vertebral marrow a quarter or more) get that knowledge as a
weak label: their target has no vertebral body, and every pixel the network calls body is a background
target whatever its confidence. The change limit applies to the rest of the post-processing only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .. import STRUCTURES
from ..anatomy.order import check_slice, display_plane
from ..anatomy.postprocess import BODY, EIGHT, anatomical_postprocess

IGNORE = -100


def pseudo_labels(probs: torch.Tensor, spacing: torch.Tensor, confidence: float,
                  max_change: float = 1.0, no_body: torch.Tensor | None = None,
                  require_body: bool = False) -> tuple[torch.Tensor, int]:
    """Targets ``(B, H, W)`` (``IGNORE`` where there is none) from softmax ``probs`` ``(B, C, H, W)`` of slices with
    pixel ``spacing`` ``(B, 2)`` mm, and the number of accepted slices. ``no_body`` ``(B,)``: slices known to hold
    no vertebral body (disc level). ``require_body``: a slice not known to be at disc level whose accepted map has no
    body gives no target (the order rule accepts it as disc level, but it may be a vertebra whose body the network
    dropped, and its own target would teach it to drop it again)."""
    conf, raw = probs.detach().float().max(1)
    conf, raw = conf.cpu().numpy(), raw.cpu().numpy().astype(np.uint8)
    flagged = np.zeros(raw.shape[0], bool) if no_body is None else np.asarray(no_body, bool).reshape(-1)
    targets = np.full(raw.shape, IGNORE, np.int64)
    accepted = 0
    for b in range(raw.shape[0]):
        sp = tuple(float(x) for x in spacing[b])
        post = anatomical_postprocess(raw[b], sp)
        if post_changed_too_much(post, raw[b], max_change):
            continue
        if flagged[b]:
            post[post == BODY] = 0
        elif require_body and not (post == BODY).any():
            continue
        check = check_slice(post, display_plane(sp))
        if not (check["order"] and check["both_laminae"]):
            continue
        changed = post != raw[b]
        keep = (conf[b] >= confidence) | changed
        targets[b][keep] = post[keep]
        accepted += 1
    return torch.from_numpy(targets).to(probs.device), accepted


def post_changed_too_much(post: np.ndarray, raw: np.ndarray, max_change: float) -> bool:
    """Whether post-processing changed more than ``max_change`` of the raw foreground's pixels."""
    return int((post != raw).sum()) > max_change * max(int((raw > 0).sum()), 1)


def in_small_regions(labels: torch.Tensor, spacing: torch.Tensor, max_area_mm2: float) -> torch.Tensor:
    """Which pixels of label maps ``(B, H, W)`` lie in an 8-connected region of their own label of at most
    ``max_area_mm2`` (pixel ``spacing`` ``(B, 2)`` mm): a speck, a small hole, not a structure or its surroundings."""
    lab = labels.cpu().numpy()
    small = np.zeros(lab.shape, bool)
    for b in range(lab.shape[0]):
        limit = max_area_mm2 / (float(spacing[b][0]) * float(spacing[b][1]))
        for value in np.unique(lab[b]):
            regions, _ = ndi.label(lab[b] == value, structure=EIGHT)
            keep = np.bincount(regions.ravel()) <= limit
            keep[0] = False  # not this label
            small[b] |= keep[regions]
    return torch.from_numpy(small).to(labels.device)


def body_presence_loss(logits: torch.Tensor, spacing: torch.Tensor, has_body: torch.Tensor,
                       area_mm2: float) -> torch.Tensor:
    """A slice-level "there is a body here" label as a multiple-instance term: on each flagged slice of ``logits``
    ``(B, C, H, W)`` (pixel ``spacing`` ``(B, 2)`` mm), the mean of -log p(body) over the ``area_mm2`` worth of
    pixels most likely to be body; the mean over the flagged slices (0 when none is flagged). Where the network
    already draws a body of that area the term is near 0; where it dropped the body, it raises the body
    probability where the network finds it most plausible, and nowhere else."""
    return _slice_label_loss(logits, spacing, has_body, area_mm2, present=True)


def body_absence_loss(logits: torch.Tensor, spacing: torch.Tensor, no_body: torch.Tensor,
                      area_mm2: float) -> torch.Tensor:
    """The negative counterpart of :func:`body_presence_loss` on slices known to hold no body: the mean of
    -log(1 - p(body)) over the ``area_mm2`` worth of pixels most likely to be body. Near 0 where the network draws
    no body there; where it draws one (a disc labelled body), it pushes down the most body-like pixels only."""
    return _slice_label_loss(logits, spacing, no_body, area_mm2, present=False)


def _slice_label_loss(logits, spacing, flags, area_mm2: float, present: bool) -> torch.Tensor:
    flagged = torch.as_tensor(flags, dtype=torch.bool, device=logits.device).reshape(-1)
    if not bool(flagged.any()):
        return logits.sum() * 0.0
    log_probs = torch.log_softmax(logits.float(), 1)
    log_body = log_probs[:, BODY].flatten(1)
    # the slice's target: log p(body), or log(1 - p(body)) computed from the other classes' log-probabilities
    # (stable where p(body) is near 1)
    target = log_body if present else \
        torch.logsumexp(torch.cat([log_probs[:, :BODY], log_probs[:, BODY + 1:]], 1), 1).flatten(1)
    terms = []
    for b in torch.nonzero(flagged).flatten().tolist():
        k = max(1, min(log_body.shape[1], round(area_mm2 / (float(spacing[b][0]) * float(spacing[b][1])))))
        top = log_body[b].topk(k).indices  # the most body-like pixels
        terms.append(-target[b, top].mean())
    return torch.stack(terms).mean()


class SelfTraining:
    """The pseudo-label term: ``weight`` x (CE on the accepted pixels + ``change_weight`` x CE on the pixels the
    post-processing changed, by themselves); 0 when a batch has none. ``body_weight`` weighs
    :func:`body_presence_loss` on the slices known to hold a body (``--unlabeled-body``), ``no_body_weight``
    :func:`body_absence_loss` on those known to hold none (``--unlabeled-no-body``): terms of their own."""

    def __init__(self, weight: float, confidence: float, max_change: float = 1.0, change_weight: float = 0.0,
                 change_structures: tuple[str, ...] | list[str] = STRUCTURES, change_max_area_mm2: float | None = None,
                 require_body: bool = False, body_weight: float = 0.0, body_area_mm2: float = 300.0,
                 no_body_weight: float = 0.0):
        self.weight, self.confidence, self.max_change = weight, confidence, max_change
        self.body_weight, self.body_area_mm2, self.no_body_weight = body_weight, body_area_mm2, no_body_weight
        self.require_body = require_body
        self.change_weight, self.change_max_area_mm2 = change_weight, change_max_area_mm2
        # label values whose corrections the change term counts (a pixel counts when its raw or corrected label is one)
        self.change_labels = torch.tensor([STRUCTURES.index(s) + 1 for s in change_structures])

    def loss(self, logits: torch.Tensor, spacing: torch.Tensor,
             no_body: torch.Tensor | None = None, target_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """The unweighted loss on ``logits`` and the fraction of the batch's slices accepted. ``target_logits``:
        the network's output on a weak view of the same slices, pixel-aligned, that the targets are read from
        (None: ``logits`` themselves)."""
        source = logits if target_logits is None else target_logits
        targets, accepted = pseudo_labels(torch.softmax(source.detach().float(), 1), spacing, self.confidence,
                                           self.max_change, no_body, self.require_body)
        if not accepted or not (targets != IGNORE).any():
            return logits.float().sum() * 0.0, accepted / logits.shape[0]
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
        if self.change_weight:
            raw = source.detach().argmax(1)
            labels = self.change_labels.to(raw.device)
            changed = (targets != IGNORE) & (targets != raw) & (torch.isin(raw, labels) | torch.isin(targets, labels))
            if no_body is not None:  # the weak label's removals are not post-processing corrections (run C)
                changed[torch.as_tensor(no_body, dtype=torch.bool, device=changed.device).reshape(-1)] = False
            if self.change_max_area_mm2 is not None and changed.any():
                changed &= in_small_regions(raw, spacing, self.change_max_area_mm2)
            if changed.any():
                only = torch.where(changed, targets, torch.full_like(targets, IGNORE))
                loss = loss + self.change_weight * F.cross_entropy(logits.float(), only, ignore_index=IGNORE)
        return loss, accepted / logits.shape[0]
