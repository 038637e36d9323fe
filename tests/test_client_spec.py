"""docs/protocol.md as a third party reads it: streamed QUERY answers, record sizes,
the JSON Schemas of QUERY options and results checked against real answers, and the
query vector matching what a server answers.
"""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest
from test_server_support import SIGNER, config, record_batch, served

import stemedb
from stemedb import _protocol
from stemedb._codec import MAX_MEMBERS
from stemedb.server import Server

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()
SCHEMAS = ROOT / "docs" / "schemas"
VECTORS = json.loads((ROOT / "tests" / "vectors" / "protocol.json").read_text())


def schema(name: str) -> dict:
    document = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(document)
    return document


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "data") as store:
        yield store


def wide_claims(n: int, size: int) -> list:
    """n signed claims about one pair, each with a text object of `size` bytes."""
    return [stemedb.Assertion("big", "p", f"{i:06d}" + "x" * size, confidence=0.5,
                              timestamp=1_700_000_000_000_000 + i).sign(SIGNER) for i in range(n)]


async def answer_frames(client, request_id: int) -> list[_protocol.Frame]:
    frames = []
    while True:
        frame = await client.frame()
        assert frame is not None and frame.request_id == request_id
        frames.append(frame)
        if frame.opcode == _protocol.ERROR or not frame.more:
            return frames


@pytest.mark.trio
async def test_a_query_answer_larger_than_a_frame_is_streamed(db):
    """50 records of 2 KB against 64 KiB frames: the result first, then record batches."""
    server = Server(db, config(max_frame=65536))
    records = wide_claims(50, 2000)
    async with served(server) as client:
        await client.hello()
        for half in (records[:25], records[25:]):  # each PUT within the 64 KiB frames
            assert (await client.call(_protocol.PUT, record_batch(half))).opcode == _protocol.PUT
        request_id = await client.send(_protocol.QUERY, _protocol.encode_query("big", "p", "consensus", ""))
        frames = await answer_frames(client, request_id)
    assert all(frame.opcode == _protocol.QUERY for frame in frames)
    assert [frame.more for frame in frames] == [True] * (len(frames) - 1) + [False]
    assert len(frames) >= 3 and all(len(frame.payload) <= 65536 for frame in frames)
    text, blob, offsets = _protocol.decode_query_result(frames[0].payload)
    assert len(offsets) == 1  # the result travels alone in the first frame
    received = []
    for frame in frames[1:]:
        blob, offsets = _protocol.decode_record_batch(frame.payload)
        received += stemedb.decode_many(blob, offsets)
    result = json.loads(text)
    assert result["candidates_count"] == 50
    assert {r.id for r in received} == {r.id for r in records}


def test_the_blocking_client_reads_a_streamed_query(tmp_path):
    from test_server_support import background_server

    from stemedb.client import connect
    from stemedb.server import ServerConfig
    from stemedb.server.config import Limits

    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    settings.limits = Limits(max_frame=65536)
    records = wide_claims(50, 2000)
    with background_server(tmp_path / "data", settings) as running, connect(running.url) as client:
        client.put_many(records)
        answer = client.query("big", "p", lens="consensus")
        assert answer.candidates_count == 50 and answer.winner in records
        scanned = list(client.scan("big"))
    assert {c.assertion_id for c in answer.contributions} == {r.id for r in records}
    assert sorted(r.id for r in scanned) == sorted(r.id for r in records)  # frames commit in any order


def test_record_size_figures_in_the_doc_follow_from_the_codec():
    """The largest record is an envelope of MAX_MEMBERS IDs; the doc's figures are computed here."""
    def envelope_size(members: int) -> int:
        ids = [i.to_bytes(32, "little") for i in range(members)]
        return len(stemedb.Envelope(SIGNER.public_key, ids).sign(SIGNER).encode())

    base = envelope_size(1) - 32
    assert envelope_size(3) == base + 3 * 32  # linear in the member count
    largest = base + 32 * MAX_MEMBERS
    default_fit = (_protocol.DEFAULT_MAX_FRAME - 8 - base) // 32
    for figure in (largest, largest + 8, default_fit, _protocol.DEFAULT_MAX_FRAME - 8):
        assert f"{figure:,}" in DOC, figure


