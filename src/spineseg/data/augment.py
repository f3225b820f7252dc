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
    intensity: float = 0.1  # random linear contrast / offset jitter on the z-scored image
    # domain randomisation at training time (0 = off)
    gamma: float = 0.0  # gamma drawn log-uniformly in [exp(-g), exp(g)] on the min-max normalised image
    bias: float = 0.0  # amplitude of a smooth multiplicative bias field
    noise: float = 0.0  # max std of added Gaussian noise (z-score units)
    blur: float = 0.0  # probability of a Gaussian blur with sigma in [0.5, 1.5] px

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
    img = random_intensity(img, cfg, gen)
    m = None
    if mask is not None:
        m = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[0, 0].long()
    return img, m


def random_intensity(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Gamma, smooth bias field, blur and noise on a (C, H, W) image, then z-score again."""
    if not (cfg.gamma or cfg.bias or cfg.noise or cfg.blur):
        return img

    def u(a, b):
        return a + (b - a) * float(torch.rand((), generator=gen))

    lo, hi = img.min(), img.max()
    x = (img - lo) / (hi - lo).clamp_min(1e-6)
    if cfg.gamma:
        x = x.clamp_min(0) ** math.exp(u(-cfg.gamma, cfg.gamma))
    if cfg.bias:
        coarse = torch.randn((1, 1, 4, 4), generator=gen)
        field = F.interpolate(coarse, size=img.shape[-2:], mode="bicubic", align_corners=False)[0]
        x = x * torch.exp(cfg.bias * field / field.abs().max().clamp_min(1e-6))
    if cfg.blur and float(torch.rand((), generator=gen)) < cfg.blur:
        sigma = u(0.5, 1.5)
        r = int(math.ceil(2.5 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        x = F.conv2d(x[None], k.view(1, 1, 1, -1).expand(x.shape[0], 1, 1, -1), padding=(0, r), groups=x.shape[0])
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(x.shape[1], 1, -1, 1), padding=(r, 0), groups=x.shape[1])[0]
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    if cfg.noise:
        x = x + u(0, cfg.noise) * torch.randn(x.shape, generator=gen)
    return x
