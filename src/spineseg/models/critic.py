"""The critic: six 3x3 stride-2 convolutions with instance or layer norm, LeakyReLU, global pooling."""

from __future__ import annotations

import torch
from torch import nn


class _Norm(nn.Module):
    """Instance or layer norm; a 1x1 map (small inputs after six halvings) passes unchanged."""

    def __init__(self, kind: str, ch: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(ch, affine=True) if kind == "instance" else nn.GroupNorm(1, ch)
        self.kind = kind

    def forward(self, x):
        if self.kind == "instance" and x.shape[-1] * x.shape[-2] == 1:
            return x
        return self.norm(x)


class Critic(nn.Module):
    """Scores (image ⊕ label map): one-hot truth for "real", generator softmax for "fake"."""

    def __init__(self, in_channels: int = 1 + 4, base: int = 32, norm: str = "instance", layers: int = 6):
        super().__init__()
        if norm not in ("instance", "layer"):
            raise ValueError("the critic uses instance or layer norm (never batch norm with a gradient penalty)")
        mods = []
        c = in_channels
        for i in range(layers):
            co = min(base * 2 ** i, base * 8)
            mods.append(nn.Conv2d(c, co, 3, stride=2, padding=1))
            if i > 0:
                mods.append(_Norm(norm, co))
            mods.append(nn.LeakyReLU(0.2, inplace=True))
            c = co
        self.features = nn.Sequential(*mods)
        self.score = nn.Linear(c, 1)

    def forward(self, image: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Score of (image ⊕ label map), or of the label map alone when ``image`` is None (a shape critic)."""
        h = self.features(labels if image is None else torch.cat([image, labels], 1))
        return self.score(h.mean((2, 3))).squeeze(1)
