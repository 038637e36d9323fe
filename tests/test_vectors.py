"""The golden record vectors in tests/vectors/records.json, built without stemedb, against the code.

tests/vectors/generate.py builds every byte with `struct` from docs/format.md
(IDs with the `blake3` package, signatures with libsodium). Here stemedb
builds the same records from the vectors' inputs and must produce exactly
those bytes, decode them back to the same records, and accept their proofs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import re
from typing import Any

import blake3
import nacl.bindings
import pytest

import stemedb
from stemedb import _reference as reference

HERE = pathlib.Path(__file__).parent
VECTORS = json.loads((HERE / "vectors" / "records.json").read_text())
SIGNER = stemedb.Signer.from_seed(bytes.fromhex(VECTORS["signer_seed_hex"]))
COSIGNER = stemedb.Signer.from_seed(bytes.fromhex(VECTORS["cosigner_seed_hex"]))
BY_NAME = {vector["name"]: vector for vector in VECTORS["records"]}


def from_inputs(kind: str, inputs: dict[str, Any], signers: tuple[bytes, ...] = ()) -> Any:
    """The stemedb record a vector's inputs describe (field names as in docs/format.md)."""
    if kind == "vote":
        return stemedb.Vote(bytes.fromhex(inputs["assertion_id"]), inputs["weight"],
                            timestamp=inputs["timestamp"], signers=signers, subject=inputs.get("subject"))
    if kind == "epoch":
        return stemedb.Epoch(inputs["name"], inputs["description"], timestamp=inputs["timestamp"],
                             supersedes=[bytes.fromhex(h) for h in inputs["supersedes"]],
                             supersession_kind=inputs["supersession_kind"], signers=signers)
    value = inputs["object"]
    if isinstance(value, dict):
        value = stemedb.Ref(value["ref"]) if "ref" in value else bytes.fromhex(value["bytes"])
    optional = {name: bytes.fromhex(inputs[name]) for name in ("parent_hash", "epoch", "visual_hash")
                if name in inputs}
    if "vector" in inputs:
        optional["vector"] = inputs["vector"]
    return stemedb.Assertion(inputs["subject"], inputs["predicate"], value, confidence=inputs["confidence"],
                             timestamp=inputs["timestamp"], source_class=inputs["source_class"],
                             lifecycle=inputs["lifecycle"], source_hash=bytes.fromhex(inputs["source_hash"]),
                             signers=signers, **optional)


