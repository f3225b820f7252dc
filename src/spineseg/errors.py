"""The one exception users see: a message naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class SpinesegError(Exception):
    """Bad input or a refused operation. The CLI prints it as one line and exits non-zero."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
