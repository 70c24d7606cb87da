"""Tiny models and data for the evaluation, optimize, prune and distill tests."""
