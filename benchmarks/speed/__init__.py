"""Where a training step's time goes: `python -m benchmarks.speed` (see __main__)."""
