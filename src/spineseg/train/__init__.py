"""Losses and the supervised / adversarial training loops."""
