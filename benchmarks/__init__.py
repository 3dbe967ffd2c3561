"""Repeatable measurements with their baselines, printed as ratios (`make bench`)."""
