"""Benchmarks that print figures and ratios (speed targets live here, never in timed unit tests)."""
