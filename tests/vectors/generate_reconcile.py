"""Writes tests/vectors/reconcile.json: range lists of set reconciliation, from docs/protocol.md.

Built from the document alone — plain Python for the order and the bytes, the
`blake3` package for fingerprints — never with stemedb, so that the compiled
kernel is checked against an independent reading of the specification
(docs/protocol.md, "Replication: range lists"). Run from the repository root:

    python tests/vectors/generate_reconcile.py
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import blake3

OUT = pathlib.Path(__file__).with_name("reconcile.json")
SKIP, FP3, FP4, FP8, FP16, IDLIST, NEED = range(7)
FP_WIDTH = {FP3: 3, FP4: 4, FP8: 8, FP16: 16}


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def item(seed: str, ms: int) -> tuple[int, bytes]:
    return ms, hashlib.sha256(seed.encode()).digest()


def below(key: tuple[int, bytes], bound: tuple[int, bytes] | None) -> bool:
    if bound is None:
        return True
    ms, prefix = bound
    return key[0] < ms or (key[0] == ms and key[1] < prefix + bytes(32 - len(prefix)))


def fingerprint(keys: list[tuple[int, bytes]], salt: bytes, width: int) -> bytes:
    total = sum(int.from_bytes(k[1], "little") for k in keys) % (1 << 256)
    data = salt + total.to_bytes(32, "little") + len(keys).to_bytes(8, "little")
    return blake3.blake3(data).digest()[:width]


def fingerprint_mode(count: int) -> int:
    if count > 65536:
        return FP16
    if count > 512:
        return FP8
    if count > 32:
        return FP4
    return FP3


def bound_between(before: tuple[int, bytes], after: tuple[int, bytes]) -> tuple[int, bytes]:
    if before[0] < after[0]:
        return after[0], b""
    k = 0
    while k < 31 and before[1][k] == after[1][k]:
        k += 1
    return after[0], after[1][:k + 1]


def window_width(count: int) -> int:
    width = (count.bit_length() + 20 + 7) // 8
    return min(max(width, 2), 8)


class Writer:
    def __init__(self) -> None:
        self.out = bytearray()
        self.previous_ms = 0

    def range(self, bound: tuple[int, bytes] | None, mode: int, payload: bytes = b"") -> None:
        if bound is None:
            self.out += varint(0) + bytes([mode << 5])
        else:
            ms, prefix = bound
            self.out += varint(ms - self.previous_ms + 1)
            self.previous_ms = ms
            code = 31 if len(prefix) == 32 else len(prefix)
            self.out += bytes([(mode << 5) | code]) + prefix
        self.out += payload


def split(keys: list[tuple[int, bytes]], salt: bytes, branching: int, threshold: int,
          writer: Writer, hi: tuple[int, bytes] | None) -> None:
    """The reply to a differing range holding `keys` (this side's, sorted)."""
    count = len(keys)
    if count <= threshold:
        width = window_width(count) if count else 0
        offset = salt[0] % (32 - width + 1) if width else 0
        payload = varint(count)
        if count:
            payload += bytes([width]) + b"".join(k[1][offset:offset + width] for k in keys)
        writer.range(hi, IDLIST, payload)
        return
    parts = min(branching, count)
    start = 0
    for j in range(parts):
        end = count * (j + 1) // parts
        bound = hi if j + 1 == parts else bound_between(keys[end - 1], keys[end])
        part = keys[start:end]
        mode = fingerprint_mode(len(part))
        writer.range(bound, mode, fingerprint(part, salt, FP_WIDTH[mode]))
        start = end


def initiate(keys: list[tuple[int, bytes]], salt: bytes, branching: int, threshold: int) -> bytes:
    writer = Writer()
    split(sorted(keys), salt, branching, threshold, writer, None)
    return bytes(writer.out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def respond(message: bytes, keys: list[tuple[int, bytes]], salt: bytes, branching: int,
            threshold: int) -> tuple[bytes, list[bytes]]:
    """A side holding `keys` answers `message` (sending allowed, receiving allowed).

    Returns the reply and the IDs this side sends (the peer lacks them). Only
    the modes an initiator's first message holds are handled here.
    """
    keys = sorted(keys)
    writer = Writer()
    pending_skip: list = []          # [bound] of a SKIP not yet written (merged with the next)
    sends: list[bytes] = []
    pos, previous_ms = 0, 0
    lo: tuple[int, bytes] = (0, b"")

    def flush() -> None:
        if pending_skip:
            writer.range(pending_skip.pop(), SKIP)

    while pos < len(message):
        code, pos = read_varint(message, pos)
        head = message[pos]
        pos += 1
        mode, length = head >> 5, head & 0x1F
        if code == 0:
            hi = None
        else:
            previous_ms += code - 1
            length = 32 if length == 31 else length
            hi = (previous_ms, message[pos:pos + length])
            pos += length
        mine = [k for k in keys if not below(k, lo) and below(k, hi)]
        if mode in FP_WIDTH:
            width = FP_WIDTH[mode]
            theirs = message[pos:pos + width]
            pos += width
            if fingerprint(mine, salt, width) == theirs:
                pending_skip[:] = [hi]
            else:
                flush()
                split(mine, salt, branching, threshold, writer, hi)
        elif mode == IDLIST:
            count, pos = read_varint(message, pos)
            width = message[pos] if count else 0
            pos += 1 if count else 0
            offset = salt[0] % (32 - width + 1) if width else 0
            entries = [message[pos + i * width:pos + (i + 1) * width] for i in range(count)]
            pos += count * width
            windows = {k[1][offset:offset + width] for k in mine} if width else set()
            sends += [k[1] for k in mine if not width or k[1][offset:offset + width] not in set(entries)]
            lacking = [0 if entry in windows else 1 for entry in entries]
            if any(lacking):
                flush()
                bitmap = bytearray((count + 7) // 8)
                for i, bit in enumerate(lacking):
                    bitmap[i // 8] |= bit << (i % 8)
                writer.range(hi, NEED, varint(count) + bytes(bitmap))
            else:
                pending_skip[:] = [hi]
        else:
            raise ValueError(f"mode {mode} is not handled by this generator")
        lo = hi if hi is not None else lo
    flush()
    return bytes(writer.out), sends


def reply_case(name: str, message: bytes, keys: list[tuple[int, bytes]], salt: bytes,
               branching: int, threshold: int, note: str) -> dict:
    reply, sends = respond(message, keys, salt, branching, threshold)
    return {"name": name, "note": note, "salt": salt.hex(), "branching": branching,
            "list_threshold": threshold,
            "items": [{"ms": ms, "id": record_id.hex()} for ms, record_id in keys],
            "message": message.hex(), "reply": reply.hex(), "sends": [i.hex() for i in sends]}


def case(name: str, keys: list[tuple[int, bytes]], salt: bytes, branching: int, threshold: int,
         note: str) -> dict:
    return {
        "name": name,
        "note": note,
        "salt": salt.hex(),
        "branching": branching,
        "list_threshold": threshold,
        "items": [{"ms": ms, "id": record_id.hex()} for ms, record_id in keys],
        "initiate": initiate(keys, salt, branching, threshold).hex(),
    }


def main() -> None:
    salt = bytes(range(1, 9))
    small = [item(f"small-{i}", 1_700_000_000_000 + i) for i in range(5)]
    tied = [item(f"tied-{i}", 1_700_000_000_000) for i in range(40)]
    spread = [item(f"spread-{i}", 1_700_000_000_000 + 7 * i) for i in range(300)]
    empty_fp = fingerprint([], salt, 16)
    whole = fingerprint(spread, salt, 16)
    vectors = {
        "comment": "Range lists of docs/protocol.md 'Replication: range lists', built by "
                   "tests/vectors/generate_reconcile.py from the document alone.",
        "fingerprints": [
            {"name": "empty", "salt": salt.hex(), "ids": [], "fingerprint16": empty_fp.hex()},
            {"name": "spread-300", "salt": salt.hex(), "ids": [k[1].hex() for k in spread],
             "fingerprint16": whole.hex()},
        ],
        "cases": [
            case("empty-set", [], salt, 16, 32, "nothing held: one empty ID list to infinity"),
            case("five-items-list", small, salt, 16, 32, "at or under the threshold: one ID list"),
            case("forty-tied-split", tied, salt, 4, 8,
                 "all in one millisecond: bounds need ID prefixes"),
            case("spread-split", spread, salt, 16, 32, "distinct milliseconds: bounds are times"),
        ],
        "replies": [
            reply_case("spread-missing-two", initiate(spread, salt, 16, 32),
                       [k for i, k in enumerate(spread) if i not in (40, 250)], salt, 16, 32,
                       "a peer lacking two items answers the split: it lists the two ranges' items"),
            reply_case("list-with-extra", initiate(small, salt, 16, 32), small[:3] + [spread[0]],
                       salt, 16, 32,
                       "a peer holding three of the five and one more: NEED two, send one"),
            reply_case("equal-sets", initiate(spread, salt, 16, 32), spread, salt, 16, 32,
                       "the same set answers one SKIP to infinity"),
        ],
    }
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {OUT} ({len(vectors['cases'])} cases)")


if __name__ == "__main__":
    main()