OPTION_CASES = [
    "",
    '{"lifecycle": "approved"}',
    '{"lifecycle": ["proposed", 2]}',
    '{"as_of": 1700000000000000, "decay": true}',
    '{"decay": true, "now": 1800000000000000}',
    '{"audit": true}',
    '{"epoch": "' + "00" * 32 + '"}',
]
LENSES = ["", "recency", "confidence", "consensus", "vote_consensus", "authority", "skeptic",
          "epoch_aware", "layered"]


def disputed() -> list:
    other = stemedb.Signer.from_seed(b"\x07" * 32)
    return [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.75,
                          timestamp=1_700_000_000_000_000, source_class="clinical").sign(SIGNER),
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("fever"), confidence=0.5,
                          timestamp=1_700_000_000_000_001, lifecycle="approved").sign(other),
        stemedb.Assertion("aspirin", "dose_mg", 500, timestamp=1_700_000_000_000_002).sign(SIGNER),
        stemedb.Assertion("aspirin", "blob", b"\x00\x01", timestamp=1_700_000_000_000_003).sign(SIGNER),
    ]


@pytest.mark.trio
async def test_real_query_answers_match_the_schemas(db):
    """Every option the options schema allows is accepted, and every answer fits the result schema."""
    options_schema, result_schema = schema("query-options.schema.json"), schema("query-result.schema.json")
    server = Server(db, config())
    checked = 0
    async with served(server) as client:
        await client.hello()
        assert (await client.call(_protocol.PUT, record_batch(disputed()))).opcode == _protocol.PUT
        for options in OPTION_CASES:
            if options:
                jsonschema.validate(json.loads(options), options_schema)
            for lens in LENSES:
                for predicate in ("treats", ""):
                    answer = await client.call(_protocol.QUERY, _protocol.encode_query(
                        "aspirin", predicate, lens, options))
                    assert answer.opcode == _protocol.QUERY, (options, lens, answer)
                    text, _blob, _offsets = _protocol.decode_query_result(answer.payload)
                    result = json.loads(text)
                    jsonschema.validate(result, result_schema)
                    if predicate:
                        assert result["predicate"] == predicate
                    checked += 1
        for lens, parameters in (("epoch_aware", {"inner": {"lens": "consensus", "parameters": {}}}),
                                 ("authority", {"multipliers": {"clinical": 2.0}, "trust": False}),
                                 ("skeptic", {"weighting": "votes"})):
            options = json.dumps({"lens_parameters": parameters})
            jsonschema.validate(json.loads(options), options_schema)
            answer = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "treats", lens, options))
            assert answer.opcode == _protocol.QUERY, (lens, answer)
            result = json.loads(_protocol.decode_query_result(answer.payload)[0])
            jsonschema.validate(result, result_schema)
            assert result["lens"] != lens and result["lens"].startswith(lens + "(")  # parameters applied
            checked += 1
    assert checked == len(OPTION_CASES) * len(LENSES) * 2 + 3


@pytest.mark.trio
async def test_options_outside_the_schema_are_refused(db):
    options_schema = schema("query-options.schema.json")
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        for options in ('{"colour": "red"}', '{"lens": "recency"}', '{"agent": "x"}', '[1]', 'nope',
                        '{"lens_parameters": 3}',
                        '{"lifecycle": "sideways"}', '{"as_of": "yesterday"}', '{"epoch": "abc"}'):
            try:
                jsonschema.validate(json.loads(options), options_schema)
                raise AssertionError(f"the schema accepts {options}")
            except (jsonschema.ValidationError, json.JSONDecodeError):
                pass
            answer = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "treats", "", options))
            assert answer.opcode == _protocol.ERROR, options
            assert _protocol.decode_error(answer.payload)[0] == _protocol.E_INVALID_REQUEST, options


