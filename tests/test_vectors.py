"""The golden vectors in tests/vectors/records.json still hold, from the file alone."""

from __future__ import annotations

import json
import pathlib

import blake3
import nacl.bindings

import stemedb
from stemedb import _reference as reference

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "records.json").read_text())


def test_vectors_check_without_stemedb_internals():
    """What a third-party implementation does: hash content, verify signature."""
    public = bytes.fromhex(VECTORS["signer_public_key_hex"])
    for vector in VECTORS["records"]:
        content = bytes.fromhex(vector["content_hex"])
        assert bytes.fromhex(vector["encoded_hex"]).startswith(content)
        assert int.from_bytes(content[2:6], "little") == len(content)
        record_id = blake3.blake3(content).digest()
        assert record_id.hex() == vector["id_hex"], vector["name"]
        signature = bytes.fromhex(vector["signature_hex"])
        nacl.bindings.crypto_sign_open(signature + record_id, public)


def test_code_reproduces_every_vector():
    signer = stemedb.Signer.from_seed(bytes.fromhex(VECTORS["signer_seed_hex"]))
    assert signer.public_key.hex() == VECTORS["signer_public_key_hex"]
    for vector in VECTORS["records"]:
        record = stemedb.decode(bytes.fromhex(vector["encoded_hex"]))
        record.verify()
        assert record.id.hex() == vector["id_hex"]
        assert record.encode().hex() == vector["encoded_hex"]
        assert reference.encode(record).hex() == vector["encoded_hex"]
        unsigned = stemedb.decode(bytes.fromhex(vector["unsigned_encoded_hex"]))
        assert unsigned.id.hex() == vector["unsigned_id_hex"]
        assert unsigned.sign(signer).encode().hex() == vector["encoded_hex"]


def test_generator_from_inputs_reproduces_the_file():
    import importlib.util

    path = pathlib.Path(__file__).parent / "vectors" / "generate.py"
    spec = importlib.util.spec_from_file_location("vector_generator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == VECTORS


def test_signed_batch_vector():
    batch = VECTORS["signed_batch"]
    envelope = stemedb.decode(bytes.fromhex(batch["envelope_encoded_hex"]))
    members = [stemedb.decode(bytes.fromhex(h)) for h in batch["members_encoded_hex"]]
    stemedb.verify_batch(envelope, members)
    assert envelope.id.hex() == batch["envelope_id_hex"]
    assert [m.id.hex() for m in members] == batch["member_ids_hex"]
