"""Engine errors through a real server: the wire code, the HTTP status, the client's exception.

A server on loopback serves a Database opened on tests/faults.py's FaultyFiles,
so the disk can fill up (ENOSPC), a sync can fail (EIO) and a test can make a
file call raise what no file layer should. Each case checks the error code in
the ERROR frame on the wire (a raw socket), the exception class the blocking
client raises, the HTTP status and error name of the side door, that nothing
was stored, and that reads keep working where docs/protocol.md says they do.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import pathlib
import socket
from typing import Any

import pytest
from faults import FaultyFiles
from test_server_support import SIGNER, BackgroundServer, background_server, claims, record_batch

import stemedb
from stemedb import _protocol
from stemedb.client import connect
from stemedb.client._wire import error_from_frame
from stemedb.errors import (
    AuthError,
    CorruptionError,
    DatabaseClosed,
    DurabilityError,
    Forbidden,
    InvalidRecord,
    InvalidRequest,
    NotFound,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    SignatureError,
    StemeError,
    StorageFull,
    Unavailable,
    Unsupported,
    refusal,
)
from stemedb.server import ServerConfig

P = _protocol


def settings() -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", http="127.0.0.1:0")


@pytest.fixture
def faulty(tmp_path):
    files = FaultyFiles(tmp_path, sync_for_real=False)
    db = stemedb.open(tmp_path / "data", files=files)
    with background_server(tmp_path / "data", settings(), db=db) as running:
        yield running, files


def wire_call(running: BackgroundServer, opcode: int, payload: bytes) -> tuple[int, int, str] | bytes:
    """One request on a fresh raw connection: (code, retry_ms, message) for an ERROR, else the payload."""
    host, port = running.server.listen_address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(P.encode_frame(P.HELLO, 0, 1, P.encode_hello(1, 1, "raw", "")))
        sock.sendall(P.encode_frame(opcode, 0, 2, payload))
        reader = P.FrameReader(1 << 30, from_server=True)
        while True:
            frame = reader.next()
            if frame is None:
                data = sock.recv(65536)
                assert data, "the server closed the connection without answering"
                reader.feed(data)
                continue
            if frame.request_id != 2:
                continue  # the HELLO answer
            if frame.opcode == P.ERROR:
                return P.decode_error(frame.payload)
            return frame.payload


def http_call(running: BackgroundServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(running.http.removeprefix("http://"), timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=data)
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()
    return response.status, document


def assert_body(records: list[Any]) -> dict[str, Any]:
    return {"records": [r.encode().hex() for r in records]}


def test_disk_full_is_storage_full_and_http_507(faulty):
    running, files = faulty
    stored = claims(1, prefix="kept")[0]
    running.db.put(stored)
    files.fail("pwrite", errno=errno.ENOSPC, times=None)
    refused = claims(3, prefix="full")
    code, _, message = wire_call(running, P.PUT, record_batch(refused))
    assert code == P.E_STORAGE_FULL and "disk full" in message
    with connect(running.url) as client:
        with pytest.raises(StorageFull, match="disk full"):
            client.put_many(refused)
        assert client.get(stored.id) == stored  # reads keep working
    status, answer = http_call(running, "POST", "/v1/assert", assert_body(refused))
    assert (status, answer["error"]) == (507, "storage_full")
    assert len(running.db) == 1 and not any(r.id in running.db for r in refused)
    files.clear()  # space was freed: the same writes now succeed
    with connect(running.url) as client:
        assert client.put_many(refused) == [r.id for r in refused]
    assert running.db.get_many([r.id for r in refused]) == refused


def test_failed_sync_is_durability_and_the_store_refuses_writes(faulty):
    """The HTTP door answers 503: the store is out of service for writes until reopened."""
    running, files = faulty
    stored = claims(1, prefix="kept")[0]
    running.db.put(stored)
    files.fail("fdatasync", errno=errno.EIO)
    lost = claims(2, prefix="unsynced")
    code, _, message = wire_call(running, P.PUT, record_batch(lost))
    assert code == P.E_DURABILITY and "refuses writes until it is closed and reopened" in message
    later = claims(1, prefix="later")
    with connect(running.url) as client:
        with pytest.raises(DurabilityError, match="refuses writes"):
            client.put_many(later)  # the fault fired once; the store stays poisoned
        assert client.get(stored.id) == stored
    status, answer = http_call(running, "POST", "/v1/assert", assert_body(later))
    assert (status, answer["error"]) == (503, "durability")
    status, health = http_call(running, "GET", "/health")
    assert (status, health["status"]) == (503, "failed")
    assert later[0].id not in running.db


def flip_stored_byte(db: stemedb.Database, record: Any) -> None:
    """Damage one byte of `record` in its segment file (reads go through a shared mmap)."""
    encoded = record.encode()
    for path in sorted(pathlib.Path(db.path, "segments").iterdir()):
        content = path.read_bytes()
        at = content.find(encoded)
        if at >= 0:
            fd = os.open(path, os.O_RDWR)
            try:
                middle = at + len(encoded) // 2
                os.pwrite(fd, bytes([content[middle] ^ 0xFF]), middle)
            finally:
                os.close(fd)
            return
    raise AssertionError("record not found in any segment")


def test_damaged_record_is_corruption(faulty):
    running, _files = faulty
    good, damaged = claims(2, prefix="crc")
    running.db.put_many([good, damaged])
    flip_stored_byte(running.db, damaged)
    code, _, message = wire_call(running, P.GET, P.encode_ids([damaged.id]))
    assert code == P.E_CORRUPTION and "fails its checksum" in message and "at offset" in message
    with connect(running.url) as client:
        with pytest.raises(CorruptionError, match="fails its checksum"):
            client.get(damaged.id)
        assert client.get(good.id) == good  # the undamaged record is still served
    status, answer = http_call(running, "GET", f"/v1/records/{damaged.id.hex()}")
    assert (status, answer["error"]) == (500, "corruption")


class ClosedStore:
    """A store that was closed: every method raises DatabaseClosed (as a closed Database does)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._db, name)
        if not callable(value):  # its state (read by Service.encoded_lengths) stays
            return value

        def closed(*_args: Any, **_kwargs: Any) -> Any:
            raise DatabaseClosed(f"{self._db.path}: the database is closed")
        return closed


