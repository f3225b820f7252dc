"""Applying a trained model to new images."""
