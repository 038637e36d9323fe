"""Records: Assertion, Vote, Epoch, Envelope; their enums; signing and verification.

Owns: the public record classes (thin Python layers over the compiled cores in
``stemedb._codec``, which hold the fields and the canonical encoding), Ed25519
signing through PyNaCl, and signed batches (envelopes). Must never: touch
storage or the network.

A record's ID is the BLAKE3 of its canonical content. The content includes the
declared signer public keys (a claim is *someone's* claim: the same words from
two agents are two records) but not the signatures or the envelope reference,
so a claim has the same ID however its signer proved it, and a signature can
sign the ID it is not part of.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing
import numpy as np

from stemedb import _codec, _index
from stemedb._codec import Ref
from stemedb.errors import InvalidRecord, SignatureError

__all__ = [
    "Assertion",
    "Vote",
    "Epoch",
    "Envelope",
    "Ref",
    "RecordKind",
    "SourceClass",
    "Lifecycle",
    "SupersessionKind",
    "Signer",
    "decode",
    "decode_many",
    "encode_many",
    "ids_of",
    "verify_batch",
    "check_envelope_members",
    "check_stored_member",
    "verify_many",
    "now_us",
]

ObjectValue = str | int | float | bool | bytes | Ref


def now_us() -> int:
    """The current time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


class RecordKind(enum.IntEnum):
    """The kind byte of every record's header (docs/format.md, "Header"); the `kind` column."""

    ASSERTION = 1
    VOTE = 2
    EPOCH = 3
    ENVELOPE = 4


class SourceClass(enum.IntEnum):
    """Where a claim's evidence comes from; also its tier for the Authority and Layered lenses."""

    REGULATORY = 0
    CLINICAL = 1
    PEER_REVIEWED = 2
    OBSERVATIONAL = 3
    EXPERT = 4
    COMMUNITY = 5
    ANECDOTAL = 6


class Lifecycle(enum.IntEnum):
    """Review stage of an assertion; a transition is a new assertion pointing at its parent."""

    PROPOSED = 0
    UNDER_REVIEW = 1
    APPROVED = 2
    DEPRECATED = 3
    REJECTED = 4


class SupersessionKind(enum.IntEnum):
    """How an epoch relates to the epochs it supersedes."""

    REPLACES = 0
    REFINES = 1
    RETRACTS = 2


def _id_bytes(value: Any, field: str) -> Any:
    """Accept a record where an ID is expected (its ID is used)."""
    if isinstance(value, _codec.Record):
        return value.id
    return value


class _Signable:
    """Signing and verification shared by every record kind (mixed into the cores)."""

    __slots__ = ()

    id: bytes
    signers: tuple[bytes, ...]
    envelope: bytes | None
    _signature_entries: tuple[tuple[int, bytes], ...]

    def sign(self, signer: Signer) -> Any:
        """Return a copy that carries `signer`'s signature over the ID.

        If the record has no signatures yet and `signer` is not a declared
        signer, its key is added to the signers (which changes the ID). To
        collect several signatures, declare every co-signer up front with
        ``signers=[...]``, then call ``sign`` once per signer.
        """
        if not isinstance(signer, Signer):
            raise TypeError(f"sign() expects a stemedb.Signer, got {type(signer).__name__}")
        key = signer.public_key
        signers = list(self.signers)
        signatures = dict(self._signature_entries) if self.envelope is None else {}
        if key not in signers:
            if signatures:
                raise SignatureError(
                    f"cannot add signer {key.hex()}: the record already carries signatures over "
                    "an ID that excludes it; declare all co-signers with signers=[...] before signing"
                )
            if isinstance(self, Envelope):
                raise SignatureError("an envelope is signed by the signer it names, no other")
            signers.append(key)
        draft = self._with_proof(signers, (), None)  # type: ignore[attr-defined]
        signatures[signers.index(key)] = signer.sign_id(draft.id)
        return self._with_proof(signers, tuple(signatures.items()), None)  # type: ignore[attr-defined]

    def verify(self) -> None:
        """Check every signature; raise SignatureError if any is bad or missing."""
        if self.envelope is not None:
            raise SignatureError(
                f"record {self.id.hex()} is proven by envelope {self.envelope.hex()}; "
                "check it with stemedb.verify_batch(envelope, members)"
            )
        if not self.signers:
            raise SignatureError(f"record {self.id.hex()} is unsigned")
        present = dict(self._signature_entries)
        for index, key in enumerate(self.signers):
            if index not in present:
                raise SignatureError(f"record {self.id.hex()}: signer {key.hex()} has not signed")
            _verify_one(key, self.id, present[index], f"record {self.id.hex()}")

    @property
    def is_signed(self) -> bool:
        """True when every declared signer has signed, or an envelope proves the record."""
        return self.envelope is not None or (
            bool(self.signers) and len(self._signature_entries) == len(self.signers)
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id.hex()[:16]}>"


