"""Verification: what a batch of encoded records must pass before it joins a group commit.

Owns: turning a writer's bytes into an `EncodedBatch` (canonical checks, IDs
recomputed from the bytes and columns, in one native pass:
`_codec.validate_many`), and proving every record of it from the bytes: the
kind a caller allows, each individually signed record's Ed25519 signatures
(on the verification thread pool when there are many), membership of each
envelope member in an envelope of the same batch or one already stored.
Must never: build objects for the records it checks (only the few envelopes
of a batch, and a refused record to name what is wrong, are decoded), or
run in the group-commit leader (everything here runs in the writer's own
thread, so a bad record is refused to its writer alone).

Resource handling: a Verifier owns its thread pool; `close()` shuts it down.
Error handling: InvalidRecord names the record and the field (or the kind a
request allows); SignatureError names the record and the broken proof.
Messages name records as `records[i]`, i counted from the first record the
caller passed (envelopes given separately are `envelope[k]`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import numpy as np

from stemedb import _codec, _index
from stemedb._codec import Record
from stemedb.errors import InvalidRecord, SignatureError
from stemedb.records import Envelope, RecordKind

PROOF_NONE, PROOF_SIGNATURES, PROOF_ENVELOPE = 0, 1, 2     # docs/format.md, "Proof"
PARALLEL_SIGNATURES = 64          # below this many, the pool costs more than it saves
KEY_SIZE = 32                     # an Ed25519 public key
SIGNED_SIZE = 64 + 32             # an Ed25519 signature, then the record ID it signs
KIND_NAMES = {RecordKind.ASSERTION: "an assertion", RecordKind.VOTE: "a vote",
              RecordKind.EPOCH: "an epoch", RecordKind.ENVELOPE: "an envelope"}

StoredRecord = Callable[[bytes], "Record | None"]
# (kind, subject key) of each stored record of an (n, 32) array of IDs; kind 0 where absent.
StoredSubjects = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]


@dataclass
class EncodedBatch:
    """Records as bytes, with what one parse of them found.

    Record i is blob[offsets[i]:offsets[i+1]], its ID ids[i]; columns are
    `_codec.COLUMNS`, one row per record. `first` is the index of the first
    record the caller named `records[0]` (envelopes before it were passed on
    their own).
    """

    blob: bytes | memoryview
    offsets: np.ndarray
    ids: np.ndarray
    columns: dict[str, np.ndarray]
    first: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, index: int) -> str:
        return f"records[{index - self.first}]" if index >= self.first else f"envelope[{index}]"

    def record(self, index: int) -> Record:
        """Record `index` decoded (to explain a refusal; the checks read the bytes)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return _codec.decode(bytes(self.blob[start:end]))  # type: ignore[no-any-return]


def parse(blob: bytes | bytearray | memoryview, offsets: np.ndarray) -> EncodedBatch:
    """Records that arrived encoded: canonical checks, IDs from the bytes, columns."""
    try:
        view = memoryview(blob)
    except TypeError:
        raise InvalidRecord(f"blob: expected a bytes-like object, got {type(blob).__name__}") from None
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    ids, columns = _codec.validate_many(view, offsets)
    return EncodedBatch(view, offsets, ids, columns)


def check_claimed_ids(batch: EncodedBatch, claimed: np.ndarray) -> None:
    """Each record's ID recomputed from its bytes is the one it came with (from a peer)."""
    claimed = np.ascontiguousarray(claimed, dtype=np.uint8)
    if claimed.shape != batch.ids.shape:
        raise InvalidRecord(f"ids: {claimed.shape[0] if claimed.ndim else 0} IDs of shape "
                            f"{claimed.shape[1:]} for {len(batch)} records; expected one 32-byte ID each")
    index = _differing_row(batch.ids, claimed)
    if index >= 0:
        raise InvalidRecord(f"{batch.label(index)}: came as {bytes(claimed[index]).hex()} but its "
                            f"content is {bytes(batch.ids[index]).hex()}")


def without(batch: EncodedBatch, rows: np.ndarray) -> EncodedBatch:
    """The batch without the records at `rows` (held-back members), bytes gathered once."""
    keep = np.ones(len(batch), dtype=bool)
    keep[rows] = False
    kept = np.flatnonzero(keep)
    starts, ends = batch.offsets[:-1][kept], batch.offsets[1:][kept]
    sizes = ends - starts
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    source = np.frombuffer(batch.blob, dtype=np.uint8)
    gather = np.repeat(starts - offsets[:-1], sizes) + np.arange(int(offsets[-1]), dtype=np.int64)
    blob = source[gather].tobytes()
    columns = {name: values[kept] for name, values in batch.columns.items()}
    return EncodedBatch(blob, offsets, np.ascontiguousarray(batch.ids[kept]), columns)


