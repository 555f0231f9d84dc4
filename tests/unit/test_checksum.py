"""The journal's CRC-32 is zlib's, whichever implementation computes it."""

from __future__ import annotations

import os
import zlib

from acwi_node.ingest import checksum


def test_the_crc_is_zlibs_whole_and_in_parts() -> None:
    data = os.urandom(300_000)
    assert checksum.crc32(data) == zlib.crc32(data)
    assert checksum.crc32_of(
        [data[:7], memoryview(data)[7:100_001], bytearray(data[100_001:])]
    ) == (zlib.crc32(data))
    assert checksum.crc32_of([data[1000:]], zlib.crc32(data[:1000])) == zlib.crc32(data)
    assert checksum.crc32_of([]) == 0


def test_the_fast_implementation_is_the_one_in_use() -> None:
    """zlib-ng is a dependency: a build that lost it would be four times slower per CT slice
    without any test noticing."""
    assert checksum.IMPLEMENTATION.startswith("zlib_ng")
