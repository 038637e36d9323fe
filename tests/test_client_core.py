"""The clients' protocol core without I/O (stemedb.client._core): bytes in, events out.

No socket, thread or event loop here: frames are built as bytes, fed to
the core, and what it says finished is checked — the same core the blocking
(socket) and async (anyio) drivers run.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from stemedb import _protocol
from stemedb.client._core import ClientCore
from stemedb.errors import AuthError, ConnectionLost, InvalidRequest, ProtocolError, RateLimited

VECTORS = {v["name"]: v for v in json.loads(
    (pathlib.Path(__file__).resolve().parent / "vectors" / "protocol.json").read_text())["vectors"]}


def answer(opcode: int, request_id: int, payload: bytes, *, more: bool = False) -> bytes:
    flags = _protocol.RESPONSE | (_protocol.MORE if more else 0)
    return bytes(_protocol.frame_header(opcode, flags, request_id, len(payload))) + payload


def error(request_id: int, code: int, message: str = "no") -> bytes:
    return answer(_protocol.ERROR, request_id, _protocol.encode_error(code, 250, message))


def ready() -> ClientCore:
    core = ClientCore("example-token-0123456789", "stemedb-python")
    assert core.receive_hello(bytes.fromhex(VECTORS["hello-response"]["hex"])) is not None
    return core


def test_the_handshake_is_the_vectors_bytes_and_may_arrive_a_byte_at_a_time():
    core = ClientCore("example-token-0123456789", "stemedb-python")
    assert core.hello() == bytes.fromhex(VECTORS["hello-request-with-token"]["hex"])
    response = bytes.fromhex(VECTORS["hello-response"]["hex"])
    sessions = [core.receive_hello(response[i:i + 1]) for i in range(len(response))]
    assert sessions[:-1] == [None] * (len(response) - 1)
    session = sessions[-1]
    assert session is not None and (session.version, session.role_name, session.max_frame) == \
        (1, "write", 16 << 20)


def test_a_refused_handshake_raises_its_error():
    core = ClientCore("wrong", "t")
    with pytest.raises(AuthError, match="unknown token"):
        core.receive_hello(error(1, _protocol.E_AUTH_FAILED, "unknown token"))


def test_answers_are_matched_by_request_id_in_any_order():
    core = ready()
    ping, frame = core.request(_protocol.PING, b"a")
    assert frame == bytes(_protocol.frame_header(_protocol.PING, 0, 2, 1)) + b"a"
    get, _ = core.request(_protocol.GET, _protocol.encode_ids([bytes(32)]))
    assert (ping.request_id, get.request_id, core.in_flight) == (2, 3, 2)
    both = answer(_protocol.GET, 3, b"get-answer") + answer(_protocol.PING, 2, b"a")
    finished = core.receive(both[:5]) + core.receive(both[5:])
    assert finished == [get, ping] and get.result() == [b"get-answer"] and ping.result() == [b"a"]
    assert core.in_flight == 0


def test_a_streamed_answer_finishes_with_its_frame_without_more():
    core = ready()
    scan, _ = core.request(_protocol.SCAN, b"")
    ping, _ = core.request(_protocol.PING, b"")
    assert core.receive(answer(_protocol.SCAN, 2, b"one", more=True)) == []
    assert core.receive(answer(_protocol.PING, 3, b"")) == [ping]  # another answer in between
    assert core.receive(answer(_protocol.SCAN, 2, b"two", more=True) + answer(_protocol.SCAN, 2, b"")) == [scan]
    assert scan.result() == [b"one", b"two", b""]


def test_an_error_frame_ends_a_request_with_its_class():
    core = ready()
    limited, _ = core.request(_protocol.PUT, b"")
    bad, _ = core.request(_protocol.QUERY, b"")
    finished = core.receive(error(2, _protocol.E_RATE_LIMITED) + error(3, _protocol.E_INVALID_REQUEST))
    assert finished == [limited, bad]
    with pytest.raises(RateLimited) as refused:
        limited.result()
    assert refused.value.retry_after == 0.25
    with pytest.raises(InvalidRequest):
        bad.result()


def test_a_forgotten_request_drops_its_late_answer():
    core = ready()
    late, _ = core.request(_protocol.PING, b"")
    core.forget(late)
    assert core.receive(answer(_protocol.PING, 2, b"")) == [] and not late.done


def test_request_ids_skip_zero_and_those_in_flight():
    core = ready()
    core._next_id = 0xFFFFFFFF
    last, _ = core.request(_protocol.PING, b"")
    wrapped, _ = core.request(_protocol.PING, b"")
    assert (last.request_id, wrapped.request_id) == (0xFFFFFFFF, 1)
    held, _ = core.request(_protocol.PING, b"")
    core._next_id = held.request_id  # the next id is still in flight: skipped
    following, _ = core.request(_protocol.PING, b"")
    assert following.request_id == held.request_id + 1


def test_a_closing_error_fails_every_pending_request():
    core = ready()
    first, _ = core.request(_protocol.PUT, b"")
    second, _ = core.request(_protocol.GET, b"")
    with pytest.raises(ConnectionLost, match="idle"):
        core.receive(error(0, _protocol.E_TIMEOUT, "idle for 300 s; closing"))
    failed = core.lost(ConnectionLost("the server closed the connection"))
    assert failed == [first, second] and all(isinstance(x.error, ConnectionLost) for x in failed)
    with pytest.raises(ConnectionLost):
        core.request(_protocol.PING, b"")


def test_an_answer_with_another_opcode_is_a_protocol_error():
    core = ready()
    core.request(_protocol.PING, b"")
    with pytest.raises(ProtocolError, match="answered with opcode"):
        core.receive(answer(_protocol.GET, 2, b""))


def test_lost_wraps_any_error_in_connection_lost():
    core = ready()
    pending, _ = core.request(_protocol.PING, b"")
    core.lost(OSError("reset by peer"))
    assert isinstance(pending.error, ConnectionLost) and "reset by peer" in str(pending.error)
