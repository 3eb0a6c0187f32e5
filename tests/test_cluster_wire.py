"""The block transport's pieces: its CRC-32C against the textbook bitwise algorithm (whole and extended piece by
piece, at odd alignments), the paced slice size, and a pull's bytes and checksum over loopback at a block size
that spans many slices and several receive wake-ups."""

from __future__ import annotations

import os

from tieremu.cluster.link import LinkSpec
from tieremu.cluster.wire import MIN_PACED_SLICE, BlockClient, BlockServer, LinkState, checksum, paced_slice


def _textbook_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_checksum_is_crc32c_whole_and_piece_by_piece() -> None:
    assert checksum(b"123456789") == 0xE3069283  # the standard check value
    data = os.urandom(3001)
    assert checksum(data) == _textbook_crc32c(data)
    view = memoryview(bytearray(b"\0" + data))[1:]  # not 8-byte aligned
    value = 0
    for lo, hi in ((0, 5), (5, 1000), (1000, 1001), (1001, 3001)):
        value = checksum(view[lo:hi], value)
    assert value == _textbook_crc32c(data) and checksum(b"") == 0


def test_paced_slices_hold_50_us_of_the_rate_and_at_least_tbf_s_bucket() -> None:
    assert paced_slice(1) == MIN_PACED_SLICE
    assert paced_slice(100) == 622592  # 50 us at 100 Gb/s (625,000 bytes) down to whole 4 KiB pages
    assert all(paced_slice(g) % 4096 == 0 for g in (0.5, 3, 10, 40))


def test_a_multi_slice_block_arrives_whole_and_checked() -> None:
    block = os.urandom(3 * 1024 * 1024 + 123)  # many 256 KiB receive wake-ups, a ragged end
    state = LinkState(LinkSpec(0, 40), pace=True)
    server = BlockServer("127.0.0.1", 0, {9: block}.get, lambda _h: state)
    client = BlockClient("127.0.0.1", server.sock.getsockname()[1])
    try:
        for _ in range(2):  # the receive buffer is kept and reused
            got = client.pull(9, 5.0)
            assert got.payload is not None and bytes(got.payload) == block
        assert server.served == 2 and server.served_bytes == 2 * len(block)
    finally:
        client.close()
        server.close()