def test_the_generator_does_not_use_stemedb():
    tree = ast.parse((HERE / "vectors" / "generate.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "stemedb" not in imported and {"struct", "blake3"} <= imported


def test_the_generator_reproduces_the_file():
    spec = importlib.util.spec_from_file_location("vector_generator", HERE / "vectors" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == VECTORS


def test_vectors_check_without_stemedb():
    """What a third-party implementation does: find the content, hash it, verify the signature."""
    public = bytes.fromhex(VECTORS["signer_public_key_hex"])
    for vector in VECTORS["records"]:
        content = bytes.fromhex(vector["content_hex"])
        encoded = bytes.fromhex(vector["encoded_hex"])
        assert encoded.startswith(content) and encoded[len(content)] == 1  # proof_kind signatures
        assert int.from_bytes(content[2:6], "little") == len(content)
        assert content[6] == 1 and content[7:39] == public  # one signer
        record_id = blake3.blake3(content).digest()
        assert record_id.hex() == vector["id_hex"], vector["name"]
        signature = bytes.fromhex(vector["signature_hex"])
        assert encoded[len(content) + 1:] == bytes([1, 0]) + signature  # count 1, signer index 0
        nacl.bindings.crypto_sign_open(signature + record_id, public)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_code_builds_the_vector_bytes_from_the_inputs(name):
    vector = BY_NAME[name]
    draft = from_inputs(vector["kind"], vector["inputs"])
    assert draft.encode().hex() == vector["unsigned_encoded_hex"]
    assert draft.id.hex() == vector["unsigned_id_hex"]
    signed = draft.sign(SIGNER)
    assert signed.content().hex() == vector["content_hex"]
    assert signed.encode().hex() == vector["encoded_hex"]
    assert signed.id.hex() == vector["id_hex"]
    assert reference.encode(signed).hex() == vector["encoded_hex"]  # the plain-Python encoder too


@pytest.mark.parametrize("name", list(BY_NAME))
def test_code_decodes_the_vector_bytes_to_the_inputs(name):
    vector = BY_NAME[name]
    decoded = stemedb.decode(bytes.fromhex(vector["encoded_hex"]))
    decoded.verify()
    assert decoded == from_inputs(vector["kind"], vector["inputs"]).sign(SIGNER)
    assert decoded.signers == (SIGNER.public_key,) and decoded.id.hex() == vector["id_hex"]
    inputs = vector["inputs"]
    if vector["kind"] == "assertion":
        assert (decoded.subject, decoded.predicate, decoded.timestamp) == (
            inputs["subject"], inputs["predicate"], inputs["timestamp"])
        assert decoded.confidence == inputs["confidence"]
    assert stemedb.decode(bytes.fromhex(vector["unsigned_encoded_hex"])).signers == ()


def test_a_version_2_vote_vector_names_its_assertions_subject():
    """The v2 vote vectors: version byte 2, the v1 body, then subject_len:u16 and the subject."""
    base = BY_NAME["assertion-reference"]
    for name in ("vote-v2", "vote-v2-utf8"):
        vector = BY_NAME[name]
        content = bytes.fromhex(vector["content_hex"])
        subject = vector["inputs"]["subject"].encode()
        assert content[0] == 2 and content[1] == 2
        assert content.endswith(len(subject).to_bytes(2, "little") + subject)
        assert content[39:71] == bytes.fromhex(base["unsigned_id_hex"])
        assert stemedb.decode(bytes.fromhex(vector["encoded_hex"])).subject == vector["inputs"]["subject"]
    # On the assertion object itself (its unsigned draft is what the vote names), the vote is version 2.
    draft = from_inputs("assertion", base["inputs"])
    inputs = BY_NAME["vote-v2"]["inputs"]
    on_object = stemedb.Vote(draft, inputs["weight"], timestamp=inputs["timestamp"])
    assert on_object.encode().hex() == BY_NAME["vote-v2"]["unsigned_encoded_hex"]
    assert BY_NAME["vote"]["content_hex"][:2] == "01"


def test_negative_zero_is_written_as_positive_zero():
    vector = BY_NAME["assertion-negative-zero"]
    content = bytes.fromhex(vector["content_hex"])
    assert b"\x00\x00\x00\x00\x00\x00\x00\x80" not in content  # no f64 -0.0
    assert from_inputs("assertion", vector["inputs"]).sign(SIGNER).encode().hex() == vector["encoded_hex"]


def test_cosigned_vector():
    vector = VECTORS["cosigned"]
    assert [SIGNER.public_key.hex(), COSIGNER.public_key.hex()] == vector["signer_public_keys_hex"]
    draft = from_inputs(vector["kind"], vector["inputs"], (SIGNER.public_key, COSIGNER.public_key))
    both = draft.sign(SIGNER).sign(COSIGNER)
    assert both.encode().hex() == vector["encoded_hex"] and both.id.hex() == vector["id_hex"]
    decoded = stemedb.decode(bytes.fromhex(vector["encoded_hex"]))
    decoded.verify()
    assert [s.hex() for _, s in decoded.signatures] == vector["signatures_hex"]
    record_id = bytes.fromhex(vector["id_hex"])
    for key, signature in zip(vector["signer_public_keys_hex"], vector["signatures_hex"]):
        nacl.bindings.crypto_sign_open(bytes.fromhex(signature) + record_id, bytes.fromhex(key))
    with pytest.raises(stemedb.SignatureError, match="has not signed"):
        draft.sign(SIGNER).verify()


def test_signed_batch_vector():
    batch = VECTORS["signed_batch"]
    drafts = [from_inputs(v["kind"], v["inputs"]) for v in VECTORS["records"][:3]]
    members, envelope = SIGNER.sign_batch(drafts, timestamp=batch["timestamp"])
    assert envelope.encode().hex() == batch["envelope_encoded_hex"]
    assert [m.encode().hex() for m in members] == batch["members_encoded_hex"]
    decoded = stemedb.decode(bytes.fromhex(batch["envelope_encoded_hex"]))
    decoded_members = [stemedb.decode(bytes.fromhex(h)) for h in batch["members_encoded_hex"]]
    stemedb.verify_batch(decoded, decoded_members)
    assert decoded.id.hex() == batch["envelope_id_hex"]
    assert [m.id.hex() for m in decoded_members] == batch["member_ids_hex"]
    assert [m.envelope for m in decoded_members] == [decoded.id] * 3


def test_the_worked_example_of_docs_format_is_the_first_vector():
    docs = (HERE.parent / "docs" / "format.md").read_text()
    example = docs[docs.index("### Worked example"):docs.index("### Why this shape")]
    vector = BY_NAME["assertion-reference"]
    long_hex = re.findall(r"\b[0-9a-f]{64}\b", example)
    assert SIGNER.public_key.hex() in long_hex and vector["id_hex"] in long_hex
    signature_lines = [h for h in long_hex if h not in (SIGNER.public_key.hex(), vector["id_hex"])]
    assert "".join(signature_lines) == vector["signature_hex"]
    assert f"content_length {len(bytes.fromhex(vector['content_hex']))}" in example
