"""Segmentation losses (CE + soft Dice via MONAI) and the critic's WGAN-GP / clip / BCE objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


class SegLoss(torch.nn.Module):
    """beta * CE (all classes) + gamma * soft Dice (foreground classes, smoothed).

    ``batch_dice``: the Dice of each class over the whole batch (nnU-Net's batch Dice) instead of per image
    and then averaged. Per image, a class a slice does not hold (no vertebral body at disc level) scores
    about 1 whatever the network draws there, so the Dice term never learns to leave it empty; over the batch,
    a body drawn on such a slice counts against the batch's Dice."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, batch_dice: bool = False):
        super().__init__()
        self.ce_w, self.dice_w = ce_weight, dice_weight
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5,
                             batch=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target)
        dice = self.dice(logits.float(), target[:, None])
        return self.ce_w * ce + self.dice_w * dice


def seg_loss_from_config(tc: dict) -> SegLoss:
    """The supervised loss of the ``train`` section of a config (``beta`` x CE + ``gamma`` x soft Dice)."""
    return SegLoss(tc["beta"], tc["gamma"], tc["dice_batch"])


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


def gradient_penalty(critic, image, real, fake) -> torch.Tensor:
    """Gulrajani et al. 2017: E[(||grad D(x_hat)||_2 - 1)^2] on random interpolates of the label maps."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    score = critic(image, x_hat)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_loss(mode: str, critic, image, real, fake, gp_lambda: float = 10.0) -> torch.Tensor:
    d_real, d_fake = critic(image, real), critic(image, fake)
    if mode == "bce":  # the paper's Eq. (5): sigmoid cross-entropy
        return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    loss = d_fake.mean() - d_real.mean()
    if mode == "wgan-gp":
        loss = loss + gp_lambda * gradient_penalty(critic, image, real, fake)
    return loss


def generator_adv_loss(mode: str, critic, image, fake) -> torch.Tensor:
    d = critic(image, fake)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(d, torch.ones_like(d))
    return -d.mean()  # L_WG = -E[D(G(I))]