def _verify_one(key: bytes, message: bytes, signature: bytes, what: str) -> None:
    try:
        nacl.bindings.crypto_sign_open(signature + message, key)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
        raise SignatureError(f"{what}: bad signature by {key.hex()}") from exc


class Assertion(_Signable, _codec.AssertionCore):
    """A claim: subject — predicate — object, with confidence, source and time.

    Objects map from Python: str → text, int/float → number (f64), bool →
    boolean, ``Ref("x")`` → entity reference, bytes → bytes. Records are
    immutable and compare by value (content and proof).
    """

    __slots__ = ()

    def __init__(
        self,
        subject: str,
        predicate: str,
        object: ObjectValue,  # noqa: A002 - the field's name in the data model
        *,
        confidence: float = 1.0,
        timestamp: int | None = None,
        source_class: SourceClass | str | int = SourceClass.OBSERVATIONAL,
        lifecycle: Lifecycle | str | int = Lifecycle.PROPOSED,
        source_hash: bytes | None = None,
        parent_hash: bytes | None = None,
        epoch: bytes | None = None,
        visual_hash: bytes | None = None,
        vector: Sequence[float] | None = None,
        signers: Iterable[bytes] = (),
    ) -> None:
        self._init(
            subject, predicate, object, confidence, timestamp, source_class, lifecycle,
            source_hash, _id_bytes(parent_hash, "parent_hash"), _id_bytes(epoch, "epoch"),
            visual_hash, vector, signers,
        )

    @property
    def object(self) -> ObjectValue:
        """The claimed value: str, float, bool, Ref or bytes."""
        return self._object_value()  # type: ignore[no-any-return]

    @property
    def source_class(self) -> SourceClass:
        return SourceClass(self._source_class_code)

    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self._lifecycle_code)

    def revise(self, **changes: Any) -> Assertion:
        """A new, unsigned assertion that revises this one (its parent_hash is this ID).

        Lifecycle transitions are revisions: ``a.revise(lifecycle="approved")``.
        """
        fields: dict[str, Any] = dict(
            confidence=self.confidence, source_class=self.source_class,
            lifecycle=self.lifecycle, source_hash=self.source_hash, epoch=self.epoch,
            visual_hash=self.visual_hash, vector=self.vector, timestamp=None,
        )
        fields.update(changes)
        fields["parent_hash"] = self.id
        subject = fields.pop("subject", self.subject)
        predicate = fields.pop("predicate", self.predicate)
        value = fields.pop("object", self.object)
        return Assertion(subject, predicate, value, **fields)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (bytes as hex)."""
        value: Any = self.object
        if isinstance(value, Ref):
            value = {"ref": value.entity}
        elif isinstance(value, bytes):
            value = {"bytes": value.hex()}
        return {
            "kind": "assertion",
            "id": self.id.hex(),
            "subject": self.subject,
            "predicate": self.predicate,
            "object": value,
            "confidence": self.confidence,
            "timestamp": self.timestamp,
            "source_class": self.source_class.name.lower(),
            "lifecycle": self.lifecycle.name.lower(),
            "source_hash": self.source_hash.hex(),
            "parent_hash": _hex(self.parent_hash),
            "epoch": _hex(self.epoch),
            "visual_hash": _hex(self.visual_hash),
            "vector": list(self.vector) if self.vector is not None else None,
            "signers": [k.hex() for k in self.signers],
            "signatures": [s.hex() for _, s in self.signatures],
            "envelope": _hex(self.envelope),
        }


def _hex(value: bytes | None) -> str | None:
    return value.hex() if value is not None else None


class Vote(_Signable, _codec.VoteCore):
    """An agent's weighted vote on an assertion; the agent is the (first) signer.

    Given the Assertion itself, the vote also carries its subject (format
    version 2), so a cluster places it with the assertion's partition; given
    a bare ID it is a version-1 vote unless `subject` names the assertion's
    subject.
    """

    __slots__ = ()

    def __init__(
        self,
        assertion_id: bytes | Assertion,
        weight: float = 1.0,
        *,
        timestamp: int | None = None,
        signers: Iterable[bytes] = (),
        subject: str | None = None,
    ) -> None:
        if isinstance(assertion_id, Assertion):
            if subject is not None and subject != assertion_id.subject:
                raise InvalidRecord(f"subject: {subject!r} is not the subject of the assertion voted "
                                    f"on ({assertion_id.subject!r})")
            subject = assertion_id.subject
        self._init(_id_bytes(assertion_id, "assertion_id"), weight, timestamp, signers, subject)

    @property
    def agent(self) -> bytes | None:
        """The voting agent's public key (the first signer), or None while unsigned."""
        return self.signers[0] if self.signers else None


