"""Phantom, data sets, splits, augmentation."""
