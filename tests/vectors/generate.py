"""Writes tests/vectors/records.json, the golden record vectors of docs/format.md.

Run only when the format deliberately changes (then bump the format version):
    python tests/vectors/generate.py

Every byte is built here with `struct` from the tables of docs/format.md; IDs
come from the `blake3` package and signatures from libsodium (PyNaCl). This
file does not import stemedb, so the vectors are not the code checking itself:
tests/test_vectors.py builds each record with stemedb from the same inputs and
requires the same bytes, and decodes the bytes back to the same fields.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Any

import blake3
import nacl.bindings

SEED = bytes(range(32))
COSIGNER_SEED = b"\x42" * 32
T = 1_700_000_000_000_000

VERSION = 1
VOTE_VERSION = 2           # a vote that carries the subject of the assertion it votes on
ASSERTION, VOTE, EPOCH, ENVELOPE = 1, 2, 3, 4
SOURCE_CLASSES = ["regulatory", "clinical", "peer_reviewed", "observational", "expert", "community",
                  "anecdotal"]
LIFECYCLES = ["proposed", "under_review", "approved", "deprecated", "rejected"]
SUPERSESSION = ["replaces", "refines", "retracts"]
TEXT, NUMBER, BOOLEAN, REFERENCE, BYTES = 1, 2, 3, 4, 5
UNSIGNED, SIGNATURES, IN_ENVELOPE = 0, 1, 2


def keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(public key, libsodium secret key) of an Ed25519 seed."""
    public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
    return public, secret


def sign(secret: bytes, message: bytes) -> bytes:
    return nacl.bindings.crypto_sign(message, secret)[:64]  # signed message = signature ‖ message