def check_closed_store_answers(running: BackgroundServer, record: Any) -> None:
    code, _, message = wire_call(running, P.GET, P.encode_ids([record.id]))
    assert code == P.E_UNAVAILABLE and "closed" in message
    with connect(running.url) as client:
        with pytest.raises(Unavailable, match="closed"):
            client.get(record.id)
        with pytest.raises(Unavailable, match="closed"):
            client.put(claims(1, prefix="late")[0])
    status, answer = http_call(running, "GET", f"/v1/records/{record.id.hex()}")
    assert (status, answer["error"]) == (503, "unavailable")


def test_closed_store_is_unavailable_and_http_503(tmp_path):
    """DatabaseClosed travels as `unavailable`, by its class (no message is matched)."""
    with background_server(tmp_path / "data", settings()) as running:
        record = claims(1)[0]
        running.db.put(record)
        running.server.service.db = ClosedStore(running.db)
        check_closed_store_answers(running, record)


def test_a_really_closed_store_is_unavailable(faulty):
    running, _files = faulty
    record = claims(1)[0]
    running.db.put(record)
    running.db.close()
    with pytest.raises(DatabaseClosed):
        running.db.get(record.id)
    check_closed_store_answers(running, record)


def test_unexpected_exception_is_internal_and_hides_its_details(faulty):
    running, files = faulty

    def broken(_files: FaultyFiles, method: str, _number: int, phase: str) -> None:
        if method == "pwrite" and phase == "before":
            raise RuntimeError("secret detail of a bug")

    files.hooks.append(broken)
    refused = claims(2, prefix="bug")
    code, _, message = wire_call(running, P.PUT, record_batch(refused))
    assert code == P.E_INTERNAL and message == "internal error (RuntimeError); see the server log"
    with connect(running.url) as client:
        with pytest.raises(StemeError) as raised:
            client.put_many(refused)
        assert type(raised.value) is StemeError and "secret" not in str(raised.value)
    status, answer = http_call(running, "POST", "/v1/assert", assert_body(refused))
    assert (status, answer["error"]) == (500, "internal") and "secret" not in answer["message"]
    files.hooks.remove(broken)  # closing the store writes a snapshot
    assert not any(r.id in running.db for r in refused)


