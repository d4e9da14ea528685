"""Diagnostics on rollouts.jsonl (teachability curves); see opd diagnose."""