def u16_text(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def u32_text(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def content(kind: int, signers: list[bytes], body: bytes, version: int = VERSION) -> bytes:
    """header (version, kind, content_length) ‖ signers ‖ body."""
    signer_part = struct.pack("<B", len(signers)) + b"".join(signers)
    length = 6 + len(signer_part) + len(body)
    return struct.pack("<BBI", version, kind, length) + signer_part + body


def object_value(value: Any) -> bytes:
    """object_tag ‖ object_value for a JSON description of the object."""
    if isinstance(value, bool):
        return struct.pack("<BB", BOOLEAN, int(value))
    if isinstance(value, (int, float)):
        return struct.pack("<Bd", NUMBER, float(value) + 0.0)  # + 0.0: -0.0 is written as +0.0
    if isinstance(value, str):
        return struct.pack("<B", TEXT) + u32_text(value)
    if "ref" in value:
        return struct.pack("<B", REFERENCE) + u16_text(value["ref"])
    raw = bytes.fromhex(value["bytes"])
    return struct.pack("<BI", BYTES, len(raw)) + raw


def assertion_body(fields: dict[str, Any]) -> bytes:
    body = u16_text(fields["subject"]) + u16_text(fields["predicate"]) + object_value(fields["object"])
    body += struct.pack("<fQBB", fields["confidence"] + 0.0, fields["timestamp"],
                        SOURCE_CLASSES.index(fields["source_class"]), LIFECYCLES.index(fields["lifecycle"]))
    body += bytes.fromhex(fields["source_hash"])
    mask, optional = 0, b""
    if "parent_hash" in fields:
        mask |= 1
        optional += bytes.fromhex(fields["parent_hash"])
    if "epoch" in fields:
        mask |= 2
        optional += bytes.fromhex(fields["epoch"])
    if "visual_hash" in fields:
        mask |= 4
        optional += bytes.fromhex(fields["visual_hash"])
    if "vector" in fields:
        mask |= 8
        optional += struct.pack(f"<H{len(fields['vector'])}f", len(fields["vector"]), *fields["vector"])
    return body + struct.pack("<B", mask) + optional


def vote_body(fields: dict[str, Any]) -> bytes:
    body = bytes.fromhex(fields["assertion_id"]) + struct.pack("<fQ", fields["weight"] + 0.0, fields["timestamp"])
    if "subject" in fields:      # version 2: subject_len:u16 subject
        body += u16_text(fields["subject"])
    return body


def version_of(kind: str, inputs: dict[str, Any]) -> int:
    """The header's version: 2 for a vote that carries its assertion's subject, else 1."""
    return VOTE_VERSION if kind == "vote" and "subject" in inputs else VERSION


def epoch_body(fields: dict[str, Any]) -> bytes:
    supersedes = [bytes.fromhex(h) for h in fields["supersedes"]]
    return (u16_text(fields["name"]) + u32_text(fields["description"])
            + struct.pack("<QBH", fields["timestamp"], SUPERSESSION.index(fields["supersession_kind"]),
                          len(supersedes))
            + b"".join(supersedes))


def envelope_body(timestamp: int, members: list[bytes]) -> bytes:
    return struct.pack("<QI", timestamp, len(members)) + b"".join(members)


BODIES = {"assertion": (ASSERTION, assertion_body), "vote": (VOTE, vote_body), "epoch": (EPOCH, epoch_body)}


def signature_proof(record_id: bytes, secrets: list[bytes]) -> tuple[bytes, list[bytes]]:
    """proof_kind 1: every declared signer signs the ID, in signer-index order."""
    signatures = [sign(secret, record_id) for secret in secrets]
    proof = struct.pack("<BB", SIGNATURES, len(signatures))
    for index, signature in enumerate(signatures):
        proof += struct.pack("<B", index) + signature
    return proof, signatures


def assertion(**fields: Any) -> dict[str, Any]:
    """An assertion's inputs with every field explicit (the values docs/format.md gives as 'none')."""
    return {"confidence": 1.0, "source_class": "observational", "lifecycle": "proposed",
            "source_hash": "00" * 32, **fields}


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, inputs): the fields of each vector, as docs/format.md names them."""
    base = assertion(subject="aspirin", predicate="treats", object={"ref": "headache"}, confidence=0.75,
                     timestamp=T, source_class="clinical", lifecycle="approved")
    epoch_2024 = {"name": "guidelines-2024", "description": "first edition", "timestamp": T,
                  "supersession_kind": "replaces", "supersedes": []}
    base_id = record_id("assertion", base, [])  # the unsigned draft's ID, as the vectors always had
    epoch_2024_id = record_id("epoch", epoch_2024, [])
    return [
        ("assertion-reference", "assertion", base),
        ("assertion-text", "assertion", assertion(subject="paris", predicate="capital_of", object="France",
                                                  timestamp=T)),
        ("assertion-number", "assertion", assertion(subject="water", predicate="boils_at_c", object=100.0,
                                                    confidence=0.5, timestamp=T, source_class="regulatory")),
        ("assertion-boolean", "assertion", assertion(subject="earth", predicate="is_flat", object=False,
                                                     confidence=0.0, timestamp=T, source_class="anecdotal",
                                                     lifecycle="rejected")),
        ("assertion-bytes-optional", "assertion", assertion(
            subject="日本", predicate="flag_png", object={"bytes": "89504e47"}, timestamp=T,
            source_hash="11" * 32, parent_hash=base_id.hex(), epoch=epoch_2024_id.hex(),
            visual_hash="0102030405060708", vector=[0.5, -1.25, 3.0])),
        ("assertion-negative-zero", "assertion", assertion(subject="t", predicate="delta", object=-0.0,
                                                           confidence=-0.0, timestamp=0,
                                                           lifecycle="under_review", source_class="expert")),
        ("vote", "vote", {"assertion_id": base_id.hex(), "weight": 0.5, "timestamp": T}),
        ("vote-v2", "vote", {"assertion_id": base_id.hex(), "weight": -1.0, "timestamp": T + 2,
                             "subject": "aspirin"}),
        ("vote-v2-utf8", "vote", {"assertion_id": base_id.hex(), "weight": 1.0, "timestamp": T,
                                  "subject": "日本"}),
        ("epoch", "epoch", epoch_2024),
        ("epoch-supersedes", "epoch", {"name": "guidelines-2025", "description": "", "timestamp": T + 1,
                                       "supersedes": [epoch_2024_id.hex()], "supersession_kind": "refines"}),
    ]


def record_id(kind: str, inputs: dict[str, Any], signers: list[bytes]) -> bytes:
    code, body = BODIES[kind]
    return blake3.blake3(content(code, signers, body(inputs), version_of(kind, inputs))).digest()


def build() -> dict[str, Any]:
    public, secret = keypair(SEED)
    co_public, co_secret = keypair(COSIGNER_SEED)
    vectors = []
    for name, kind, inputs in cases():
        code, body = BODIES[kind]
        version = version_of(kind, inputs)
        unsigned = content(code, [], body(inputs), version)
        signed = content(code, [public], body(inputs), version)
        signed_id = blake3.blake3(signed).digest()
        proof, (signature,) = signature_proof(signed_id, [secret])
        vectors.append({
            "name": name,
            "kind": kind,
            "inputs": inputs,
            "unsigned_encoded_hex": (unsigned + struct.pack("<B", UNSIGNED)).hex(),
            "unsigned_id_hex": blake3.blake3(unsigned).digest().hex(),
            "content_hex": signed.hex(),
            "encoded_hex": (signed + proof).hex(),
            "id_hex": signed_id.hex(),
            "signature_hex": signature.hex(),
        })
    # Co-signed: two declared signers, both signatures, ascending signer index.
    _, kind, inputs = cases()[1]
    cosigned = content(ASSERTION, [public, co_public], assertion_body(inputs))
    cosigned_id = blake3.blake3(cosigned).digest()
    proof, signatures = signature_proof(cosigned_id, [secret, co_secret])
    cosigned_vector = {
        "name": "assertion-cosigned", "kind": kind, "inputs": inputs,
        "signer_public_keys_hex": [public.hex(), co_public.hex()],
        "content_hex": cosigned.hex(), "encoded_hex": (cosigned + proof).hex(),
        "id_hex": cosigned_id.hex(), "signatures_hex": [s.hex() for s in signatures],
    }
    # A signed batch: the first three cases as members of one envelope by the signer.
    member_contents = [bytes.fromhex(v["content_hex"]) for v in vectors[:3]]
    member_ids = [blake3.blake3(c).digest() for c in member_contents]
    envelope_content = content(ENVELOPE, [public], envelope_body(T, member_ids))
    envelope_id = blake3.blake3(envelope_content).digest()
    envelope_proof, _ = signature_proof(envelope_id, [secret])
    batch = {
        "name": "envelope",
        "timestamp": T,
        "members_encoded_hex": [(c + struct.pack("<B", IN_ENVELOPE) + envelope_id).hex() for c in member_contents],
        "member_ids_hex": [i.hex() for i in member_ids],
        "envelope_encoded_hex": (envelope_content + envelope_proof).hex(),
        "envelope_id_hex": envelope_id.hex(),
    }
    return {
        "format_version": VERSION,
        "signer_seed_hex": SEED.hex(),
        "signer_public_key_hex": public.hex(),
        "cosigner_seed_hex": COSIGNER_SEED.hex(),
        "note": ("built with struct from docs/format.md, without stemedb; Ed25519 over the 32-byte ID; "
                 "IDs are BLAKE3-256 of the content"),
        "records": vectors,
        "cosigned": cosigned_vector,
        "signed_batch": batch,
    }


if __name__ == "__main__":
    path = pathlib.Path(__file__).with_name("records.json")
    path.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