@pytest.mark.trio
async def test_the_query_vector_is_what_a_server_answers(db):
    """The vectors' query-response frame, byte for byte, from a server holding the vector's record."""
    vectors = {vector["name"]: vector for vector in VECTORS["vectors"]}
    request, response = vectors["query-request"], vectors["query-response"]
    record = stemedb.decode(bytes.fromhex(vectors["put-request"]["fields"]["records"][0]))
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        assert (await client.call(_protocol.PUT, record_batch([record]))).opcode == _protocol.PUT
        answer = await client.call(_protocol.QUERY, bytes.fromhex(request["payload"]))
    assert answer.opcode == _protocol.QUERY
    assert json.loads(_protocol.decode_query_result(answer.payload)[0]) == json.loads(response["fields"]["result"])
    assert answer.payload == bytes.fromhex(response["payload"])


def doc_table(heading: str) -> list[list[str]]:
    """The rows (without the header) of the first table after `heading` in docs/protocol.md."""
    lines = DOC[DOC.index(heading):].splitlines()
    rows: list[list[str]] = []
    for line in lines[1:]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:] if heading.startswith("#") else rows  # a "## heading" table: without its header row


def test_the_role_table_matches_the_server():
    from stemedb.server.auth import REQUIRED_ROLE

    rows = {int(row[0]): row for row in doc_table("## Roles")}
    assert {number: row[1].strip("`") for number, row in rows.items()} == dict(enumerate(_protocol.ROLE_NAMES))
    for opcode, role in REQUIRED_ROLE.items():
        name = _protocol.OPCODE_NAMES[opcode].upper()
        lowest = min(number for number, row in rows.items()
                     if re.search(rf"\b{name}\b", row[2]))  # SYNC is not SYNC_WITH
        assert lowest == role, name
    assert "replication" in rows[_protocol.ROLE_ADMIN][2]


def test_the_enum_table_matches_the_code():
    from stemedb.records import Lifecycle, RecordKind, SourceClass, SupersessionKind

    rows = {row[0].split(" (")[0].strip("`"): row[1] for row in doc_table("| enumeration | number")}
    for label, enum in (("record kind", RecordKind), ("source_class", SourceClass),
                        ("lifecycle", Lifecycle), ("supersession_kind", SupersessionKind)):
        spelled = re.findall(r"(\d+) `(\w+)`", rows[label])
        expected = [(str(int(member)), member.name.lower()) for member in enum]
        assert spelled[:len(expected)] == expected, label


def test_the_default_table_matches_the_constructors():
    import inspect

    from stemedb.records import Assertion, Epoch, Vote

    rows = doc_table("| record | field | default |")
    documented = {(row[0], row[1].strip("`")): row[2] for row in rows}
    claim = Assertion("s", "p", 1, timestamp=5)
    assert documented[("Assertion", "confidence")] == str(inspect.signature(Assertion).parameters["confidence"].default)
    assert claim.source_class.name.lower() in documented[("Assertion", "source_class")]
    assert f"({int(claim.source_class)})" in documented[("Assertion", "source_class")]
    assert claim.lifecycle.name.lower() in documented[("Assertion", "lifecycle")]
    assert claim.source_hash == bytes(32) and "32 zero bytes" == documented[("Assertion", "source_hash")]
    assert documented[("Vote", "weight")] == str(Vote(bytes(32), timestamp=1).weight)
    epoch = Epoch("e", timestamp=1)
    assert epoch.description == "" and documented[("Epoch", "description")] == "empty"
    assert epoch.supersession_kind.name.lower() in documented[("Epoch", "supersession_kind")]


def test_the_doc_shows_what_lens_wire_writes():
    from stemedb.lenses import Authority, Consensus, EpochAware, from_wire

    examples = [(EpochAware(inner=Consensus()), "epoch_aware"), (Authority({"clinical": 2.0}, trust=False),
                                                                 "authority")]
    text = " ".join(DOC.split())
    for lens, name in examples:
        wire_name, parameters = lens.wire()
        assert wire_name == name
        assert f'`{name}` with `{json.dumps({"lens_parameters": parameters})}`' in text
        assert from_wire(wire_name, parameters) == lens  # the server rebuilds the same lens
