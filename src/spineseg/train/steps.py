"""One optimisation step per batch: the generator's supervised loss, plus an adversarial strategy when on.

The adversarial part is a strategy object (`Adversary`), not a subclass: it updates the critic and
adds the generator's adversarial term. Mixed precision (fp16 on CUDA with `train.amp`, bf16 on a CPU
with native bfloat16 with `train.cpu_bf16`) covers the generator's forward passes; the critic and every
loss run in float32.
"""

from __future__ import annotations

import contextlib

import torch

from .. import NUM_CLASSES
from ..anatomy.postprocess import BODY
from .losses import SegLoss, critic_loss, generator_adv_loss, one_hot
from .selftrain import SelfTraining, body_absence_loss, body_presence_loss


def generator_optimizer(model: torch.nn.Module, tc: dict) -> torch.optim.Optimizer:
    """Adam for the generator, from the ``train`` section of a config."""
    return torch.optim.Adam(model.parameters(), lr=tc["lr"], betas=tuple(tc["betas"]), weight_decay=tc["weight_decay"])


def critic_optimizer(critic: torch.nn.Module, tc: dict) -> torch.optim.Optimizer:
    """Adam for a critic (the WGAN one or the domain one), from the ``train`` section of a config."""
    return torch.optim.Adam(critic.parameters(), lr=tc["lr_critic"], betas=tuple(tc["betas"]))


class Adversary:
    """The critic, its optimiser and objective (`wgan-gp`, `wgan-clip`, `bce`)."""

    def __init__(self, critic: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str, n_critic: int = 1,
                 gp_lambda: float = 10.0, clip: float = 0.01, alpha: float = 0.01):
        self.critic, self.optimizer, self.mode = critic, optimizer, mode
        # weight clipping trains the plain Wasserstein objective; the clipping itself follows each update
        self.objective = "wgan" if mode == "wgan-clip" else mode
        self.n_critic, self.gp_lambda, self.clip, self.alpha = n_critic, gp_lambda, clip, alpha

    def update_critic(self, image, real_labels, fake_probs) -> float:
        for _ in range(self.n_critic):
            loss = critic_loss(self.objective, self.critic, image, real_labels, fake_probs, self.gp_lambda)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.mode == "wgan-clip":
                with torch.no_grad():
                    for p in self.critic.parameters():
                        p.clamp_(-self.clip, self.clip)
        return float(loss.detach())

    def generator_loss(self, image, fake_probs) -> torch.Tensor:
        """The generator's adversarial loss (L_WG = -E[D(G(I))] or BCE), with the critic's parameters frozen."""
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:  # past a DDP wrapper, which would wait for the critic gradients this pass never makes
            return generator_adv_loss(self.objective, getattr(self.critic, "module", self.critic), image, fake_probs)
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)


class DomainAdversary:
    """Output-space domain adaptation (after Tsai et al. 2018, "AdaptSegNet"; the semi-supervised use of a
    segmentation critic after Hung et al. 2018).

    A critic that sees label maps only (no image) learns to tell the generator's softmax on phantom
    slices ("source") from its softmax on unlabelled real slices ("target"); the generator is pushed to
    make its real-slice maps indistinguishable, i.e. anatomically shaped like its phantom-slice maps.
    Both sides are soft maps, so the critic cannot win on softness alone.
    """

    def __init__(self, critic: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: str = "bce",
                 weight: float = 0.01, gp_lambda: float = 10.0):
        self.critic, self.optimizer, self.objective = critic, optimizer, objective
        self.weight, self.gp_lambda = weight, gp_lambda

    def update_critic(self, source_probs: torch.Tensor, target_probs: torch.Tensor) -> float:
        loss = critic_loss(self.objective, self.critic, None, source_probs.detach(), target_probs.detach(),
                           self.gp_lambda)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def generator_loss(self, target_probs: torch.Tensor) -> torch.Tensor:
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:  # past a DDP wrapper, as in Adversary.generator_loss
            return generator_adv_loss(self.objective, getattr(self.critic, "module", self.critic), None, target_probs)
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)


def adversary_from_config(critic: torch.nn.Module, optimizer: torch.optim.Optimizer, tc: dict) -> Adversary:
    """The adversarial strategy of ``train.adversarial`` (``critic`` may be a DDP wrapper of the optimised one)."""
    return Adversary(critic, optimizer, tc["adversarial"], tc["n_critic"], tc["gp_lambda"], tc["clip"], tc["alpha"])