def trusted(blob: bytes, offsets: np.ndarray, ids: np.ndarray, first: int = 0) -> EncodedBatch:
    """Records this process just encoded from validated objects (encode_many): columns only."""
    columns = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))
    return EncodedBatch(blob, offsets, ids, columns, first)


class Verifier:
    """Proves batches of encoded records (see the module doc). Thread-safe."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="stemedb-verify")

    def close(self) -> None:
        self._pool.shutdown()

    def prove(self, batch: EncodedBatch, stored: StoredRecord, *,
              kind: RecordKind | None = None, subjects: StoredSubjects | None = None,
              hold_back: bool = False) -> np.ndarray:
        """Raise unless every record of the batch is of `kind` (envelopes aside) and proven.

        Proven: carries valid signatures of all its declared signers, or is
        a member (envelope proof) of an envelope in the batch or of one that
        `stored(envelope_id)` returns. A version-2 vote must name the subject
        of the assertion it votes on when that assertion is in the batch or
        stored (`subjects` reads the stored ones).

        Returns the indexes (int64, ascending) of the members whose envelope
        is neither in the batch nor stored: with `hold_back` they are not
        judged (not proven, not refused: the caller must not store them);
        without it they refuse the batch, and the result is always empty.
        """
        kinds, proofs = batch.columns["kind"], batch.columns["proof"]
        held = np.zeros(0, dtype=np.int64)
        if kind is not None:
            _check_kind(batch, kinds, kind)
        if subjects is not None:
            check_vote_subjects(batch, subjects)
        members = np.flatnonzero(proofs == PROOF_ENVELOPE)
        if len(members):
            claimed, signers, single = _codec.envelope_proofs(batch.blob, batch.offsets)
            if not single[members].all():
                first = int(members[np.argmin(single[members])])
                raise SignatureError(f"{batch.label(first)}: not proven by an envelope of its "
                                     "single signer")
            proofs_of = _Claims(members, claimed[members], signers[members])
            envelopes = np.flatnonzero(kinds == RecordKind.ENVELOPE)
            outside = _check_members(batch, proofs_of, envelopes)
            if len(outside.members):
                held = _check_stored_members(batch, outside, stored, in_batch=len(envelopes) > 0,
                                             hold_back=hold_back)
        self._check_signatures(batch, np.flatnonzero(proofs != PROOF_ENVELOPE))
        return held

    def _check_signatures(self, batch: EncodedBatch, rows: np.ndarray) -> None:
        """Every declared signer of these records has a valid signature over its ID."""
        if not len(rows):
            return
        keys, signatures, owner, complete = _codec.signature_entries(batch.blob, batch.offsets, rows)
        if not complete.all():
            _explain(batch, int(rows[int(np.argmin(complete))]))
        messages = np.concatenate([signatures, batch.ids[rows[owner]]], axis=1).tobytes()
        key_bytes = keys.tobytes()
        count = len(keys)
        if count < PARALLEL_SIGNATURES:
            bad = _first_bad_signature(messages, key_bytes, 0, count)
        else:
            bounds = np.linspace(0, count, self.threads + 1).astype(np.int64)
            futures = [self._pool.submit(_first_bad_signature, messages, key_bytes, int(lo), int(hi))
                       for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
            found = [f.result() for f in futures]
            bad = min((b for b in found if b >= 0), default=-1)
        if bad >= 0:
            _explain(batch, int(rows[owner[bad]]))


def _first_bad_signature(messages: bytes, keys: bytes, lo: int, hi: int) -> int:
    """Index of the first signature in [lo, hi) that does not verify, or -1.

    PyNaCl releases the GIL inside each check, so the pool's threads verify
    in parallel.
    """
    for index in range(lo, hi):
        try:
            nacl.bindings.crypto_sign_open(messages[index * SIGNED_SIZE:(index + 1) * SIGNED_SIZE],
                                           keys[index * KEY_SIZE:(index + 1) * KEY_SIZE])
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return index
    return -1


def _explain(batch: EncodedBatch, index: int) -> None:
    """Raise the SignatureError that verifying record `index` as an object raises."""
    label = batch.label(index)
    try:
        batch.record(index).verify()  # type: ignore[attr-defined]
    except SignatureError as exc:
        raise SignatureError(f"{label}: {exc}") from None
    raise SignatureError(f"{label}: a signature does not verify")


def _check_kind(batch: EncodedBatch, kinds: np.ndarray, kind: RecordKind) -> None:
    wrong = np.flatnonzero((kinds != kind) & (kinds != RecordKind.ENVELOPE))
    if len(wrong):
        index = int(wrong[0])
        raise InvalidRecord(f"{batch.label(index)}: expected {KIND_NAMES[kind]}, got "
                            f"{KIND_NAMES[RecordKind(int(kinds[index]))]}")


def check_vote_subjects(batch: EncodedBatch, subjects: StoredSubjects) -> None:
    """A version-2 vote names the subject of the assertion it votes on, where that is known here.

    Compared by subject key (docs/format.md, "Columns and indexes"): the
    vote's `place` column against the assertion's `subject` column.
    """
    kinds, places = batch.columns["kind"], batch.columns["place"]
    votes = np.flatnonzero((kinds == RecordKind.VOTE) & (places != 0))
    if not len(votes):
        return
    targets = _codec.vote_assertions(batch.blob, batch.offsets, votes)
    target_kinds = np.zeros(len(votes), dtype=np.uint8)
    target_subjects = np.zeros(len(votes), dtype=np.uint64)
    assertions = np.flatnonzero(kinds == RecordKind.ASSERTION)
    here = np.zeros(len(votes), dtype=bool)
    if len(assertions):
        assertion_ids = np.ascontiguousarray(batch.ids[assertions])
        table = _index.IdIndex(capacity=2 * len(assertions))
        table.insert_many(assertion_ids, np.arange(len(assertions), dtype=np.uint32), assertion_ids)
        owner = np.asarray(table.lookup_many(targets, assertion_ids))
        here = owner >= 0
        target_kinds[here] = RecordKind.ASSERTION
        target_subjects[here] = batch.columns["subject"][assertions[owner[here]]]
    if not here.all():
        stored_kinds, stored_subjects = subjects(np.ascontiguousarray(targets[~here]))
        target_kinds[~here] = stored_kinds
        target_subjects[~here] = stored_subjects
    wrong = np.flatnonzero((target_kinds != 0) & ((target_kinds != RecordKind.ASSERTION)
                                                  | (target_subjects != places[votes])))
    if not len(wrong):
        return
    position = int(wrong[0])
    index = int(votes[position])
    named = batch.record(index).subject  # type: ignore[attr-defined]
    voted = bytes(targets[position]).hex()
    if target_kinds[position] != RecordKind.ASSERTION:
        raise InvalidRecord(f"{batch.label(index)}: subject: the vote names subject {named!r}, but the "
                            f"record it votes on, {voted}, is {KIND_NAMES[RecordKind(int(target_kinds[position]))]}, "
                            "not an assertion")
    raise InvalidRecord(f"{batch.label(index)}: subject: {named!r} is not the subject of assertion "
                        f"{voted}, the one it votes on; write the vote with Vote(assertion, weight)")


@dataclass
class _Claims:
    """Members of a batch (their indexes), the envelope each names and each one's signer."""

    members: np.ndarray
    envelopes: np.ndarray         # (n, 32) uint8
    signers: np.ndarray           # (n, 32) uint8

    def __getitem__(self, selector: np.ndarray) -> _Claims:
        return _Claims(self.members[selector], self.envelopes[selector], self.signers[selector])


