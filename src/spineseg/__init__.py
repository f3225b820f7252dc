"""spineseg: segmentation of axial lumbar spine MRI into vertebral body, vertebral foramen and lamina."""

import os

# OpenMP threads that busy-wait between operations stall badly when the cores are shared (measured on 2
# cores under load: a z-score of a 192^2 slice took 80 ms instead of 0.4 ms); wait passively unless the
# user chose otherwise. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

LABELS = {"background": 0, "vertebral_body": 1, "vertebral_foramen": 2, "lamina": 3}
STRUCTURES = ("vertebral_body", "vertebral_foramen", "lamina")
NUM_CLASSES = 4

from .errors import SpinesegError  # noqa: E402

__all__ = ["__version__", "LABELS", "STRUCTURES", "NUM_CLASSES", "SpinesegError"]
