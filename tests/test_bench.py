"""`spineseg bench attention`: what its peak memory counts, and a measurement process that dies."""

import subprocess
import sys
import textwrap

# in a fresh process (max RSS is a process-wide high-water mark): the method under test touches ~100 MB, the
# accuracy reference touches ~300 MB; the method's peak must not hide under the reference's
PEAK = textwrap.dedent("""
    import queue
    import numpy as np
    import torch.nn.functional as F
    import spineseg.models.attention as attention
    from spineseg import bench

    sdpa, naive = F.scaled_dot_product_attention, attention.naive_attention

    def reference(q, k, v, **kw):
        if q.dtype.is_floating_point and q.dtype.itemsize == 8:
            np.ones(300 * 2 ** 20 // 8).sum()
        return sdpa(q, k, v, **kw)

    def method(q, k, v):
        np.ones(100 * 2 ** 20 // 8).sum()
        return naive(q, k, v)

    F.scaled_dot_product_attention, attention.naive_attention = reference, method
    out = queue.Queue()
    bench._measure("naive", 64, 1, out)
    print(out.get()["peak_mb"])
""")


def test_peak_memory_is_the_methods_own_not_the_accuracy_references():
    # through a small intermediate python: Linux keeps the forking process's resident size as the new program's
    # max RSS across exec, and this test process may be large
    hop = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    r = subprocess.run([sys.executable, "-c", hop, PEAK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    assert float(r.stdout.split()[-1]) > 80  # 0 when the reference's 300 MB counted as the baseline


def test_a_measurement_process_that_dies_is_an_error_not_a_hang():
    # e.g. killed for memory at a large N: the parent used to wait on its queue forever
    code = ("from spineseg import bench\nfrom spineseg.errors import SpinesegError\n"
            "try:\n    bench.run_one('no-such-method', 16, 1)\nexcept SpinesegError as e:\n    print('error:', e)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("run_one waited forever on a process that had died") from None
    assert "error:" in r.stdout and "no-such-method" in r.stdout and "N=16" in r.stdout, r.stdout + r.stderr[-500:]
