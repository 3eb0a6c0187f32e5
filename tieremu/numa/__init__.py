"""Linux NUMA, nothing else: topology from sysfs and the memory-policy and migration syscalls."""
