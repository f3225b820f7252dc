"""Joint image / mask augmentation: geometry (rotation, scale, shift, optional left-right flip) and intensity.

Training must see what inference sees. Inference z-scores the image *content* (the part of the network
canvas that holds the image) and leaves the zero padding at exactly 0; so does every augmented
sample here. The content mask travels through the same geometric transform as the image; intensity
randomisation (MONAI's gamma, bias field and noise transforms, and a Gaussian blur) acts on the content
only, which is then z-scored again over the content; the random linear contrast / offset comes after that
z-score, so that it is not cancelled.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    __pydantic_config__ = {"extra": "forbid"}  # validated as the `augment` section of the config schema

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.08  # fraction of the image size (a random crop, resampled to the same size)
    flip_lr: bool = False  # anatomically safe only left-right; off by default
    intensity: float = 0.1  # random linear contrast / offset on the z-scored content (applied last)
    # domain randomisation at training time (0 = off)
    gamma: float = 0.0  # gamma drawn log-uniformly in [exp(-g), exp(g)] on the content's intensity range
    bias: float = 0.0  # strength of a smooth multiplicative bias field (MONAI RandBiasField coefficients up to bias/2)
    noise: float = 0.0  # max std of added Gaussian noise (z-score units)
    blur: float = 0.0  # probability of a Gaussian blur with sigma in [0.5, 1.5] px
    # probability of a random shallow convolution network on the content (global intensity non-linear
    # augmentation, Ouyang et al. 2021): a new random texture and contrast per sample, so that only shape is
    # shared with the source. Labelled slices only: unlabelled real slices keep their own appearance.
    random_conv: float = 0.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def randomises_intensity(self) -> bool:
        return bool(self.gamma or self.bias or self.noise or self.blur or self.random_conv)


def geometry_only(cfg: AugmentConfig) -> AugmentConfig:
    """``cfg`` without any intensity change: the same random geometry from the same generator state (the
    geometry is drawn first), so a sample augmented with both configs from equal seeds is pixel-aligned."""
    return dataclasses.replace(cfg, gamma=0.0, bias=0.0, noise=0.0, blur=0.0, intensity=0.0, random_conv=0.0)


def for_unlabeled(cfg: AugmentConfig) -> AugmentConfig:
    """The augmentation of unlabelled (real) slices: ``cfg`` without the random convolution, which randomises the
    labelled source's appearance and would otherwise replace the real appearance self-training learns from."""
    return dataclasses.replace(cfg, random_conv=0.0)


def _uniform(gen: torch.Generator, a: float, b: float) -> float:
    return a + (b - a) * float(torch.rand((), generator=gen))


