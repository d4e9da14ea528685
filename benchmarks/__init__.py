"""Benchmark specs, generators, scorers and metrics for opd eval."""
