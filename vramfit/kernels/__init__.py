"""Compute kernels: the reference ops (CPU path and test oracle) and, later, fast paths."""
