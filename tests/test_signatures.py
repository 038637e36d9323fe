"""Ed25519 signing, multi-signature, envelopes (signed batches)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SIGNERS, signed_records

import stemedb
from stemedb import Assertion, Signer
from stemedb.records import _verify_one

# RFC 8032, section 7.1, tests 1-3: (secret seed, public key, message, signature)
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("seed, public, message, signature", RFC8032)
def test_rfc8032_vectors(seed, public, message, signature):
    signer = Signer.from_seed(bytes.fromhex(seed))
    assert signer.public_key.hex() == public
    assert signer.sign_id(bytes.fromhex(message)).hex() == signature
    _verify_one(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature), "vector")
    forged = bytearray.fromhex(signature)
    forged[0] ^= 1
    with pytest.raises(stemedb.SignatureError):
        _verify_one(bytes.fromhex(public), bytes.fromhex(message), bytes(forged), "vector")


def test_sign_and_verify():
    signer = SIGNERS[0]
    a = Assertion("s", "p", "o", timestamp=1)
    signed = a.sign(signer)
    assert signed.signers == (signer.public_key,)
    assert signed.is_signed and not a.is_signed
    signed.verify()
    assert stemedb.decode(signed.encode()) == signed
    stemedb.decode(signed.encode()).verify()


def test_unsigned_record_does_not_verify():
    with pytest.raises(stemedb.SignatureError, match="unsigned"):
        Assertion("s", "p", "o").verify()


def test_multi_signature_with_declared_cosigners():
    a, b = SIGNERS[0], SIGNERS[1]
    draft = Assertion("s", "p", "o", timestamp=1, signers=[a.public_key, b.public_key])
    half = draft.sign(a)
    with pytest.raises(stemedb.SignatureError, match="has not signed"):
        half.verify()
    both = half.sign(b)
    both.verify()
    assert both.id == draft.id
    assert [k for k, _ in both.signatures] == [a.public_key, b.public_key]
    assert both.sign(b) == both  # signing again by the same key is idempotent


def test_adding_an_undeclared_signer_after_signing_is_refused():
    signed = Assertion("s", "p", "o", timestamp=1).sign(SIGNERS[0])
    with pytest.raises(stemedb.SignatureError, match="declare all co-signers"):
        signed.sign(SIGNERS[1])


@given(signed_records(), st.data())
def test_any_signature_change_is_caught(record, data):
    entries = list(record._signature_entries)
    which = data.draw(st.integers(min_value=0, max_value=len(entries) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=63))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    index, signature = entries[which]
    mutated = bytearray(signature)
    mutated[byte] ^= 1 << bit
    entries[which] = (index, bytes(mutated))
    tampered = record._with_proof(record.signers, entries, None)
    assert tampered.id == record.id  # signatures are outside the ID
    with pytest.raises(stemedb.SignatureError):
        tampered.verify()
    with pytest.raises(stemedb.SignatureError):
        stemedb.decode(tampered.encode()).verify()


def test_signature_from_another_key_is_caught():
    a = Assertion("s", "p", "o", timestamp=1).sign(SIGNERS[0])
    wrong = SIGNERS[1].sign_id(a.id)
    with pytest.raises(stemedb.SignatureError, match="bad signature"):
        a._with_proof(a.signers, [(0, wrong)], None).verify()


def test_signed_batch():
    signer = SIGNERS[0]
    records = [Assertion("s", "p", i, timestamp=i) for i in range(100)]
    members, envelope = signer.sign_batch(records)
    stemedb.verify_batch(envelope, members)
    assert envelope.signer == signer.public_key
    assert envelope.member_count == 100
    assert all(m.envelope == envelope.id for m in members)
    # the same claim has the same ID however it was signed
    assert members[3].id == records[3].sign(signer).id
    # a member's own verify() points at the envelope
    with pytest.raises(stemedb.SignatureError, match="verify_batch"):
        members[0].verify()
    assert stemedb.decode(members[5].encode()) == members[5]


def test_verify_batch_names_the_first_bad_member():
    signer = SIGNERS[0]
    members, envelope = signer.sign_batch([Assertion("s", "p", i, timestamp=i) for i in range(5)])
    outsider_members, _ = signer.sign_batch([Assertion("s", "p", 99, timestamp=99)])
    forged = outsider_members[0]._with_proof(forged_signers := (signer.public_key,), (), envelope.id)
    assert forged_signers
    with pytest.raises(stemedb.SignatureError, match=r"members\[2\].*not listed"):
        stemedb.verify_batch(envelope, members[:2] + [forged] + members[2:])
    other_members, other_envelope = SIGNERS[1].sign_batch([Assertion("s", "p", 1, timestamp=1)])
    with pytest.raises(stemedb.SignatureError, match=r"members\[0\]"):
        stemedb.verify_batch(envelope, other_members)


def test_verify_batch_catches_a_bad_envelope_signature():
    members, envelope = SIGNERS[0].sign_batch([Assertion("s", "p", 1, timestamp=1)])
    (index, signature), = envelope._signature_entries
    bad = envelope._with_proof(envelope.signers, [(index, bytes(64))], None)
    with pytest.raises(stemedb.SignatureError, match="bad signature"):
        stemedb.verify_batch(bad, members)


def test_sign_batch_refuses_records_of_other_signers():
    signed = Assertion("s", "p", 1).sign(SIGNERS[1])
    with pytest.raises(stemedb.SignatureError, match="other signers"):
        SIGNERS[0].sign_batch([signed])
    with pytest.raises(stemedb.InvalidRecord, match="at least one member"):
        SIGNERS[0].sign_batch([])


def test_generated_signers_differ_and_seed_round_trips():
    one, two = Signer.generate(), Signer.generate()
    assert one.public_key != two.public_key
    assert Signer.from_seed(one.seed).public_key == one.public_key
    with pytest.raises(ValueError, match="seed"):
        Signer.from_seed(b"short")


def test_verify_many_names_the_first_bad_record():
    records = [Assertion("s", "p", i, timestamp=i).sign(SIGNERS[i % 2]) for i in range(6)]
    stemedb.verify_many(records)
    stemedb.verify_many([])
    forged = records[3]._with_proof(records[3].signers, ((0, bytes(64)),), None)
    unsigned = Assertion("s", "p", 99, timestamp=99)
    with pytest.raises(stemedb.SignatureError, match=r"^records\[3\]: "):
        stemedb.verify_many([*records[:3], forged, *records[4:], unsigned])
    with pytest.raises(stemedb.SignatureError, match=r"^records\[6\]: "):
        stemedb.verify_many([*records, unsigned])
    # A record signed by one key but declaring another does not pass either.
    swapped = records[0]._with_proof((SIGNERS[1].public_key,), records[0].signatures, None)
    with pytest.raises(stemedb.SignatureError, match=r"^records\[1\]: "):
        stemedb.verify_many([records[1], swapped])
