"""The generator: a U-Net whose blocks, dilations and Transformer stages are configuration.

One class serves every ablation row: ``block`` plain | residual, ``dilations`` per encoder stage
(1, 2, 4, 8 for the paper's dilated encoder), ``attention`` none | full | clustered after the encoder
stages listed in ``attention_stages`` (stage i's output is at 1 / 2^i of the input resolution).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import TransformerBlock2d
from .blocks import BLOCKS


class SegUNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 4, base: int = 32, block: str = "plain",
                 dilations=(1, 1, 1, 1), attention: str = "none", attention_stages=(2, 3, 4), heads: int = 4,
                 clusters: int = 100, kmeans_iters: int = 3, norm: str = "instance"):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}")
        if len(dilations) != 4:
            raise ValueError("dilations needs one value per encoder stage (4)")
        B = BLOCKS[block]
        ch = [base, base * 2, base * 4, base * 8]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, padding=1, bias=False), nn.InstanceNorm2d(base, affine=True),
                                  nn.LeakyReLU(0.01, inplace=True))
        self.enc = nn.ModuleList()
        self.attn = nn.ModuleList()
        cin = base
        for i in range(4):
            self.enc.append(B(cin, ch[i], dilation=int(dilations[i]), norm=norm))
            use = attention != "none" and (i + 1) in tuple(attention_stages)
            self.attn.append(TransformerBlock2d(ch[i], heads, attention, clusters, kmeans_iters) if use else nn.Identity())
            cin = ch[i]
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = B(ch[3], ch[3] * 2, norm=norm)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        cprev = ch[3] * 2
        for i in reversed(range(4)):
            self.up.append(nn.ConvTranspose2d(cprev, ch[i], 2, stride=2))
            self.dec.append(B(ch[i] * 2, ch[i], norm=norm))
            cprev = ch[i]
        self.head = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of 16")
        h = self.stem(x)
        skips = []
        for enc, attn in zip(self.enc, self.attn):
            h = enc(h)
            skips.append(h)
            h = attn(self.pool(h))
        h = self.bottleneck(h)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            h = dec(torch.cat([up(h), skip], 1))
        return self.head(h)
