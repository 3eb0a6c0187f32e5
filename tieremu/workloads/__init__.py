"""Workloads that drive the tiers: micro-benchmarks now; decode runs and trace replay later."""
