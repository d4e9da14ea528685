"""Optional second path: run our bench specs (or stock tasks) through lm-evaluation-harness."""
