"""The paper's preprocessing (invertible) and its on-disk cache."""

from .pipeline import (Geometry, PreprocessCache, PreprocessConfig, forward_geometry, inverse_geometry,
                       preprocess_slice, probabilities_to_labels)

__all__ = ["Geometry", "PreprocessCache", "PreprocessConfig", "forward_geometry", "inverse_geometry",
           "preprocess_slice", "probabilities_to_labels"]
