"""A paged KV cache whose blocks live in per-tier arenas (see cache.py for the entry point)."""
