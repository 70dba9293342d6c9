"""Benchmarks (not part of the installed package): ``benchmarks.quality`` and the scale benchmark."""