class MissingRecords:
    """A store whose batch read says a record is gone (as a store with deletions would)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def get_encoded_many(self, ids: Any) -> Any:
        raise NotFound("no record with ID " + bytes(ids[0]).hex())


def test_not_found_from_the_store_is_not_found_on_the_wire(tmp_path):
    with background_server(tmp_path / "data", settings()) as running:
        running.server.service.db = MissingRecords(running.db)
        code, _, message = wire_call(running, P.GET, P.encode_ids([bytes(32)]))
        assert code == P.E_NOT_FOUND and message == "no record with ID " + "00" * 32
        with connect(running.url) as client:
            with pytest.raises(NotFound):
                client.get_many([bytes(32)])
            assert client.ping() > 0  # not a closing error


# Every error class the store or the server raises: its wire code (docs/protocol.md), the
# HTTP status, and the class the client raises for that code.
MAPPING: list[tuple[BaseException, int, int, type[BaseException]]] = [
    (RateLimited("slow down", retry_after=2.0), P.E_RATE_LIMITED, 429, RateLimited),
    (QuotaExceeded("quota", retry_after=2.0), P.E_QUOTA_EXCEEDED, 429, QuotaExceeded),
    (AuthError("no"), P.E_AUTH_FAILED, 401, AuthError),
    (Forbidden("no"), P.E_FORBIDDEN, 403, Forbidden),
    (InvalidRecord("bad field"), P.E_INVALID_RECORD, 400, InvalidRecord),
    (SignatureError("bad signature"), P.E_SIGNATURE, 400, SignatureError),
    (NotFound("absent"), P.E_NOT_FOUND, 404, NotFound),
    (StorageFull("disk full"), P.E_STORAGE_FULL, 507, StorageFull),
    (DurabilityError("fsync failed"), P.E_DURABILITY, 503, DurabilityError),
    (CorruptionError("checksum"), P.E_CORRUPTION, 500, CorruptionError),
    (Unavailable("replica down"), P.E_UNAVAILABLE, 503, Unavailable),
    (DatabaseClosed("/x: the database is closed"), P.E_UNAVAILABLE, 503, Unavailable),
    (ProtocolError("bad bytes"), P.E_PROTOCOL, 400, ProtocolError),
    (InvalidRequest("lens: unknown"), P.E_INVALID_REQUEST, 400, InvalidRequest),
    (Unsupported("not offered"), P.E_UNSUPPORTED, 501, Unsupported),
    # No message is matched: a StemeError that says "closed" is a plain internal error.
    (StemeError("/x: the database is closed"), P.E_INTERNAL, 500, StemeError),
    (StemeError("something else"), P.E_INTERNAL, 500, StemeError),
    (ValueError("a bug"), P.E_INTERNAL, 500, StemeError),
    (KeyError("bug"), P.E_INTERNAL, 500, StemeError),
]


@pytest.mark.parametrize("exc, code, status, client_class", MAPPING,
                         ids=[type(m[0]).__name__ + "-" + str(m[1]) for m in MAPPING])
def test_every_error_maps_to_its_code_status_and_client_exception(exc, code, status, client_class):
    answer = refusal(exc)
    assert (answer.code, answer.http_status, answer.name) == (code, status, P.ERROR_CODES[code][0])
    assert answer.retry_after == (2.0 if isinstance(exc, RateLimited) else 0.0)
    raised = error_from_frame(P.encode_error(answer.code, int(answer.retry_after * 1000), answer.message))
    assert type(raised) is client_class and raised.retry_after == answer.retry_after
    if code == P.E_INTERNAL and not isinstance(exc, StemeError):
        assert str(raised) == f"internal error ({type(exc).__name__}); see the server log"
    else:
        assert str(raised) == str(exc)


def test_signed_vote_and_epoch_refusals_name_the_record(faulty):
    """VOTE with an assertion, EPOCH with a vote: invalid_request, nothing stored (wire and HTTP)."""
    running, _files = faulty
    assertion = claims(1)[0]
    vote = stemedb.Vote(assertion.id, 1.0).sign(SIGNER)
    code, _, message = wire_call(running, P.VOTE, record_batch([assertion]))
    assert code == P.E_INVALID_REQUEST and "records[0]: expected a vote" in message
    code, _, message = wire_call(running, P.EPOCH, record_batch([vote]))
    assert code == P.E_INVALID_REQUEST and "records[0]: expected an epoch, got a vote" in message
    status, answer = http_call(running, "POST", "/v1/epoch", {"encoded": vote.encode().hex()})
    assert (status, answer["error"]) == (400, "invalid_request")
    assert len(running.db) == 0
