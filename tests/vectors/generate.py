"""Writes tests/vectors/records.json, the golden vectors of docs/format.md.

Run only when the format deliberately changes (then bump the format version):
    python tests/vectors/generate.py
tests/test_vectors.py checks that the code still reproduces every vector.
"""

from __future__ import annotations

import json
import pathlib

import stemedb
from stemedb import Assertion, Epoch, Ref, Vote

SEED = bytes(range(32))
SIGNER = stemedb.Signer.from_seed(SEED)
T = 1_700_000_000_000_000


def cases() -> list[tuple[str, dict, object]]:
    """(name, JSON description of the inputs, unsigned record)."""
    base = Assertion("aspirin", "treats", Ref("headache"), confidence=0.75, timestamp=T,
                     source_class="clinical", lifecycle="approved")
    epoch_2024 = Epoch("guidelines-2024", "first edition", timestamp=T)
    out: list[tuple[str, dict, object]] = [
        ("assertion-reference", {"subject": "aspirin", "predicate": "treats",
                                 "object": {"ref": "headache"}, "confidence": 0.75,
                                 "timestamp": T, "source_class": "clinical",
                                 "lifecycle": "approved"}, base),
        ("assertion-text", {"subject": "paris", "predicate": "capital_of", "object": "France",
                            "timestamp": T}, Assertion("paris", "capital_of", "France", timestamp=T)),
        ("assertion-number", {"subject": "water", "predicate": "boils_at_c", "object": 100.0,
                              "confidence": 0.5, "timestamp": T, "source_class": "regulatory"},
         Assertion("water", "boils_at_c", 100.0, confidence=0.5, timestamp=T,
                   source_class="regulatory")),
        ("assertion-boolean", {"subject": "earth", "predicate": "is_flat", "object": False,
                               "confidence": 0.0, "timestamp": T, "source_class": "anecdotal",
                               "lifecycle": "rejected"},
         Assertion("earth", "is_flat", False, confidence=0.0, timestamp=T,
                   source_class="anecdotal", lifecycle="rejected")),
        ("assertion-bytes-optional", {"subject": "日本", "predicate": "flag_png",
                                      "object": {"bytes": "89504e47"}, "timestamp": T,
                                      "source_hash": "11" * 32, "parent_hash": base.id.hex(),
                                      "epoch": epoch_2024.id.hex(), "visual_hash": "0102030405060708",
                                      "vector": [0.5, -1.25, 3.0]},
         Assertion("日本", "flag_png", b"\x89PNG", timestamp=T, source_hash=b"\x11" * 32,
                   parent_hash=base.id, epoch=epoch_2024.id, visual_hash=bytes(range(1, 9)),
                   vector=[0.5, -1.25, 3.0])),
        ("vote", {"assertion_id": base.id.hex(), "weight": 0.5, "timestamp": T},
         Vote(base.id, 0.5, timestamp=T)),
        ("epoch", {"name": "guidelines-2024", "description": "first edition", "timestamp": T},
         epoch_2024),
        ("epoch-supersedes", {"name": "guidelines-2025", "description": "", "timestamp": T + 1,
                              "supersedes": [epoch_2024.id.hex()], "supersession_kind": "refines"},
         Epoch("guidelines-2025", supersedes=[epoch_2024], supersession_kind="refines",
               timestamp=T + 1)),
    ]
    return out


def build() -> dict:
    vectors = []
    unsigned = []
    for name, inputs, record in cases():
        signed = record.sign(SIGNER)
        unsigned.append(record)
        vectors.append({
            "name": name,
            "kind": type(record).__name__.lower(),
            "inputs": inputs,
            "unsigned_encoded_hex": record.encode().hex(),
            "unsigned_id_hex": record.id.hex(),
            "content_hex": signed.content().hex(),
            "encoded_hex": signed.encode().hex(),
            "id_hex": signed.id.hex(),
            "signature_hex": signed.signatures[0][1].hex(),
        })
    members, envelope = SIGNER.sign_batch(unsigned[:3], timestamp=T)
    batch = {
        "name": "envelope",
        "members_encoded_hex": [m.encode().hex() for m in members],
        "member_ids_hex": [m.id.hex() for m in members],
        "envelope_encoded_hex": envelope.encode().hex(),
        "envelope_id_hex": envelope.id.hex(),
    }
    return {
        "format_version": 1,
        "signer_seed_hex": SEED.hex(),
        "signer_public_key_hex": SIGNER.public_key.hex(),
        "note": "Ed25519 over the 32-byte ID; IDs are BLAKE3-256 of the content (docs/format.md)",
        "records": vectors,
        "signed_batch": batch,
    }


if __name__ == "__main__":
    path = pathlib.Path(__file__).with_name("records.json")
    path.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
