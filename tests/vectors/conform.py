"""Replays tests/vectors/conversations.json against a live StemeDB server.

    python tests/vectors/conform.py HOST:PORT [--token TOKEN] [--only NAME] [--timeout S]

Needs only the Python standard library (no stemedb), so it runs anywhere a
server can be reached; a driver written in another language can read the same
JSON and replay it through its own framing code. Each conversation gets a
connection of its own. Prints one line per conversation and exits 0 when every
one passed, 1 otherwise. The token (or $STEMEDB_TOKEN) needs the write role;
without one the server must be in protected mode and reached over loopback.

Steps (docs/protocol.md, "Conformance"):
  {"hello": true}              send HELLO (versions 1..1, the token) as request 1;
                               expect a HELLO answer: version 1, role >= write
  {"send": "<hex>"}            send these bytes (a whole frame)
  {"send": {"opcode", "request_id", "payload_prefix", "payload_repeat", "times"}}
                               a frame whose payload is prefix + repeat × times
  {"expect": {...}}            the next frame: `opcode` (name) and `request_id`,
                               and each of `flags`, `payload` (hex, exact),
                               `error_code`, `error_code_in` that is given
  {"expect_any_order": [...]}  the next frames are these expectations, in any order
  {"expect_stream": {"opcode", "request_id", "records": [hex, ...]}}
                               frames of one streamed answer (MORE on all but the
                               last); their record batches together are `records`
  {"expect_closed": true}      the server closes the connection (frames before the
                               close must not exist)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import struct
import sys
from typing import Any

OPCODES = {"hello": 0x01, "auth": 0x02, "ping": 0x03, "put": 0x10, "get": 0x11, "query": 0x12,
           "scan": 0x13, "vote": 0x14, "epoch": 0x15, "stats": 0x16, "audit": 0x17, "error": 0x7F}
NAMES = {code: name for name, code in OPCODES.items()}
RESPONSE, MORE = 1, 2
ROLE_WRITE = 2
VECTORS = pathlib.Path(__file__).with_name("conversations.json")


class Mismatch(Exception):
    """The server's answer differs from the conversation's expectation."""


class Frame:
    def __init__(self, opcode: int, flags: int, request_id: int, payload: bytes) -> None:
        self.opcode, self.flags, self.request_id, self.payload = opcode, flags, request_id, payload

    def __repr__(self) -> str:
        name = NAMES.get(self.opcode, hex(self.opcode))
        extra = ""
        if self.opcode == OPCODES["error"] and len(self.payload) >= 8:
            code, _retry = struct.unpack_from("<HI", self.payload)
            extra = f" code={code} {self.payload[8:].decode(errors='replace')!r}"
        return f"<{name} flags={self.flags} id={self.request_id} {len(self.payload)} bytes{extra}>"


class Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # a server that closed early shows up when the answer is read

    def frame(self) -> Frame | None:
        """The next frame; None once the server has closed the connection."""
        while True:
            if len(self.buffer) >= 12:
                magic, opcode, flags, request_id, length = struct.unpack_from("<2sBBII", self.buffer)
                if magic != b"SD":
                    raise Mismatch(f"the server sent bad magic {magic!r}")
                if len(self.buffer) >= 12 + length:
                    payload = self.buffer[12:12 + length]
                    self.buffer = self.buffer[12 + length:]
                    if not flags & RESPONSE:
                        raise Mismatch(f"a server frame without the RESPONSE flag: {flags}")
                    return Frame(opcode, flags, request_id, payload)
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                raise Mismatch("no answer within the timeout") from None
            if not data:
                if self.buffer:
                    raise Mismatch(f"the connection closed in the middle of a frame ({len(self.buffer)} bytes)")
                return None
            self.buffer += data

    def close(self) -> None:
        self.sock.close()


def s8(text: str) -> bytes:
    return struct.pack("<B", len(text.encode())) + text.encode()


def s16(text: str) -> bytes:
    return struct.pack("<H", len(text.encode())) + text.encode()


def record_batch(payload: bytes) -> list[bytes]:
    (count,) = struct.unpack_from("<I", payload)
    lengths = struct.unpack_from(f"<{count}I", payload, 4)
    out, at = [], 4 + 4 * count
    for length in lengths:
        out.append(payload[at:at + length])
        at += length
    if at != len(payload):
        raise Mismatch(f"record batch: {len(payload) - at} bytes left after the records")
    return out


def check(frame: Frame | None, expect: dict[str, Any]) -> None:
    if frame is None:
        raise Mismatch(f"the connection closed; expected {expect}")
    want = OPCODES[expect["opcode"]]
    if (frame.opcode, frame.request_id) != (want, expect["request_id"]):
        raise Mismatch(f"expected {expect['opcode']} for request {expect['request_id']}, got {frame}")
    if "flags" in expect and frame.flags != expect["flags"]:
        raise Mismatch(f"{frame}: flags {frame.flags}, expected {expect['flags']}")
    if "payload" in expect and frame.payload != bytes.fromhex(expect["payload"]):
        raise Mismatch(f"{frame}: payload {frame.payload[:200].hex()}…, expected {expect['payload'][:400]}…")
    if "error_code" in expect or "error_code_in" in expect:
        code, _retry = struct.unpack_from("<HI", frame.payload)
        allowed = expect.get("error_code_in", [expect.get("error_code")])
        if code not in allowed:
            raise Mismatch(f"{frame}: error code {code}, expected one of {allowed}")


def hello(conn: Connection, token: str) -> None:
    payload = struct.pack("<HH", 1, 1) + s8("conform") + s16(token)
    conn.send(b"SD" + struct.pack("<BBII", OPCODES["hello"], 0, 1, len(payload)) + payload)
    frame = conn.frame()
    check(frame, {"opcode": "hello", "request_id": 1, "flags": RESPONSE})
    assert frame is not None
    version, role = struct.unpack_from("<HB", frame.payload)
    if version != 1:
        raise Mismatch(f"HELLO answer: version {version}, expected 1")
    if role < ROLE_WRITE:
        raise Mismatch(f"HELLO answer: role {role}; the conversations need the write role "
                       "(give --token, or use a server in protected mode over loopback)")


def send_step(conn: Connection, spec: Any) -> None:
    if isinstance(spec, str):
        conn.send(bytes.fromhex(spec))
        return
    payload = bytes.fromhex(spec["payload_prefix"]) + bytes.fromhex(spec["payload_repeat"]) * spec["times"]
    conn.send(b"SD" + struct.pack("<BBII", OPCODES[spec["opcode"]], 0, spec["request_id"], len(payload))
              + payload)


def run(conversation: dict[str, Any], host: str, port: int, token: str, timeout: float) -> None:
    conn = Connection(host, port, timeout)
    try:
        for step in conversation["steps"]:
            if "hello" in step:
                hello(conn, token)
            elif "send" in step:
                send_step(conn, step["send"])
            elif "expect" in step:
                check(conn.frame(), step["expect"])
            elif "expect_any_order" in step:
                frames = [conn.frame() for _ in step["expect_any_order"]]
                for expect in step["expect_any_order"]:
                    matching = [f for f in frames if f is not None and f.request_id == expect["request_id"]]
                    check(matching[0] if matching else None, expect)
            elif "expect_stream" in step:
                expect = step["expect_stream"]
                received: list[bytes] = []
                while True:
                    frame = conn.frame()
                    check(frame, {"opcode": expect["opcode"], "request_id": expect["request_id"]})
                    assert frame is not None
                    received += record_batch(frame.payload)
                    if not frame.flags & MORE:
                        break
                if [r.hex() for r in received] != expect["records"]:
                    raise Mismatch(f"streamed records differ: got {len(received)}, "
                                   f"expected {len(expect['records'])}")
            elif "expect_closed" in step:
                extra = conn.frame()
                if extra is not None:
                    raise Mismatch(f"expected the connection to close, got {extra}")
            else:
                raise ValueError(f"unknown step {step}")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of a running server")
    parser.add_argument("--token", default=os.environ.get("STEMEDB_TOKEN", ""))
    parser.add_argument("--only", action="append", help="run only this conversation (repeatable)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    parser.add_argument("--vectors", type=pathlib.Path, default=VECTORS)
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"{args.address!r}: expected HOST:PORT")
    document = json.loads(args.vectors.read_text())
    failed = 0
    for conversation in document["conversations"]:
        if args.only and conversation["name"] not in args.only:
            continue
        try:
            run(conversation, host.strip("[]"), int(port), args.token, args.timeout)
        except (Mismatch, OSError) as exc:
            failed += 1
            print(f"FAIL {conversation['name']}: {exc}")
        else:
            print(f"ok   {conversation['name']}")
    print(f"{'FAILED' if failed else 'passed'}: {failed} of {len(document['conversations'])} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