def random_geometry(image: torch.Tensor, masks: list[torch.Tensor], cfg: AugmentConfig, gen: torch.Generator):
    """One random affine applied to ``image`` (C, H, W; bilinear) and to each (H, W) mask (nearest)."""
    ang = math.radians(_uniform(gen, -cfg.rotate_deg, cfg.rotate_deg))
    s = _uniform(gen, *cfg.scale)
    tx, ty = _uniform(gen, -cfg.shift, cfg.shift) * 2, _uniform(gen, -cfg.shift, cfg.shift) * 2
    flip = -1.0 if (cfg.flip_lr and float(torch.rand((), generator=gen)) < 0.5) else 1.0
    c, si = math.cos(ang) / s, math.sin(ang) / s
    theta = torch.tensor([[c * flip, -si, tx], [si * flip, c, ty]], dtype=image.dtype)[None]
    grid = F.affine_grid(theta, (1,) + tuple(image.shape), align_corners=False)
    img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out = [F.grid_sample(m[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0].to(m.dtype) for m in masks]
    return img, out


def zscore_content(img: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Z-score over the content pixels; 0 elsewhere (what inference feeds the network)."""
    vals = img[:, content]
    if vals.numel() < 2:
        return torch.zeros_like(img)
    out = (img - vals.mean()) / (vals.std() + 1e-6)
    return torch.where(content, out, torch.zeros_like(out))


RANDOM_CONV_LAYERS = 4
RANDOM_CONV_WIDTH = 2  # channels between the layers


def random_convolution(img: torch.Tensor, content: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random shallow network on a (C, H, W) image: ``RANDOM_CONV_LAYERS`` convolutions of random 1x1 or 3x3
    kernels (normal, scaled by their fan-in) and biases with leaky ReLUs between them, its output z-scored over
    ``content`` and mixed with the z-scored input by a uniform random weight. Edges stay where they were (a local operator);
    contrast, texture and even the sign of each tissue's contrast change."""
    c = img.shape[0]
    x = torch.where(content, img, torch.zeros_like(img))[None]
    for layer in range(RANDOM_CONV_LAYERS):
        out_ch = c if layer == RANDOM_CONV_LAYERS - 1 else RANDOM_CONV_WIDTH
        k = 3 if float(torch.rand((), generator=gen)) < 0.5 else 1
        w = torch.randn((out_ch, x.shape[1], k, k), generator=gen, dtype=x.dtype) / math.sqrt(x.shape[1] * k * k)
        b = torch.randn((out_ch,), generator=gen, dtype=x.dtype) * 0.5
        x = F.conv2d(x, w, b, padding=k // 2)
        if layer < RANDOM_CONV_LAYERS - 1:
            x = F.leaky_relu(x, 0.2)
    alpha = float(torch.rand((), generator=gen))
    mixed = alpha * zscore_content(x[0], content) + (1 - alpha) * zscore_content(img, content)
    return zscore_content(mixed, content)


def random_intensity(img: torch.Tensor, content: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random convolution, gamma, bias field, blur and noise on the content of a (C, H, W) image, z-scored again
    over the content."""
    from monai.transforms import GaussianSmooth, RandAdjustContrast, RandBiasField, RandGaussianNoise

    if not content.any():
        return img

    def seeded(t):
        t.set_random_state(int(torch.randint(0, 2 ** 31 - 1, (), generator=gen)))
        return t

    x = img.clone()
    if cfg.random_conv and float(torch.rand((), generator=gen)) < cfg.random_conv:
        x = random_convolution(x, content, gen)
    if cfg.gamma:
        g = math.exp(cfg.gamma)
        x[:, content] = torch.as_tensor(seeded(RandAdjustContrast(prob=1.0, gamma=(1 / g, g)))(x[:, content]))
    if cfg.bias:
        lo = float(x[:, content].min())
        field_input = torch.where(content, x - lo + 1e-3, torch.zeros_like(x))  # positive content, zero padding
        x = torch.as_tensor(seeded(RandBiasField(degree=3, coeff_range=(0.0, cfg.bias / 2), prob=1.0))(field_input))
    if cfg.blur and float(torch.rand((), generator=gen)) < cfg.blur:
        # normalised convolution: blur the content without pulling the zero padding into its border
        smooth = GaussianSmooth(sigma=_uniform(gen, 0.5, 1.5))
        weight = content[None].float()
        x = torch.as_tensor(smooth(x * weight)) / torch.as_tensor(smooth(weight)).clamp_min(1e-3)
    x = zscore_content(x, content)
    if cfg.noise:
        std = _uniform(gen, 0.0, cfg.noise)
        x[:, content] = torch.as_tensor(seeded(RandGaussianNoise(prob=1.0, std=std, sample_std=False))(x[:, content]))
    return x


def augment(image: torch.Tensor, mask: torch.Tensor | None, cfg: AugmentConfig, gen: torch.Generator,
            content: torch.Tensor | None = None):
    """Augment one sample: ``image`` (C, H, W) z-scored over ``content`` (H, W bool; the whole canvas if None),
    ``mask`` (H, W) long labels or None. Returns ``(image, mask)``; padding outside the content stays 0."""
    if content is None:
        content = torch.ones(image.shape[-2:], dtype=torch.bool)
    masks = [content] + ([mask] if mask is not None else [])
    img, moved = random_geometry(image, masks, cfg, gen)
    content = moved[0].bool()
    if cfg.randomises_intensity:
        img = random_intensity(img, content, cfg, gen)
    if cfg.intensity:
        a, b = 1.0 + _uniform(gen, -cfg.intensity, cfg.intensity), _uniform(gen, -cfg.intensity, cfg.intensity)
        img = torch.where(content, img * a + b, torch.zeros_like(img))
    else:
        img = torch.where(content, img, torch.zeros_like(img))
    return img, (moved[1] if mask is not None else None)

