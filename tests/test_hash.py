"""stemedb._hash against the `blake3` package and published CRC-32C vectors.

Random content comes from SEED (override with STEMEDB_TEST_SEED=<int>); every
assertion that depends on it names the seed, so a failure can be replayed.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import threading
from itertools import pairwise
from pathlib import Path

import blake3 as reference
import numpy as np
import pytest

from stemedb import _hash

SEED = int(os.environ.get("STEMEDB_TEST_SEED", "20240611"))
EXT_DIR = Path(__file__).resolve().parent.parent / "ext" / "stemedb"


def ref(data: bytes) -> bytes:
    return reference.blake3(data).digest()


def ref_rows(items: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(map(ref, items)), dtype=np.uint8).reshape(len(items), 32)


def rng_for(salt: str) -> random.Random:
    return random.Random(f"{SEED}:{salt}")


def mixed_lengths(rng: random.Random, n: int) -> list[int]:
    """Record-like lengths, with the edges of blocks and chunks and multi-chunk inputs mixed in."""
    pool = [0, 0, 1, 63, 64, 65, 127, 128, 1023, 1024, 1025, 2048, 2049, 5000, 70_000]
    return [rng.choice(pool) if rng.random() < 0.2 else rng.randint(1, 1100) for _ in range(n)]


def concat(items: list[bytes]) -> tuple[bytes, np.ndarray]:
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in items], out=offsets[1:])
    return b"".join(items), offsets


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------ blake3


def test_blake3_every_length_up_to_4096() -> None:
    data = rng_for("every-length").randbytes(4096)
    for n in range(4097):
        assert _hash.blake3(data[:n]) == ref(data[:n]), f"length {n}, seed {SEED}"


def test_blake3_known_digest() -> None:
    assert _hash.blake3(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )


TREE_LENGTHS = sorted(
    {1024 * k + d for k in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128,
                            129, 191, 192, 193, 255, 256, 257, 1024, 1025) for d in (-1, 0, 1)}
    | {65536 * k + d for k in (2, 3, 4, 5, 6, 7, 8) for d in (-1024, -1, 1, 1024, 1025)}
)


def test_blake3_tree_shapes() -> None:
    data = rng_for("tree").randbytes(max(TREE_LENGTHS))
    for n in TREE_LENGTHS:
        assert _hash.blake3(data[:n]) == ref(data[:n]), f"length {n}, seed {SEED}"


def test_blake3_random_large_inputs() -> None:
    rng = rng_for("large")
    lengths = [1 << 20, (1 << 20) + 1, (1 << 20) - 1, 3 * (1 << 20) + 777]
    lengths += [rng.randint(4097, 4 << 20) for _ in range(6)]
    for n in lengths:
        data = rng.randbytes(n)
        assert _hash.blake3(data) == ref(data), f"length {n}, seed {SEED}"


def test_blake3_accepts_any_contiguous_buffer() -> None:
    data = rng_for("buffers").randbytes(3000)
    expected = ref(data)
    assert _hash.blake3(bytearray(data)) == expected
    assert _hash.blake3(memoryview(data)) == expected
    assert _hash.blake3(np.frombuffer(data, dtype=np.uint32)) == expected  # any item format
    assert _hash.blake3(memoryview(data)[100:200]) == ref(data[100:200])


def test_blake3_rejects_non_buffers() -> None:
    with pytest.raises(TypeError):
        _hash.blake3("text")
    with pytest.raises(BufferError):
        _hash.blake3(memoryview(b"abcdef")[::2])


# ------------------------------------------------------------- blake3_many


@pytest.mark.parametrize("n", [*range(0, 41), 511, 512, 513, 3000])
def test_blake3_many_matches_single(n: int) -> None:
    rng = rng_for(f"many-{n}")
    items = [rng.randbytes(length) for length in mixed_lengths(rng, n)]
    out = _hash.blake3_many(items)
    assert out.shape == (n, 32) and out.dtype == np.uint8
    for i, item in enumerate(items):
        assert out[i].tobytes() == ref(item), f"item {i} of {n} (length {len(item)}), seed {SEED}"


def test_blake3_many_every_length() -> None:
    data = rng_for("many-every-length").randbytes(4096)
    items = [data[:n] for n in range(4097)]
    items += items[::-1]  # other neighbours in the SIMD lanes
    assert np.array_equal(_hash.blake3_many(items), ref_rows(items)), f"seed {SEED}"


def test_blake3_many_accepts_iterables_and_buffer_kinds() -> None:
    items = [b"", b"a", bytearray(b"bc" * 100), memoryview(b"x" * 2000),
             np.arange(50, dtype=np.uint8)]
    expected = ref_rows([bytes(item) for item in items])
    assert np.array_equal(_hash.blake3_many(items), expected)
    assert np.array_equal(_hash.blake3_many(tuple(items)), expected)
    assert np.array_equal(_hash.blake3_many(item for item in items), expected)
    with pytest.raises(TypeError):
        _hash.blake3_many([b"ok", "text"])
    with pytest.raises(TypeError):
        _hash.blake3_many([b"ok", None])


# ----------------------------------------------------------- blake3_concat


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 9, 100, 6000])
def test_blake3_concat_matches_single(n: int, threads: int) -> None:
    rng = rng_for(f"concat-{n}")
    items = [rng.randbytes(length) for length in mixed_lengths(rng, n)]
    buffer, offsets = concat(items)
    out = _hash.blake3_concat(buffer, offsets, threads=threads)
    assert out.shape == (n, 32) and out.dtype == np.uint8
    assert np.array_equal(out, ref_rows(items)), f"n={n} threads={threads} seed {SEED}"


def test_blake3_concat_records_with_two_threads() -> None:
    # The hot path: a million-record-like batch big enough to be split.
    rng = rng_for("records")
    items = [rng.randbytes(rng.randint(150, 260)) for _ in range(20_000)]
    buffer, offsets = concat(items)
    expected = ref_rows(items)
    for threads in (1, 2):
        assert np.array_equal(_hash.blake3_concat(buffer, offsets, threads=threads), expected), (
            f"threads={threads} seed {SEED}"
        )


def test_blake3_concat_offset_forms() -> None:
    data = rng_for("offset-forms").randbytes(5000)
    offsets = [100, 100, 164, 1300, 4999]  # need not start at 0 nor end at the buffer's end
    expected = ref_rows([data[a:b] for a, b in pairwise(offsets)])
    for form in (offsets, tuple(offsets), np.array(offsets, dtype=np.int32),
                 np.array(offsets, dtype=np.uint64), np.repeat(offsets, 2)[::2]):
        assert np.array_equal(_hash.blake3_concat(data, form), expected), repr(form)
    assert np.array_equal(_hash.blake3_concat(bytearray(data), offsets), expected)
    as_array = np.frombuffer(data, dtype=np.uint8)
    assert np.array_equal(_hash.blake3_concat(as_array, offsets), expected)
    for empty in ([], [0], [5000], np.array([], dtype=np.int64)):
        assert _hash.blake3_concat(data, empty).shape == (0, 32)


@pytest.mark.parametrize(
    ("offsets", "index"),
    [
        ([0, 10, 5, 20], 2),     # decreasing
        ([-1, 10], 0),           # before the buffer
        ([0, 10, 101], 2),       # past the buffer
        ([0, 101, 50], 1),       # past the buffer, then decreasing
        ([2**63 - 1], 0),
    ],
)
def test_blake3_concat_rejects_bad_offsets(offsets: list[int], index: int) -> None:
    with pytest.raises(ValueError, match=rf"offsets\[{index}\]"):
        _hash.blake3_concat(bytes(100), offsets)


def test_blake3_concat_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="threads"):
        _hash.blake3_concat(bytes(10), [0, 10], threads=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        _hash.blake3_concat(bytes(10), [[0, 10]])
    with pytest.raises(TypeError, match="integers"):
        _hash.blake3_concat(bytes(10), [0.0, 10.0])
    with pytest.raises(TypeError):
        _hash.blake3_concat("text", [0, 1])


def test_concurrent_callers() -> None:
    # No shared state: Python threads hashing at once (GIL released) agree.
    rng = rng_for("concurrent")
    items = [rng.randbytes(length) for length in mixed_lengths(rng, 3000)]
    buffer, offsets = concat(items)
    expected = ref_rows(items)
    results: list[bool] = []

    def work() -> None:
        for _ in range(5):
            ok = np.array_equal(_hash.blake3_concat(buffer, offsets, threads=2), expected)
            ok &= np.array_equal(_hash.blake3_many(items), expected)
            ok &= _hash.blake3(buffer) == ref(buffer)
            results.append(bool(ok))

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [True] * 20, f"seed {SEED}"


# ------------------------------------------------------------------ crc32c


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        (b"", 0x00000000),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),                # RFC 3720, B.4
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_known_vectors(data: bytes, crc: int) -> None:
    assert _hash.crc32c(data) == crc


def test_crc32c_matches_bitwise_definition() -> None:
    rng = rng_for("crc")
    for n in [*range(80), 1000, 4099]:
        data = rng.randbytes(n)
        assert _hash.crc32c(data) == crc32c_bitwise(data), f"length {n}, seed {SEED}"


def test_crc32c_chains() -> None:
    rng = rng_for("crc-chain")
    data = rng.randbytes(10_000)
    whole = _hash.crc32c(data)
    for _ in range(200):
        cut = rng.randint(0, len(data))
        head = _hash.crc32c(data[:cut])
        assert _hash.crc32c(data[cut:], head) == whole, f"cut {cut}, seed {SEED}"
    assert _hash.crc32c(b"", whole) == whole
    assert _hash.crc32c(np.frombuffer(data, dtype=np.uint16)) == whole


def test_crc32c_rejects_out_of_range_crc() -> None:
    for bad in (-1, 2**32):
        with pytest.raises(OverflowError):
            _hash.crc32c(b"x", bad)


# --------------------------------------------------------- portable build


@pytest.fixture(scope="module")
def portable(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """blake3_impl.c built with STM_NO_SIMD: the code non-x86 machines run."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    lib_path = tmp_path_factory.mktemp("portable") / "libblake3_portable.so"
    subprocess.run(
        [compiler, "-O2", "-std=c99", "-shared", "-fPIC", "-DSTM_NO_SIMD",
         str(EXT_DIR / "blake3_impl.c"), "-o", str(lib_path)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.stm_blake3.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p]
    lib.stm_blake3_many.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t,
                                    ctypes.c_char_p]
    lib.stm_crc32c.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    lib.stm_crc32c.restype = ctypes.c_uint32
    return lib


def test_portable_build(portable: ctypes.CDLL) -> None:
    rng = rng_for("portable")
    for n in [*range(0, 1100, 7), 1025, 4096, 65537, 200_001]:
        data = rng.randbytes(n)
        out = ctypes.create_string_buffer(32)
        portable.stm_blake3(data, n, out)
        assert out.raw == ref(data), f"length {n}, seed {SEED}"
        assert portable.stm_crc32c(0, data, n) == _hash.crc32c(data), f"length {n}, seed {SEED}"

    items = [rng.randbytes(length) for length in mixed_lengths(rng, 300)]
    out = ctypes.create_string_buffer(32 * len(items))
    portable.stm_blake3_many((ctypes.c_char_p * len(items))(*items),
                             (ctypes.c_size_t * len(items))(*map(len, items)), len(items), out)
    assert out.raw == ref_rows(items).tobytes(), f"seed {SEED}"
