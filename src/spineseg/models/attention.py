"""Full and clustered (k-means query) self-attention, and the Transformer block used in the generator.

Clustered attention (the paper's CTM, after Vyas et al. 2020): per (batch, head), the N queries are
grouped into C clusters by a few Lloyd iterations of k-means started from a farthest-point choice of
C queries (deterministic, data-driven; the iterations run on a strided sample of at most 4096
queries, then every query joins its nearest centroid). Each cluster's centroid attends to all keys,
``A_c = softmax(Q_c K^T / sqrt(d))``, ``V_c = A_c V``, and every query takes its cluster's row of
``V_c``. Cost O(N C d) instead of O(N^2 d). The assignment is not differentiated; gradients flow
through the centroids (hence the queries), the keys and the values. With C = N every query is its
own cluster and the result equals full attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


INIT_SAMPLE = 256


def _init_centroids(x: torch.Tensor, c: int) -> torch.Tensor:
    """Farthest-point initialisation on a strided sample of at most ``INIT_SAMPLE`` tokens.

    Deterministic and data-driven: the first centroid is the sample's first token, each next one the
    sample token farthest from all centroids chosen so far, so well-separated groups each receive a
    centroid (evenly spaced picks often put two centroids in one group and none in another). The
    sample's squared distances are computed once; each pick is then a gather and a minimum.
    """
    n, d = x.shape[-2], x.shape[-1]
    # ceil division written without negative operands: ONNX integer division truncates towards zero
    xs = x[..., :: max(1, (n + INIT_SAMPLE - 1) // INIT_SAMPLE), :]
    m = xs.shape[-2]
    if c >= m:  # no fewer clusters than sample tokens: evenly spaced tokens of the full set
        return x[..., torch.linspace(0, n - 1, c, device=x.device).round().long(), :]
    x3 = xs.reshape((-1, m, d))
    sq = (x3 * x3).sum(-1)
    dist = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x3 @ x3.transpose(-1, -2))  # (b, m, m)
    mind = dist[:, 0]
    picks = [torch.zeros_like(mind[:, :1], dtype=torch.long)]
    for _ in range(c - 1):
        j = mind.argmax(-1, keepdim=True)
        picks.append(j)
        mind = torch.minimum(mind, torch.gather(dist, 1, j.unsqueeze(-1).expand(-1, 1, m)).squeeze(1))
    idx = torch.cat(picks, -1)  # (b, c)
    return torch.gather(x3, 1, idx.unsqueeze(-1).expand(-1, c, d)).reshape(x.shape[:-2] + (c, d))


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: argmin ||c||^2 / 2 - x.c (the ||x||^2 term does not change it)."""
    lead = x.shape[:-2]
    x3 = x.reshape((-1,) + x.shape[-2:])
    c3 = c.reshape((-1,) + c.shape[-2:])
    half = 0.5 * (c3 * c3).sum(-1).unsqueeze(-2)
    d = torch.baddbmm(half, x3, c3.transpose(-1, -2), alpha=-1.0)
    return d.argmin(-1).reshape(lead + x.shape[-2:-1])


def cluster_means(x: torch.Tensor, assign: torch.Tensor, clusters: int, with_counts: bool = False):
    """Mean of the members of each cluster: ``x`` (..., N, d), ``assign`` (..., N) -> (..., C, d).

    Sums and counts accumulate in float32 (float64 for float64 input) whatever the dtype of ``x``:
    under autocast the queries are fp16 / bf16, and a half-precision scatter-add stops counting at
    2048 (fp16) or 256 (bf16) members. Differentiable in ``x``; empty clusters give 0.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    lead = x.shape[:-2]
    sums = torch.zeros(lead + (clusters, x.shape[-1]), dtype=acc, device=x.device).scatter_add(
        -2, assign.unsqueeze(-1).expand_as(xf), xf)
    counts = torch.zeros(lead + (clusters,), dtype=acc, device=x.device).scatter_add(
        -1, assign, torch.ones(assign.shape, dtype=acc, device=x.device))
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return (means, counts) if with_counts else means


def kmeans_assign(q: torch.Tensor, clusters: int, iters: int = 3, sample: int = 4096) -> torch.Tensor:
    """Cluster index (…, N) of every query, with no gradient.

    Lloyd iterations start from a farthest-point choice of ``clusters`` queries and run on a deterministic strided
    sample of at most ``sample`` queries (all of them when N <= sample); every query is then assigned
    to its nearest final centroid. Vectorised over batch and heads.
    """
    with torch.no_grad():
        qf = q.float()
        c = _init_centroids(qf, clusters)
        n = qf.shape[-2]
        stride = max(1, (n + sample - 1) // sample)  # ceil division that exports to ONNX (see _init_centroids)
        xs = qf[..., ::stride, :]
        for _ in range(iters):
            assign = _nearest(xs, c)
            means, counts = cluster_means(xs, assign, clusters, with_counts=True)
            c = torch.where(counts.unsqueeze(-1) > 0, means, c)
        return _nearest(qf, c)


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, clusters: int, iters: int = 3,
                        assign: torch.Tensor | None = None) -> torch.Tensor:
    """q, k: (..., N, d); v: (..., N, dv). Returns (..., N, dv)."""
    n, d = q.shape[-2], q.shape[-1]
    c = min(clusters, n)
    if assign is None:
        assign = kmeans_assign(q, c, iters)
    idx = assign.unsqueeze(-1)
    centroids = cluster_means(q, assign, c).to(q.dtype)
    attn = torch.softmax(centroids @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (..., C, N)
    vc = attn @ v  # (..., C, dv)
    return torch.gather(vc, -2, idx.expand(q.shape[:-2] + (n, v.shape[-1])))


def naive_attention(q, k, v):
    """Materialised softmax(QK^T/sqrt d) V — the O(N^2) memory reference."""
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return a @ v


def sinusoidal_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2D sine-cosine position encoding, (h*w, dim)."""
    quarter = max(dim // 4, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq
    pe_y = torch.cat([ys.sin(), ys.cos()], -1)[:, None, :].expand(h, w, -1)
    pe_x = torch.cat([xs.sin(), xs.cos()], -1)[None, :, :].expand(h, w, -1)
    pe = torch.cat([pe_y, pe_x], -1).reshape(h * w, -1)
    if pe.shape[1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[1]))
    return pe[:, :dim].to(dtype)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, mode: str = "full", clusters: int = 100, iters: int = 3):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        if mode not in ("full", "clustered"):
            raise ValueError(f"attention mode must be full or clustered, not {mode!r}")
        self.heads, self.mode, self.clusters, self.iters = heads, mode, clusters, iters
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim)
        b, n, dim = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.mode == "full":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = clustered_attention(q, k, v, self.clusters, self.iters)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class TransformerBlock2d(nn.Module):
    """Pre-norm MHSA + MLP over the H*W tokens of a feature map, both residual, sinusoidal 2D positions."""

    def __init__(self, dim: int, heads: int = 4, mode: str = "clustered", clusters: int = 100, iters: int = 3,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, mode, clusters, iters)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2) + sinusoidal_2d(h, w, c, x.device, x.dtype)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)
