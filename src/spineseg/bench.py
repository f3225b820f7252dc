"""`spineseg bench attention`: naive vs SDPA vs clustered attention, forward and forward+backward.

Each (method, N) runs in a fresh process on 2 threads so that its peak memory (max RSS above the
process's baseline) belongs to that measurement alone.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import statistics
import time
from pathlib import Path

from .errors import SpinesegError

HEADS, DIM, CLUSTERS = 4, 32, 100
NAIVE_LIMIT_BYTES = 8 * 1024 ** 3


def blob_tokens(n: int, seed: int = 0, blobs: int = 8, with_ids: bool = False):
    """q, k, v of shape (1, HEADS, n, DIM); queries and keys drawn from a few Gaussian blobs.

    With ``with_ids`` also the blob of every token, (HEADS, n).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(HEADS, blobs, DIM, generator=g) * 1.5
    idx = torch.randint(0, blobs, (HEADS, n), generator=g)
    x = torch.gather(centers, 1, idx[..., None].expand(-1, -1, DIM)) + 0.1 * torch.randn(HEADS, n, DIM, generator=g)
    q = x[None].clone()
    k = (x + 0.1 * torch.randn(HEADS, n, DIM, generator=g))[None]
    v = torch.randn(1, HEADS, n, DIM, generator=g)
    return (q, k, v, idx) if with_ids else (q, k, v)


def _measure(method: str, n: int, repeats: int, queue) -> None:
    import resource

    import torch
    import torch.nn.functional as F

    from .models.attention import clustered_attention, naive_attention

    torch.set_num_threads(2)
    fns = {"naive": naive_attention, "sdpa": F.scaled_dot_product_attention,
           "ctm": lambda q, k, v: clustered_attention(q, k, v, CLUSTERS, 3)}
    fn = fns[method]
    q, k, v = blob_tokens(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd, fb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(q, k, v)
        fwd.append(time.perf_counter() - t)
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        t = time.perf_counter()
        fn(qq, kk, vv).sum().backward()
        fb.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the float64 reference only after the peak is read: max RSS is a high-water mark, and the reference's
    # own memory taken into the baseline would hide the method's peak under it
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = float((out.double() - exact).norm() / exact.norm())
    queue.put({"method": method, "n": n, "fwd_ms": round(1000 * statistics.median(fwd), 2),
               "fwdbwd_ms": round(1000 * statistics.median(fb), 2), "peak_mb": round(max(peak - base, 0) / 1024, 1),
               "rel_error": round(err, 5)})


def run_one(method: str, n: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(method, n, repeats, q))
    p.start()
    while True:  # a process that dies (killed for memory, an exception) never puts its row: say so, not hang
        try:
            row = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                try:  # it may have put its row just before exiting
                    row = q.get(timeout=1.0)
                    break
                except queue.Empty:
                    p.join()
                    raise SpinesegError(f"the {method} measurement at N={n} died without a result (exit code "
                                        f"{p.exitcode}; out of memory?)") from None
    p.join()
    return row


def attention_benchmark(json_path: str | None = None, sizes=(1024, 4096, 16384)) -> list[dict]:
    rows = []
    for n in sizes:
        repeats = 5 if n <= 4096 else 3
        for method in ("naive", "sdpa", "ctm"):
            # fwd+bwd of naive attention holds scores, probabilities and their gradient: 3 * heads * N^2 * 4 B
            need = 3 * HEADS * n * n * 4
            if method == "naive" and need > NAIVE_LIMIT_BYTES:
                rows.append({"method": method, "n": n, "fwd_ms": None, "fwdbwd_ms": None, "peak_mb": None,
                             "rel_error": None, "skipped": f"needs ~{need / 1024 ** 3:.1f} GB > 8 GB"})
                continue
            rows.append(run_one(method, n, repeats))
    print(f"{'method':<7}{'N':>7}{'fwd ms':>11}{'fwd+bwd ms':>13}{'peak MB':>10}{'rel error':>11}")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['method']:<7}{r['n']:>7}   skipped: {r['skipped']}")
        else:
            print(f"{r['method']:<7}{r['n']:>7}{r['fwd_ms']:>11}{r['fwdbwd_ms']:>13}{r['peak_mb']:>10}{r['rel_error']:>11}")
    by = {(r["method"], r["n"]): r for r in rows}
    for n in sizes:
        s, c = by.get(("sdpa", n)), by.get(("ctm", n))
        if s and c and c["fwdbwd_ms"]:
            print(f"N={n}: CTM forward+backward is {s['fwdbwd_ms'] / c['fwdbwd_ms']:.1f}x faster than SDPA")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows
