"""Joint image / mask augmentation (rotation, scale, crop-like shift, optional left-right flip)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.08  # fraction of the image size (a random crop, resampled to the same size)
    flip_lr: bool = False  # anatomically safe only left-right; off by default
    intensity: float = 0.1  # random gamma / contrast jitter on the z-scored image

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def random_affine(image: torch.Tensor, mask: torch.Tensor | None, cfg: AugmentConfig, gen: torch.Generator):
    """``image`` (C, H, W) float, ``mask`` (H, W) long. Same transform for both; mask uses nearest."""
    def u(a, b):
        return a + (b - a) * float(torch.rand((), generator=gen))

    ang = math.radians(u(-cfg.rotate_deg, cfg.rotate_deg))
    s = u(*cfg.scale)
    tx, ty = u(-cfg.shift, cfg.shift) * 2, u(-cfg.shift, cfg.shift) * 2
    flip = -1.0 if (cfg.flip_lr and float(torch.rand((), generator=gen)) < 0.5) else 1.0
    c, si = math.cos(ang) / s, math.sin(ang) / s
    theta = torch.tensor([[c * flip, -si, tx], [si * flip, c, ty]], dtype=image.dtype)[None]
    grid = F.affine_grid(theta, (1,) + tuple(image.shape), align_corners=False)
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if cfg.intensity:
        a = 1.0 + u(-cfg.intensity, cfg.intensity)
        b = u(-cfg.intensity, cfg.intensity)
        img = img * a + b
    m = None
    if mask is not None:
        m = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[0, 0].long()
    return img, m
