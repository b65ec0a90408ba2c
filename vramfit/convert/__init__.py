"""Converters from other checkpoint formats into the quantize pipeline."""
