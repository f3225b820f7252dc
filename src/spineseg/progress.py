"""Progress display that stays readable in a log file.

On a terminal this is tqdm. When stderr is not a terminal (a log file, a pipe, CI), redrawing bars
would write thousands of carriage-return updates; instead a plain line is printed at most every
``every`` items (about ten lines per loop) and at the end.
"""

from __future__ import annotations

import sys
import time


class _LineProgress:
    def __init__(self, iterable, desc: str, unit: str, total: int | None):
        self.iterable = iterable
        self.desc, self.unit = desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, values: dict | None = None, **kw) -> None:
        values = dict(values or {}, **kw)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, n: int, t0: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {n}{of} {self.unit} in {time.perf_counter() - t0:.0f} s{extra}", file=sys.stderr, flush=True)

    def __iter__(self):
        every = max(1, (self.total or 10) // 10)
        t0 = time.perf_counter()
        n = 0
        for item in self.iterable:
            yield item
            n += 1
            if n % every == 0 and n != self.total:
                self._line(n, t0)
        self._line(n, t0)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def set_postfix(self, *a, **kw) -> None:
        pass

    def __iter__(self):
        return iter(self.iterable)


def progress(iterable, desc: str = "", unit: str = "it", total: int | None = None, disable: bool = False,
             leave: bool = True, log_lines: bool = True):
    """Wrap ``iterable`` in a progress display (nothing at all when ``disable``).

    ``log_lines=False``: show a bar on a terminal but print nothing to a log file (for inner loops
    whose outer loop already prints a line per step, such as the batches of a training epoch).
    """
    if disable or (not log_lines and not sys.stderr.isatty()):
        return _Silent(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
    return _LineProgress(iterable, desc, unit, total)
