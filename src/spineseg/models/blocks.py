"""Convolution blocks: plain double convolution and residual (optionally dilated) blocks."""

from __future__ import annotations

from torch import nn


def norm2d(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    raise ValueError(f"unknown norm {kind!r}")


def conv_norm_act(cin, cout, dilation=1, norm="instance", act=True):
    layers = [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False), norm2d(norm, cout)]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


class PlainBlock(nn.Module):
    """Two 3x3 convolutions (U-Net)."""

    def __init__(self, cin, cout, dilation=1, norm="instance"):
        super().__init__()
        self.body = nn.Sequential(conv_norm_act(cin, cout, dilation, norm), conv_norm_act(cout, cout, dilation, norm))

    def forward(self, x):
        return self.body(x)


class ResBlock(nn.Module):
    """y = act(P(x) + F(x)); F = two 3x3 (dilated) convolutions, P = 1x1 projection when channels change."""

    def __init__(self, cin, cout, dilation=1, norm="instance"):
        super().__init__()
        self.body = nn.Sequential(conv_norm_act(cin, cout, dilation, norm),
                                  conv_norm_act(cout, cout, dilation, norm, act=False))
        self.proj = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), norm2d(norm, cout))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.proj(x) + self.body(x))


BLOCKS = {"plain": PlainBlock, "residual": ResBlock}