class Epoch(_Signable, _codec.EpochCore):
    """A named period of validity; may supersede earlier epochs."""

    __slots__ = ()

    def __init__(
        self,
        name: str,
        description: str = "",
        *,
        supersedes: Iterable[bytes | Epoch] = (),
        supersession_kind: SupersessionKind | str | int = SupersessionKind.REPLACES,
        timestamp: int | None = None,
        signers: Iterable[bytes] = (),
    ) -> None:
        ids = [_id_bytes(x, "supersedes") for x in supersedes]
        self._init(name, description, timestamp, ids, supersession_kind, signers)

    @property
    def supersession_kind(self) -> SupersessionKind:
        return SupersessionKind(self._supersession_code)


class Envelope(_Signable, _codec.EnvelopeCore):
    """One signature over a list of member record IDs (a signed batch)."""

    __slots__ = ()

    def __init__(self, signer_key: bytes, members: Any, *, timestamp: int | None = None) -> None:
        self._init(signer_key, members, timestamp)

    @property
    def signer(self) -> bytes:
        return self.signers[0]  # type: ignore[no-any-return]


for _kind, _cls in ((RecordKind.ASSERTION, Assertion), (RecordKind.VOTE, Vote),
                   (RecordKind.EPOCH, Epoch), (RecordKind.ENVELOPE, Envelope)):
    _codec.register_class(_kind, _cls)


