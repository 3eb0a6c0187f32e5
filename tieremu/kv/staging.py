"""Staging KV blocks from host memory to the device a model runs on: gather into a host buffer, copy across.

With a model on a GPU, K/V held in host tiers (DRAM, CXL, remote sockets) reach attention by a host-to-device copy,
as in vLLM's CPU offload or FlexGen. The copy is fast and asynchronous only from pinned (page-locked) host memory,
so the host side is pinned when CUDA is there; both sides are reused across steps and grow when a read needs more
blocks than they hold (pinning is a slow system call: it must not happen per read).

The same buffer runs with the CPU as the "device" (non-pinned host side): the path is then testable anywhere.
"""

from __future__ import annotations

import torch

from tieremu.errors import KVError


class StagingBuffer:
    """A host side to gather blocks into and a device side they are copied to, each `capacity` blocks of
    `block_shape` (what one read stages per block: one layer's K and V)."""

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                 pin: bool | None = None) -> None:
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        cuda = torch.cuda.is_available()
        self.pinned = (cuda and self.device.type == "cuda") if pin is None else pin
        if self.pinned and not cuda:
            raise KVError("a pinned staging buffer needs CUDA (torch.cuda.is_available() is False); use pin=False")
        self.capacity = 0
        self.grown = 0  # times the buffers were (re)allocated
        self._host = torch.empty((0, *self.block_shape), dtype=dtype)
        self._device = torch.empty((0, *self.block_shape), dtype=dtype, device=self.device)
        # Set after an asynchronous copy out of the host side: the host side must not be rewritten before it is done.
        self._copied: torch.cuda.Event | None = None

    def host(self, blocks: int) -> torch.Tensor:
        """The host side's first `blocks` blocks, free to write: any earlier copy out of it has finished."""
        self._wait()
        if blocks > self.capacity:
            self._grow(blocks)
        return self._host[:blocks]

    def to_device(self, blocks: int) -> torch.Tensor:
        """Copy the host side's first `blocks` blocks to the device side and return that view. It is valid until
        the next to_device: the caller assembles it into its own tensors (on a GPU the copy is queued on the
        current stream, so work queued after it sees the data)."""
        if blocks > self.capacity:
            raise KVError(f"staging: {blocks} blocks asked to be copied, but only {self.capacity} were staged")
        out = self._device[:blocks]
        out.copy_(self._host[:blocks], non_blocking=self.pinned)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held on each side."""
        return self._host.numel() * self._host.element_size()

    def _wait(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _grow(self, blocks: int) -> None:
        # Doubling: a decode's reads grow a block at a time, and every growth pins new memory.
        capacity = max(blocks, 2 * self.capacity)
        shape = (capacity, *self.block_shape)
        self._host = torch.empty(shape, dtype=self.dtype, pin_memory=self.pinned)
        self._device = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.capacity = capacity
        self.grown += 1
