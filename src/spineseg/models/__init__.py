"""Networks: blocks, attention, generator, critic and the one registry."""

from .critic import Critic
from .registry import ARCHITECTURES, build_model, model_names

__all__ = ["Critic", "ARCHITECTURES", "build_model", "model_names"]