def _check_members(batch: EncodedBatch, claims: _Claims, envelope_rows: np.ndarray) -> _Claims:
    """Members of the batch's envelopes are listed by them and share their signer.

    Returns the claims of the members that name no envelope of the batch
    (stored envelopes must prove them). The envelopes' own signatures are
    checked with the other signed records.
    """
    if not len(envelope_rows):
        return claims
    envelopes = [batch.record(int(row)) for row in envelope_rows]
    env_ids = np.ascontiguousarray(batch.ids[envelope_rows])
    if len(envelopes) == 1 and claims.envelopes.tobytes() == env_ids.tobytes() * len(claims.members):
        # one envelope that every member names (a signed batch): one memcmp, no lookups
        _check_listed(batch, claims, np.zeros(len(claims.members), dtype=np.int64), envelopes)
        return claims[np.zeros(len(claims.members), dtype=bool)]
    table = _index.IdIndex(capacity=2 * len(envelope_rows))
    table.insert_many(env_ids, np.arange(len(envelope_rows), dtype=np.uint32), env_ids)
    owner = table.lookup_many(np.ascontiguousarray(claims.envelopes), env_ids)
    here = owner >= 0
    if here.any():
        _check_listed(batch, claims[here], owner[here], envelopes)
    return claims[~here]


