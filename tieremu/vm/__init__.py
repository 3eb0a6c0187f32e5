"""The multi-node QEMU guest: real kernel NUMA (CPU-less nodes, HMAT, memory tiers) on any Linux box.

`topology` reads a guest layout from YAML, `assets` fetches and caches what the guest boots (kernel,
modules, busybox initramfs), `qemu` turns a layout into a QEMU command line, `runner` boots it and runs one
command inside, and `cli` is the `tieremu vm` command group.
"""
