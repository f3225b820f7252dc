"""spineseg: segmentation of axial lumbar spine MRI into vertebral body, vertebral foramen and lamina."""

__version__ = "0.1.0"

LABELS = {"background": 0, "vertebral_body": 1, "vertebral_foramen": 2, "lamina": 3}
STRUCTURES = ("vertebral_body", "vertebral_foramen", "lamina")
NUM_CLASSES = 4

from .errors import SpinesegError  # noqa: E402

__all__ = ["__version__", "LABELS", "STRUCTURES", "NUM_CLASSES", "SpinesegError"]
