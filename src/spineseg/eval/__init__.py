"""Metrics, statistics, reports and figures."""
