"""tieremu: a memory-tier emulation testbed for LLM inference on real Linux NUMA."""

__version__ = "0.1.0"