class Signer:
    """An Ed25519 signing key (PyNaCl)."""

    __slots__ = ("_key", "public_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(nacl.signing.SigningKey(os.urandom(32)))

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise ValueError("seed: expected 32 bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed. Keep it secret."""
        return bytes(self._key)

    def sign_id(self, record_id: bytes) -> bytes:
        """The raw 64-byte signature over a record ID."""
        return self._key.sign(record_id).signature

    def sign_batch(self, records: Iterable[Any], *, timestamp: int | None = None) -> tuple[list[Any], Envelope]:
        """Sign many records with one signature.

        Returns (members, envelope): each member is the record with this signer
        as its only signer and the envelope as its proof. Members must be
        unsigned, or already declare exactly this signer.
        """
        members = []
        key = self.public_key
        for index, record in enumerate(records):
            if not isinstance(record, _Signable) or isinstance(record, Envelope):
                raise InvalidRecord(f"records[{index}]: expected an Assertion, Vote or Epoch")
            if record.signers not in ((), (key,)):
                raise SignatureError(
                    f"records[{index}]: declares other signers; an envelope proves records of its signer only"
                )
            members.append(record._with_proof((key,), (), None))  # type: ignore[attr-defined]
        if not members:
            raise InvalidRecord("records: an envelope needs at least one member")
        # remember=True: members keep content and ID, so storing them costs no re-encode
        _, _, ids = _codec.encode_many(members, remember=True)
        envelope = Envelope(key, ids, timestamp=timestamp).sign(self)
        env_id = envelope.id
        return [m._with_proof((key,), (), env_id) for m in members], envelope

    def __repr__(self) -> str:
        return f"<Signer {self.public_key.hex()[:16]}>"


def verify_batch(envelope: Envelope, members: Sequence[Any]) -> None:
    """Check the envelope's one signature and that every member belongs to it.

    Raises SignatureError naming the first bad member (by position and ID).
    """
    blob, offsets, ids = _codec.encode_many(members)
    check_envelope_members([envelope], blob, offsets, ids, label="members")


def check_envelope_members(envelopes: Sequence[Any], blob: bytes, offsets: Any, ids: Any, *,
                           label: str = "records",
                           verify: Callable[[Sequence[Envelope]], None] | None = None) -> None:
    """Every encoded record is listed in one of `envelopes` by that envelope's signer.

    The records are blob[offsets[i]:offsets[i+1]] with IDs ids[i] (as
    encode_many returns them); their proofs, signers and membership are checked
    over the bytes, vectorised, so a batch of a million members costs one
    signature check per envelope and a few array passes. `verify` checks the
    envelopes' own signatures (default: one after the other). Raises
    SignatureError naming `label[i]` of the first bad record.
    """
    for envelope in envelopes:
        if not isinstance(envelope, Envelope):
            raise SignatureError(f"envelope: expected a stemedb.Envelope, got {type(envelope).__name__}")
    if verify is None:
        for envelope in envelopes:
            envelope.verify()
    else:
        verify(envelopes)
    claimed, signers, single = _codec.envelope_proofs(blob, offsets)
    # 32-byte rows compared as four uint64 words: eight times fewer element compares.
    claimed_words, signer_words = claimed.view(np.uint64), signers.view(np.uint64)
    if not single.all():
        first = int(np.argmin(single))
        raise SignatureError(f"{label}[{first}]: not proven by an envelope of its single signer")
    env_ids = _codec.ids_of(envelopes)
    if len(envelopes) == 1:
        owner = np.zeros(len(ids), dtype=np.int64)
        stray = _differing_row(claimed_words, env_ids[0].view(np.uint64))
        if stray >= 0:
            raise SignatureError(f"{label}[{stray}]: not proven by envelope {bytes(env_ids[0]).hex()}")
    else:
        table = _index.IdIndex(capacity=2 * len(envelopes))
        table.insert_many(env_ids, np.arange(len(envelopes), dtype=np.uint32), env_ids)
        owner = table.lookup_many(claimed, env_ids)
        if (owner < 0).any():
            raise SignatureError(f"{label}[{int(np.argmax(owner < 0))}]: not proven by any of the "
                                 f"{len(envelopes)} envelopes given")
    env_signers = np.frombuffer(b"".join(e.signer for e in envelopes), dtype=np.uint64).reshape(-1, 4)
    expected = env_signers[0] if len(envelopes) == 1 else env_signers[owner]
    wrong_signer = _differing_row(signer_words, expected)
    if wrong_signer >= 0:
        raise SignatureError(f"{label}[{wrong_signer}]: its signer is not the envelope's signer")
    if len(envelopes) == 1:
        listed = envelopes[0].member_array()
        if listed.shape == ids.shape and np.array_equal(listed.view(np.uint64), ids.view(np.uint64)):
            return  # members in the order they were signed: the common case
    listed = np.concatenate([e.member_array() for e in envelopes])
    listed_by = np.repeat(np.arange(len(envelopes)), [e.member_count for e in envelopes])
    members = _index.IdIndex(capacity=2 * len(listed))
    members.insert_many(listed, np.arange(len(listed), dtype=np.uint32), listed)
    row = members.lookup_many(ids, listed)
    found = (row >= 0) & (listed_by[np.maximum(row, 0)] == owner)
    for index in np.nonzero(~found)[0]:  # rare: absent, or listed in several envelopes
        if bytes(ids[index]) not in set(envelopes[int(owner[index])].members):
            raise SignatureError(
                f"{label}[{index}] ({bytes(ids[index]).hex()}): not listed in its envelope")


def check_stored_member(envelope: Any, member: Any, member_id: bytes, label: str) -> None:
    """`envelope`, a stored record, proves `member` (whose ID is member_id); else SignatureError.

    The envelope's own signature was checked when it was stored. `label`
    names the member in the message.
    """
    named = member.envelope.hex() if member.envelope is not None else "none"
    if not isinstance(envelope, Envelope):
        raise SignatureError(f"{label}: its envelope proof names {named}, a stored "
                             f"{type(envelope).__name__.lower()}, not an envelope")
    if member.signers != (envelope.signer,):
        raise SignatureError(f"{label}: its signer is not the signer of envelope {named}")
    if member_id not in set(envelope.members):
        raise SignatureError(f"{label}: not a member of envelope {named}")


def _differing_row(rows: np.ndarray, expected: np.ndarray) -> int:
    """Index of the first row of `rows` unlike `expected` (broadcast), or -1.

    The whole-array check comes first: a per-row reduction is what costs, and
    it is only needed to name the culprit.
    """
    whole = expected.tobytes() * len(rows) if expected.ndim == 1 else expected.tobytes()
    if rows.tobytes() == whole:  # one memcmp; numpy's broadcast compare is ~5x slower here
        return -1
    return int(np.argmax((rows != expected).any(axis=1)))


def verify_many(records: Sequence[Any]) -> None:
    """Verify many individually signed records (raises on the first bad one)."""
    for index, record in enumerate(records):
        try:
            record.verify()
        except SignatureError as exc:
            raise SignatureError(f"records[{index}]: {exc}") from None


decode = _codec.decode
decode_many = _codec.decode_many
encode_many = _codec.encode_many
ids_of = _codec.ids_of
