"""Characterization: latency, bandwidth, loaded latency, migration, storage and GPU probes of each tier."""