class GeneratorStep:
    """Supervised CE + Dice on the labelled batch (plus ``labelled_no_body_weight`` x :func:`body_absence_loss` on
    its slices whose reference holds no body, over ``body_area_mm2``); with an adversary, critic update(s) first."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, seg_loss: SegLoss,
                 scaler: torch.amp.GradScaler, device: torch.device, amp_dtype: torch.dtype | None,
                 adversary: Adversary | None = None,
                 domain: DomainAdversary | None = None, self_training: SelfTraining | None = None,
                 labelled_no_body_weight: float = 0.0, body_area_mm2: float = 300.0):
        self.model, self.optimizer, self.seg_loss, self.scaler = model, optimizer, seg_loss, scaler
        self.device, self.amp_dtype, self.adversary, self.domain = device, amp_dtype, adversary, domain
        self.self_training = self_training
        self.labelled_no_body_weight, self.body_area_mm2 = labelled_no_body_weight, body_area_mm2

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, adversarial: bool,
                 unlabeled: torch.Tensor | None = None, unlabeled_spacing: torch.Tensor | None = None,
                 unlabeled_no_body: torch.Tensor | None = None, unlabeled_weak: torch.Tensor | None = None,
                 critics_only: bool = False, unlabeled_has_body: torch.Tensor | None = None,
                 spacing: torch.Tensor | None = None) -> dict:
        """One update. ``unlabeled``: a batch of real slices (pixel spacing ``unlabeled_spacing``, (B, 2) mm) for
        domain adaptation and / or self-training (None: neither term); ``unlabeled_no_body`` (B,): those known to
        hold no vertebral body; ``unlabeled_weak``: the same slices without intensity augmentation, that
        self-training reads its targets from (None: from ``unlabeled`` itself); ``unlabeled_has_body`` (B,): those
        known to hold a body (the self-training's body term). ``spacing`` (B, 2) mm: the labelled slices' pixel spacing
        (needed by the labelled no-body term). ``critics_only``: update the
        critics on the generator's present output and leave the generator as it is (``train.critic_warmup_steps``)."""
        logs = {}
        if adversarial:
            with torch.no_grad(), self._autocast():
                fake = torch.softmax(self.model(image).float(), 1)
            logs["loss_d"] = self.adversary.update_critic(image, one_hot(labels, NUM_CLASSES), fake)
        if critics_only:
            if unlabeled is not None and self.domain is not None:
                with torch.no_grad(), self._autocast():  # the phantom maps of the WGAN update serve again
                    source = fake if adversarial else torch.softmax(self.model(image).float(), 1)
                    target = torch.softmax(self.model(unlabeled).float(), 1)
                logs["loss_domain_d"] = self.domain.update_critic(source, target)
            return logs
        with self._autocast():
            logits = self.model(image)
        loss = self.seg_loss(logits, labels)
        logs["loss_seg"] = float(loss.detach())
        if self.labelled_no_body_weight:
            if spacing is None:
                raise ValueError("the labelled no-body term needs the labelled slices' pixel spacing")
            without_body = ~(labels == BODY).flatten(1).any(1)
            absent = body_absence_loss(logits, spacing, without_body, self.body_area_mm2)
            logs["loss_no_body_labelled"] = float(absent.detach())
            loss = loss + self.labelled_no_body_weight * absent
        probs = torch.softmax(logits.float(), 1)
        if adversarial:
            adv = self.adversary.generator_loss(image, probs)
            logs["loss_adv"] = float(adv.detach())
            loss = loss + self.adversary.alpha * adv
        if unlabeled is not None and (self.domain is not None or self.self_training is not None):
            with self._autocast():
                target_logits = self.model(unlabeled).float()
            if self.domain is not None:
                target_probs = torch.softmax(target_logits, 1)
                logs["loss_domain_d"] = self.domain.update_critic(probs, target_probs)
                dom = self.domain.generator_loss(target_probs)
                logs["loss_domain"] = float(dom.detach())
                loss = loss + self.domain.weight * dom
            if self.self_training is not None:
                weak_logits = None
                if unlabeled_weak is not None:
                    with torch.no_grad(), self._autocast():  # the plain network: no gradient, no DDP bookkeeping
                        weak_logits = getattr(self.model, "module", self.model)(unlabeled_weak).float()
                pseudo, logs["pseudo_accepted"] = self.self_training.loss(target_logits, unlabeled_spacing,
                                                                          unlabeled_no_body, weak_logits)
                logs["loss_pseudo"] = float(pseudo.detach())
                loss = loss + self.self_training.weight * pseudo
                if self.self_training.body_weight and unlabeled_has_body is not None:
                    body = body_presence_loss(target_logits, unlabeled_spacing, unlabeled_has_body,
                                              self.self_training.body_area_mm2)
                    logs["loss_body"] = float(body.detach())
                    loss = loss + self.self_training.body_weight * body
                if self.self_training.no_body_weight and unlabeled_no_body is not None:
                    absent = body_absence_loss(target_logits, unlabeled_spacing, unlabeled_no_body,
                                               self.self_training.body_area_mm2)
                    logs["loss_no_body"] = float(absent.detach())
                    loss = loss + self.self_training.no_body_weight * absent
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logs["loss_g"] = float(loss.detach())
        return logs
