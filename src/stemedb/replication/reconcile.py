"""A reconciliation session, without I/O: messages in, messages out.

Owns: the session state of one side of a range-based set reconciliation
(salt, directions, the open scopes and the ID lists sent in each), and the
SYNC message framing around the native range lists of `stemedb._reconcile`
(docs/protocol.md, "Replication"). Must never: send or receive bytes, read or
store records, or take locks itself; the caller hands in what each step needs
(the h11 / hyper-h2 shape: the same object runs over real sockets, over the
simulated network of the tests, and in-process).

Error handling: a malformed message raises ProtocolError naming what is
wrong; the session is then unusable and the caller ends it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from stemedb import _reconcile
from stemedb.errors import ProtocolError

SALT_SIZE = 8
# Scope numbers on the wire: 0 the whole store, 1 the global partition (epochs,
# envelopes and other records every node holds), 2 + p partition p of a cluster.
WHOLE_STORE = 0
GLOBAL_PARTITION = 1
MAX_SCOPES = 1 << 16


def partition_scope(partition: int) -> int:
    return 2 + partition


class ItemSource(Protocol):
    """What a session reads: the ordered items of one scope.

    `items(scope)` returns (tree, timestamps, ids) — a RangeTree and the
    columns its keys are read from — valid until the caller's next change
    of the store; the caller holds whatever lock keeps them stable while a
    step runs.
    """

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]: ...


@dataclass
class SessionStats:
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Reconciler:
    """One side of a reconciliation over a set of scopes.

    The initiator calls `start()` and sends the result; each side then feeds
    every message it receives to `receive()`, sends the reply it returns (if
    any) and sends the peer the records `receive()` says the peer lacks. The
    session is over when `done` is true on both sides: a side that gets a
    reply with nothing but "skip" in every scope has nothing left to send.
    """

    source: ItemSource
    scopes: list[int]
    can_send: bool
    can_receive: bool
    salt: bytes = field(default_factory=lambda: os.urandom(SALT_SIZE))
    branching: int = 16
    list_threshold: int = 32
    stats: SessionStats = field(default_factory=SessionStats)

    def __post_init__(self) -> None:
        if len(self.salt) != SALT_SIZE:
            raise ValueError(f"salt: {len(self.salt)} bytes, expected {SALT_SIZE}")
        if len(self.scopes) > MAX_SCOPES:
            raise ValueError(f"scopes: {len(self.scopes)}, at most {MAX_SCOPES}")
        self._open = dict.fromkeys(self.scopes)
        self._lists: dict[int, dict[bytes, np.ndarray]] = {scope: {} for scope in self.scopes}

    @property
    def done(self) -> bool:
        return not self._open

    def start(self) -> tuple[bytes, dict[int, np.ndarray]]:
        """The first message (every scope split by this side), and rows to send."""
        blocks = []
        sends: dict[int, np.ndarray] = {}
        for scope in list(self._open):
            reply, send, done = self._step(scope, b"", initiate=True)
            blocks.append((scope, reply))
            _add_send(sends, scope, send)
        message = encode_message(blocks)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(message)
        return message, sends

    def receive(self, message: bytes) -> tuple[bytes | None, dict[int, np.ndarray]]:
        """Process the peer's message: (reply or None, record numbers to send by scope)."""
        self.stats.messages_received += 1
        self.stats.bytes_received += len(message)
        blocks = decode_message(message)
        replies = []
        sends: dict[int, np.ndarray] = {}
        for scope, ranges in blocks:
            if scope not in self._open:
                raise ProtocolError(f"sync message: scope {scope} is not open in this session")
            if ranges == ALL_SKIP:
                # The peer has nothing more to say about this scope, nor do we.
                del self._open[scope]
                continue
            reply, send, done = self._step(scope, ranges, initiate=False)
            _add_send(sends, scope, send)
            replies.append((scope, reply))
            if done:
                del self._open[scope]
        if not replies:
            return None, sends
        out = encode_message(replies)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(out)
        return out, sends

    def _step(self, scope: int, ranges: bytes, *, initiate: bool) -> tuple[bytes, np.ndarray, bool]:
        tree, timestamps, ids = self.source.items(scope)
        return _reconcile.reconcile(tree, timestamps, ids, ranges, self.salt, self._lists[scope],
                                    can_send=self.can_send, can_receive=self.can_receive,
                                    branching=self.branching, list_threshold=self.list_threshold,
                                    initiate=initiate)


# A range list holding one SKIP range up to infinity: "nothing more to say".
ALL_SKIP = b"\x00\x00"


def _add_send(sends: dict[int, np.ndarray], scope: int, rows: np.ndarray) -> None:
    if len(rows):
        sends[scope] = np.concatenate([sends[scope], rows]) if scope in sends else rows


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, position: int, field: str) -> tuple[int, int]:
    value = shift = 0
    start = position
    while True:
        if position >= len(data):
            raise ProtocolError(f"sync message: {field} at byte {start} runs past the end")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and shift:
                raise ProtocolError(f"sync message: {field} at byte {start} is not minimally encoded")
            return value, position
        shift += 7
        if shift > 63:
            raise ProtocolError(f"sync message: {field} at byte {start} is longer than 64 bits")


def encode_message(blocks: Iterable[tuple[int, bytes]]) -> bytes:
    """`count:varint` then per block `scope:varint length:varint range_list`."""
    blocks = list(blocks)
    parts = [_varint(len(blocks))]
    for scope, ranges in blocks:
        parts += [_varint(scope), _varint(len(ranges)), ranges]
    return b"".join(parts)


def decode_message(data: bytes) -> list[tuple[int, bytes]]:
    count, position = _read_varint(data, 0, "block count")
    if count > MAX_SCOPES:
        raise ProtocolError(f"sync message: {count} blocks, at most {MAX_SCOPES}")
    blocks = []
    seen: set[int] = set()
    for _ in range(count):
        block_start = position
        scope, position = _read_varint(data, position, "block scope")
        length, position = _read_varint(data, position, "block length")
        if length > len(data) - position:
            raise ProtocolError(f"sync message: block at byte {block_start} runs past the end")
        if scope in seen:
            raise ProtocolError(f"sync message: scope {scope} appears twice")
        seen.add(scope)
        blocks.append((scope, data[position:position + length]))
        position += length
    if position != len(data):
        raise ProtocolError(f"sync message: {len(data) - position} bytes after the last block")
    return blocks


def run_in_memory(initiator: Reconciler, responder: Reconciler,
                  deliver: Callable[[Reconciler, dict[int, np.ndarray]], None]) -> int:
    """Drive a session between two in-process sides; returns the round trips taken.

    `deliver(sender, sends)` moves the records `sender` found the other side
    lacking. Used by the tests and by in-process sync between two stores.
    """
    first, sends = initiator.start()
    deliver(initiator, sends)
    message: bytes | None = first
    round_trips = 0
    side, other = responder, initiator
    while message is not None:
        if side is responder:
            round_trips += 1
        message, sends = side.receive(message)
        deliver(side, sends)
        side, other = other, side
    return round_trips
