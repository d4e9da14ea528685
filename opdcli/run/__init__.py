"""A run's life outside the step: run directory, checkpoints, tracking, progress, held-out evaluation."""
