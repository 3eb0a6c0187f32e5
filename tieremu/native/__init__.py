"""Compiled C kernels shared by the tier layer (delay injection) and the probes (measurement)."""
