"""Type stubs for the compiled hashing primitives (ext/stemedb/_hash.pyx)."""

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

def blake3(data: Buffer) -> bytes:
    """BLAKE3-256 digest of any contiguous buffer."""

def blake3_many(items: Iterable[Buffer]) -> npt.NDArray[np.uint8]:
    """BLAKE3-256 digests of many buffers, as an (n, 32) uint8 array."""

def blake3_concat(
    buffer: Buffer,
    offsets: npt.ArrayLike,
    threads: int = 1,
) -> npt.NDArray[np.uint8]:
    """BLAKE3-256 of buffer[offsets[i]:offsets[i+1]] for each i, as an (n, 32) uint8 array.

    offsets: n+1 non-decreasing integers within [0, len(buffer)] (ValueError
    naming the first bad index otherwise). threads > 1 shares the work among
    that many native threads.
    """

def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC-32C of any contiguous buffer; pass a previous result as crc to continue it."""