def _check_listed(batch: EncodedBatch, claims: _Claims, owner: np.ndarray,
                  envelopes: list[Record]) -> None:
    """Each member's signer is its envelope's, and the envelope lists the member's ID."""
    members = claims.members
    env_signers = np.frombuffer(b"".join(e.signers[0] for e in envelopes), dtype=np.uint8).reshape(-1, 32)
    expected = env_signers[0] if len(envelopes) == 1 else env_signers[owner]
    wrong = _differing_row(claims.signers, expected)
    if wrong >= 0:
        raise SignatureError(f"{batch.label(int(members[wrong]))}: its signer is not the envelope's signer")
    ids = np.ascontiguousarray(batch.ids[members])
    lists = [e.member_array() for e in envelopes]  # type: ignore[attr-defined]
    if len(envelopes) == 1 and lists[0].shape == ids.shape and lists[0].tobytes() == ids.tobytes():
        return  # members in the order they were signed: the common case
    listed = np.concatenate(lists)
    listed_by = np.repeat(np.arange(len(envelopes)), [len(x) for x in lists])
    index = _index.IdIndex(capacity=2 * len(listed))
    index.insert_many(listed, np.arange(len(listed), dtype=np.uint32), listed)
    row = index.lookup_many(ids, listed)
    found = (row >= 0) & (listed_by[np.maximum(row, 0)] == owner)
    for position in np.nonzero(~found)[0]:  # rare: absent, or listed in several envelopes
        member_id = bytes(ids[position])
        if member_id not in set(envelopes[int(owner[position])].members):  # type: ignore[attr-defined]
            raise SignatureError(f"{batch.label(int(members[position]))} ({member_id.hex()}): "
                                 "not listed in its envelope")


def _check_stored_members(batch: EncodedBatch, claims: _Claims, stored: StoredRecord, *,
                          in_batch: bool, hold_back: bool) -> np.ndarray:
    """Members that name an envelope outside the batch: it must be stored and list them.

    Returns the members whose envelope is not stored (with `hold_back`;
    without it they raise), int64 ascending.
    """
    envelope_ids, which = _group_rows(claims.envelopes)
    held = []
    for number, envelope_id in enumerate(envelope_ids):   # in the order their first member comes
        mine = claims[which == number]
        envelope = stored(envelope_id)
        if envelope is None and hold_back:
            held.append(mine.members)
            continue
        if envelope is None:
            label = batch.label(int(mine.members[0]))
            if in_batch:
                raise SignatureError(f"{label}: not proven by any envelope in the batch, and its "
                                     f"envelope {envelope_id.hex()} is not stored")
            raise SignatureError(f"{label}: its envelope {envelope_id.hex()} is not stored; write "
                                 "members with put_many(members, envelope=envelope)")
        if not isinstance(envelope, Envelope):
            raise SignatureError(f"{_named(batch, int(mine.members[0]))}: its envelope proof names "
                                 f"{envelope_id.hex()}, a stored {type(envelope).__name__.lower()}, "
                                 "not an envelope")
        wrong = _differing_row(mine.signers, np.frombuffer(envelope.signer, dtype=np.uint8))
        if wrong >= 0:
            raise SignatureError(f"{_named(batch, int(mine.members[wrong]))}: its signer is not the "
                                 f"signer of envelope {envelope_id.hex()}")
        listed = envelope.member_array()
        index = _index.IdIndex(capacity=2 * len(listed))
        index.insert_many(listed, np.arange(len(listed), dtype=np.uint32), listed)
        absent = np.flatnonzero(index.lookup_many(np.ascontiguousarray(batch.ids[mine.members]),
                                                  listed) < 0)
        if len(absent):
            raise SignatureError(f"{_named(batch, int(mine.members[absent[0]]))}: not a member of "
                                 f"envelope {envelope_id.hex()}")
    return np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)


def _group_rows(rows: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """The distinct 32-byte rows in order of first appearance, and each row's group number.

    Grouped by the rows' first 8 bytes (a one-dimensional sort), then checked
    whole: rows that share a prefix but differ (never, for BLAKE3 IDs, short
    of a forged batch) fall back to grouping by the whole row.
    np.unique(axis=0) sorted every row as a structured value, the cost of a
    catch-up whose members come interleaved from many envelopes.
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if not len(rows):
        return [], np.zeros(0, dtype=np.int64)
    prefix = rows[:, :8].copy().view(np.uint64).ravel()
    _, first_of, which = np.unique(prefix, return_index=True, return_inverse=True)
    which = which.ravel()
    if (rows != rows[first_of[which]]).any():
        _, first_of, which = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        which = which.ravel()
    order = np.argsort(first_of, kind="stable")          # groups in order of first appearance
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    return [rows[first_of[g]].tobytes() for g in order], renumber[which].astype(np.int64)


def _named(batch: EncodedBatch, index: int) -> str:
    """A record's label with its ID (a stored envelope's refusal names the member it refuses)."""
    return f"{batch.label(index)} ({bytes(batch.ids[index]).hex()})"


def _differing_row(rows: np.ndarray, expected: np.ndarray) -> int:
    """Index of the first row of `rows` unlike `expected` (one row, or one per row), or -1."""
    whole = expected.tobytes() * len(rows) if expected.ndim == 1 else expected.tobytes()
    if rows.tobytes() == whole:  # one memcmp: the common case costs no per-row reduction
        return -1
    return int(np.argmax((rows != expected).any(axis=1)))
