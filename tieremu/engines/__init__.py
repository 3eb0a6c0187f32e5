"""Real serving engines (vLLM's CPU build) on tieremu's tiers: the KV connector, KV tensor placement, the driver."""
