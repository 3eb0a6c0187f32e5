"""Experiment specs, run manifests and results on disk."""
