"""The paper's comparison networks, written here (no torchvision): SegNet, DeepLab v3+, Spine-GAN's generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin, cout, k=3, stride=1, dilation=1):
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """Badrinarayanan et al. 2017: encoder-decoder whose decoder upsamples with the encoder's pooling indices."""

    def __init__(self, in_channels=1, num_classes=4, base=32, depth=4, **_):
        super().__init__()
        ch = [base * 2 ** min(i, 3) for i in range(depth)]
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in ch:
            self.enc.append(nn.Sequential(_cbr(cin, c), _cbr(c, c)))
            cin = c
        self.dec = nn.ModuleList()
        for i in reversed(range(depth)):
            cout = ch[i - 1] if i > 0 else base
            self.dec.append(nn.Sequential(_cbr(ch[i], ch[i]), _cbr(ch[i], cout)))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.head = nn.Conv2d(base, num_classes, 1)

    def forward(self, x):
        idx, sizes = [], []
        for enc in self.enc:
            x = enc(x)
            sizes.append(x.shape)
            x, i = self.pool(x)
            idx.append(i)
        for dec, i, s in zip(self.dec, reversed(idx), reversed(sizes)):
            x = dec(self.unpool(x, i, output_size=s))
        return self.head(x)


class _Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1):
        super().__init__()
        mid = cout // 4
        self.body = nn.Sequential(_cbr(cin, mid, 1), _cbr(mid, mid, 3, stride, dilation),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class ASPP(nn.Module):
    def __init__(self, cin, cout, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _cbr(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        feats = [b(x) for b in self.branches]
        feats.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(feats, 1))


class DeepLabV3Plus(nn.Module):
    """Chen et al. 2018: ResNet-style encoder (output stride 16), ASPP, decoder with 1/4-resolution low-level features."""

    def __init__(self, in_channels=1, num_classes=4, base=32, blocks=(2, 2, 2, 2), rates=(6, 12, 18), **_):
        super().__init__()
        c = [base * 2, base * 4, base * 8, base * 16]
        self.stem = nn.Sequential(_cbr(in_channels, base, 3, 2), _cbr(base, base), nn.MaxPool2d(3, 2, 1))  # 1/4
        layers, cin = [], base
        for i, (ch, n) in enumerate(zip(c, blocks)):
            stride = 1 if i in (0, 3) else 2  # 1/4, 1/8, 1/16, 1/16 (last stage dilated)
            dil = 2 if i == 3 else 1
            stage = [_Bottleneck(cin, ch, stride, dil)] + [_Bottleneck(ch, ch, 1, dil) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = ch
        self.layers = nn.ModuleList(layers)
        self.aspp = ASPP(c[3], base * 4, rates)
        self.low = _cbr(c[0], max(base // 2, 8), 1)
        self.decoder = nn.Sequential(_cbr(base * 4 + max(base // 2, 8), base * 4), _cbr(base * 4, base * 4))
        self.head = nn.Conv2d(base * 4, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        h = self.stem(x)
        low = None
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i == 0:
                low = h
        h = self.aspp(h)
        h = F.interpolate(h, size=low.shape[-2:], mode="bilinear", align_corners=False)
        h = self.decoder(torch.cat([h, self.low(low)], 1))
        return F.interpolate(self.head(h), size=size, mode="bilinear", align_corners=False)


class SpineGANGenerator(nn.Module):
    """After Han et al. 2018 (Spine-GAN): an atrous-convolution autoencoder with an LSTM over the feature map.

    The encoder downsamples 8x with atrous convolutions (rates 1, 2, 4); a bidirectional LSTM runs over
    the H/8 x W/8 feature positions in raster order (spatial context across the whole slice), added back
    residually; the decoder upsamples with skip connections. It is trained against the critic (``bce``
    by default, as the original used a standard GAN discriminator).
    """

    def __init__(self, in_channels=1, num_classes=4, base=32, **_):
        super().__init__()
        c = [base, base * 2, base * 4, base * 4]
        self.e0 = nn.Sequential(_cbr(in_channels, c[0]), _cbr(c[0], c[0]))
        self.e1 = nn.Sequential(_cbr(c[0], c[1], stride=2), _cbr(c[1], c[1], dilation=2))
        self.e2 = nn.Sequential(_cbr(c[1], c[2], stride=2), _cbr(c[2], c[2], dilation=4))
        self.e3 = nn.Sequential(_cbr(c[2], c[3], stride=2), _cbr(c[3], c[3], dilation=2), _cbr(c[3], c[3], dilation=4))
        self.lstm = nn.LSTM(c[3], c[3] // 2, batch_first=True, bidirectional=True)
        self.d2 = nn.Sequential(_cbr(c[3] + c[2], c[2]), _cbr(c[2], c[2]))
        self.d1 = nn.Sequential(_cbr(c[2] + c[1], c[1]), _cbr(c[1], c[1]))
        self.d0 = nn.Sequential(_cbr(c[1] + c[0], c[0]), _cbr(c[0], c[0]))
        self.head = nn.Conv2d(c[0], num_classes, 1)

    @staticmethod
    def _up(x, ref):
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x):
        f0 = self.e0(x)
        f1 = self.e1(f0)
        f2 = self.e2(f1)
        f3 = self.e3(f2)
        b, ch, h, w = f3.shape
        seq, _ = self.lstm(f3.flatten(2).transpose(1, 2))
        f3 = f3 + seq.transpose(1, 2).reshape(b, ch, h, w)
        y = self.d2(torch.cat([self._up(f3, f2), f2], 1))
        y = self.d1(torch.cat([self._up(y, f1), f1], 1))
        y = self.d0(torch.cat([self._up(y, f0), f0], 1))
        return self.head(y)
