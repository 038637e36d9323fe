"""Canonical record encoding and decoding, one record or many per call.

Owns: the byte layout of docs/format.md ("Record encoding"): the content that
is hashed into a record's ID and the proof section after it; the C-level
fields of the record classes; IDs (BLAKE3 over the content, in the native
core); strict decoding that accepts only canonical bytes.

Must never: touch files or sockets, or check signatures (stemedb.records
verifies; this module only carries the bytes). The public classes live in
stemedb.records and subclass the cores here.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport isfinite, isnan, signbit
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy

from stemedb._bytes cimport (SIZE_F32, SIZE_F64, SIZE_U8, SIZE_U16, SIZE_U32, SIZE_U64, get_f32,
                             get_f64, get_u16, get_u32, get_u64, put_f32, put_f64, put_u8, put_u16,
                             put_u32, put_u64)
from stemedb._hash cimport stm_blake3, stm_blake3_many

import time

import numpy as np

from stemedb.errors import InvalidRecord

# Limits (docs/format.md, "Limits"); tests assert these against the document.
# C values for the checks that run without the GIL, and the same as Python names.
cdef enum:
    LIMIT_SUBJECT = 1024
    LIMIT_PREDICATE = 256
    LIMIT_TEXT = 1 << 20
    LIMIT_REFERENCE = 1024
    LIMIT_BYTES = 1 << 20
    LIMIT_VECTOR = 4096
    LIMIT_EPOCH_NAME = 256
    LIMIT_DESCRIPTION = 1 << 16
    LIMIT_SUPERSEDES = 1024
    LIMIT_MEMBERS = 1_000_000

MAX_SUBJECT = LIMIT_SUBJECT
MAX_PREDICATE = LIMIT_PREDICATE
MAX_TEXT = LIMIT_TEXT
MAX_REFERENCE = LIMIT_REFERENCE
MAX_BYTES = LIMIT_BYTES
MAX_VECTOR = LIMIT_VECTOR
MAX_EPOCH_NAME = LIMIT_EPOCH_NAME
MAX_DESCRIPTION = LIMIT_DESCRIPTION
MAX_SUPERSEDES = LIMIT_SUPERSEDES
MAX_MEMBERS = LIMIT_MEMBERS
MAX_SIGNER_COUNT = MAX_SIGNERS
VERSION = FORMAT_VERSION

SOURCE_CLASS_NAMES = (
    "regulatory", "clinical", "peer_reviewed", "observational", "expert", "community", "anecdotal",
)
LIFECYCLE_NAMES = ("proposed", "under_review", "approved", "deprecated", "rejected")
SUPERSESSION_NAMES = ("replaces", "refines", "retracts")
# The same counts as C values, for the checks that run without the GIL.
cdef Py_ssize_t SOURCE_CLASSES = len(SOURCE_CLASS_NAMES)
cdef Py_ssize_t LIFECYCLES = len(LIFECYCLE_NAMES)
cdef Py_ssize_t SUPERSESSION_KINDS = len(SUPERSESSION_NAMES)

# The public subclasses (stemedb.records) register here so that decoding
# produces them; index = RecordKind.
_classes = [None, None, None, None, None]


def register_class(int kind, cls):
    """Make `decode` build instances of `cls` for records of `kind`."""
    _classes[kind] = cls


cdef inline uint8_t* put_blob(uint8_t* p, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


# ----------------------------------------------------------------------------
# The record layout (docs/format.md, "Record encoding"), walked once per part:
# walk_header (header and signers), walk_body (one walk per kind) and
# walk_proof fill the structs of _codec.pxd. Decoding, column extraction, the
# envelope-proof reader and the client's group signing all start from them.
#
# The walks run without the GIL and raise nothing: the bounds-checked reader
# records the first failure (what, where) in the Reader, and from then on
# every read fails and yields NOTHING, so a walk is straight-line code with
# one check at its end. parse_failure turns what it recorded into the message.

cdef uint8_t NOTHING[SIZE_U64]  # what a failed read yields; walks load at most SIZE_U64 bytes of a read


cdef void fail(Reader* r, ParseFailure failure, const char* field, Py_ssize_t value) noexcept nogil:
    if r.failure == PARSE_OK:
        r.failure = failure
        r.field = field
        r.at = r.pos
        r.needed = value
        r.left = r.end - r.pos
    r.end = r.pos  # nothing after a failure can be read


cdef inline const uint8_t* take(Reader* r, Py_ssize_t n, const char* field) noexcept nogil:
    cdef const uint8_t* p
    if n > r.end - r.pos:
        fail(r, PARSE_TRUNCATED, field, n)
        return NOTHING
    p = r.base + r.pos
    r.pos += n
    return p

cdef inline uint8_t take_u8(Reader* r, const char* field) noexcept nogil:
    return take(r, SIZE_U8, field)[0]

cdef inline uint16_t take_u16(Reader* r, const char* field) noexcept nogil:
    return get_u16(take(r, SIZE_U16, field))

cdef inline uint32_t take_u32(Reader* r, const char* field) noexcept nogil:
    return get_u32(take(r, SIZE_U32, field))

cdef inline uint64_t take_u64(Reader* r, const char* field) noexcept nogil:
    return get_u64(take(r, SIZE_U64, field))

cdef inline float take_f32(Reader* r, const char* field) noexcept nogil:
    return get_f32(take(r, SIZE_F32, field))

cdef inline Span take_span(Reader* r, Py_ssize_t n, const char* field) noexcept nogil:
    cdef Span s
    s.data = take(r, n, field)
    s.size = n
    return s

cdef inline Span span_since(const Reader* r, Py_ssize_t start) noexcept nogil:
    cdef Span s
    s.data = r.base + start
    s.size = r.pos - start
    return s

cdef inline const uint8_t* take_optional(Reader* r, uint8_t mask, uint8_t bit, Py_ssize_t n,
                                         const char* field) noexcept nogil:
    return take(r, n, field) if mask & bit else NULL


cdef inline bint walk_header(Reader* r, RecordFields* f, const uint8_t* data,
                             Py_ssize_t length) noexcept nogil:
    """docs/format.md "Header" and "Signers"; leaves r at the body, bounded by the content."""
    cdef Py_ssize_t content_length
    r.base = data
    r.pos = 0
    r.end = length
    r.length = length
    r.failure = PARSE_OK
    r.field = NULL
    f.version = take_u8(r, "version")
    if f.version != FORMAT_VERSION and f.version != VOTE_FORMAT_VERSION:
        fail(r, PARSE_VERSION, "version", f.version)
    f.kind = take_u8(r, "kind")
    if f.kind < KIND_ASSERTION or f.kind > KIND_ENVELOPE:
        fail(r, PARSE_KIND, "kind", f.kind)
    elif f.version == VOTE_FORMAT_VERSION and f.kind != KIND_VOTE:
        fail(r, PARSE_VERSION_KIND, "version", f.kind)
    content_length = take_u32(r, "content_length")
    if content_length > length:
        fail(r, PARSE_CONTENT_BEYOND, "content_length", content_length)
    elif content_length < HEADER_SIZE + SIZE_U8:
        fail(r, PARSE_CONTENT_SHORT, "content_length", content_length)
    f.content.data = data
    f.content.size = content_length
    if r.failure == PARSE_OK:
        r.end = content_length  # the body may not read into the proof
    f.signers = take_span(r, <Py_ssize_t>take_u8(r, "signer_count") * KEY_SIZE, "signers")
    f.body.data = r.base + r.pos
    f.body.size = r.end - r.pos
    return r.failure == PARSE_OK


cdef inline void walk_assertion(Reader* r, AssertionFields* a) noexcept nogil:
    """docs/format.md, "Body: Assertion (kind 1)"."""
    cdef Py_ssize_t pair_start = r.pos, object_start
    a.subject = take_span(r, take_u16(r, "subject length"), "subject")
    a.predicate = take_span(r, take_u16(r, "predicate length"), "predicate")
    a.pair = span_since(r, pair_start)
    object_start = r.pos
    a.object_tag = take_u8(r, "object tag")
    if a.object_tag == OBJECT_TEXT:
        a.value = take_span(r, take_u32(r, "object length"), "object (text)")
    elif a.object_tag == OBJECT_NUMBER:
        a.value = take_span(r, SIZE_F64, "object (number)")
    elif a.object_tag == OBJECT_BOOLEAN:
        a.value = take_span(r, SIZE_U8, "object (boolean)")
    elif a.object_tag == OBJECT_REFERENCE:
        a.value = take_span(r, take_u16(r, "object length"), "object (reference)")
    elif a.object_tag == OBJECT_BYTES:
        a.value = take_span(r, take_u32(r, "object length"), "object (bytes)")
    else:
        fail(r, PARSE_OBJECT_TAG, "object", a.object_tag)
    a.object = span_since(r, object_start)
    a.confidence = take_f32(r, "confidence")
    a.timestamp = take_u64(r, "timestamp")
    a.source_class = take_u8(r, "source_class")
    a.lifecycle = take_u8(r, "lifecycle")
    a.source_hash = take(r, SOURCE_HASH_SIZE, "source_hash")
    a.optional_mask = take_u8(r, "optional fields mask")
    a.parent_hash = take_optional(r, a.optional_mask, HAS_PARENT_HASH, ID_SIZE, "parent_hash")
    a.epoch = take_optional(r, a.optional_mask, HAS_EPOCH, ID_SIZE, "epoch")
    a.visual_hash = take_optional(r, a.optional_mask, HAS_VISUAL_HASH, VISUAL_HASH_SIZE, "visual_hash")
    if a.optional_mask & HAS_VECTOR:
        a.vector = take_span(r, <Py_ssize_t>take_u16(r, "vector length") * SIZE_F32, "vector")
    else:
        a.vector.data = NULL
        a.vector.size = 0


cdef inline void walk_vote(Reader* r, VoteFields* v, uint8_t version) noexcept nogil:
    """docs/format.md, "Body: Vote (kind 2)": version 2 adds the voted assertion's subject."""
    v.assertion_id = take(r, ID_SIZE, "assertion_id")
    v.weight = take_f32(r, "weight")
    v.timestamp = take_u64(r, "timestamp")
    if version == VOTE_FORMAT_VERSION:
        v.subject = take_span(r, take_u16(r, "subject length"), "subject")
    else:
        v.subject.data = NULL
        v.subject.size = 0


cdef inline void walk_epoch(Reader* r, EpochFields* e) noexcept nogil:
    """docs/format.md, "Body: Epoch (kind 3)"."""
    e.name = take_span(r, take_u16(r, "name length"), "name")
    e.description = take_span(r, take_u32(r, "description length"), "description")
    e.timestamp = take_u64(r, "timestamp")
    e.supersession_kind = take_u8(r, "supersession_kind")
    e.supersedes = take_span(r, <Py_ssize_t>take_u16(r, "supersedes count") * ID_SIZE, "supersedes")


cdef inline void walk_envelope(Reader* r, EnvelopeFields* e) noexcept nogil:
    """docs/format.md, "Body: Envelope (kind 4)"."""
    e.timestamp = take_u64(r, "timestamp")
    e.members = take_span(r, <Py_ssize_t>take_u32(r, "member count") * ID_SIZE, "members")


cdef inline bint walk_body(Reader* r, RecordFields* f) noexcept nogil:
    """The body of f.kind, which must end exactly at content_length."""
    if r.failure != PARSE_OK:
        return False
    if f.kind == KIND_ASSERTION:
        walk_assertion(r, &f.fields.assertion)
    elif f.kind == KIND_VOTE:
        walk_vote(r, &f.fields.vote, f.version)
    elif f.kind == KIND_EPOCH:
        walk_epoch(r, &f.fields.epoch)
    else:
        walk_envelope(r, &f.fields.envelope)
    if r.pos != r.end:
        fail(r, PARSE_CONTENT_MISMATCH, "content_length", f.content.size)
    return r.failure == PARSE_OK


cdef inline bint walk_proof(Reader* r, RecordFields* f) noexcept nogil:
    """docs/format.md, "Proof": from content_length on (the body need not have been walked)."""
    cdef ProofFields* proof = &f.proof
    if r.failure != PARSE_OK:
        return False
    r.pos = f.content.size
    r.end = r.length
    proof.kind = take_u8(r, "proof kind")
    proof.signatures.data = NULL
    proof.signatures.size = 0
    proof.envelope = NULL
    if proof.kind == PROOF_SIGNATURES:
        proof.signatures = take_span(
            r, <Py_ssize_t>take_u8(r, "signature count") * SIGNATURE_ENTRY_SIZE, "signatures")
    elif proof.kind == PROOF_ENVELOPE:
        proof.envelope = take(r, ID_SIZE, "envelope")
    elif proof.kind != PROOF_NONE:
        fail(r, PARSE_PROOF_KIND, "proof", proof.kind)
    return r.failure == PARSE_OK


cdef inline bint walk_record(Reader* r, RecordFields* f, const uint8_t* data,
                             Py_ssize_t length) noexcept nogil:
    """Every part of the record at data[0:length]; r.pos ends after its proof."""
    walk_header(r, f, data, length)
    walk_body(r, f)
    return walk_proof(r, f)


# The walks for other modules (_protocol cimports these through _codec.pxd);
# this module's loops call the inline walks above directly.

cdef bint parse_header(Reader* r, RecordFields* f, const uint8_t* data, Py_ssize_t length) noexcept nogil:
    return walk_header(r, f, data, length)


cdef bint parse_proof(Reader* r, RecordFields* f) noexcept nogil:
    return walk_proof(r, f)


cdef inline Py_ssize_t signature_count(const ProofFields* proof) noexcept nogil:
    return proof.signatures.size // SIGNATURE_ENTRY_SIZE

cdef inline uint8_t signature_index(const ProofFields* proof, Py_ssize_t i) noexcept nogil:
    return proof.signatures.data[i * SIGNATURE_ENTRY_SIZE]

cdef inline const uint8_t* signature_bytes(const ProofFields* proof, Py_ssize_t i) noexcept nogil:
    return proof.signatures.data + i * SIGNATURE_ENTRY_SIZE + SIZE_U8


cdef str parse_failure(const Reader* r):
    """The message for the failure a walk recorded (it names the field and the rule)."""
    cdef str field = r.field.decode("ascii") if r.field != NULL else "record"
    if r.failure == PARSE_TRUNCATED:
        return f"{field}: truncated: needs {r.needed} bytes at offset {r.at}, only {r.left} left"
    if r.failure == PARSE_VERSION:
        return (f"version: unknown format version {r.needed} (this build reads {FORMAT_VERSION}, "
                f"and {VOTE_FORMAT_VERSION} for votes)")
    if r.failure == PARSE_VERSION_KIND:
        return (f"version: format version {VOTE_FORMAT_VERSION} is defined for votes (kind "
                f"{KIND_VOTE}) only, not for kind {r.needed}")
    if r.failure == PARSE_KIND:
        return f"kind: unknown record kind {r.needed}"
    if r.failure == PARSE_CONTENT_BEYOND:
        return f"content_length: truncated: header declares {r.needed} bytes, only {r.length} present"
    if r.failure == PARSE_CONTENT_SHORT:
        return (f"content_length: header declares {r.needed} bytes, fewer than the header and "
                "signer count need")
    if r.failure == PARSE_CONTENT_MISMATCH:
        return f"content_length: header declares {r.needed} bytes but the fields end at {r.at}"
    if r.failure == PARSE_OBJECT_TAG:
        return f"object: unknown object tag {r.needed}"
    if r.failure == PARSE_PROOF_KIND:
        return f"proof: unknown proof kind {r.needed}"
    return "record: parsed without a failure"


cdef uint8_t* write_header(uint8_t* out, uint8_t version, uint8_t kind, uint32_t content_length,
                           uint8_t signer_count) noexcept nogil:
    """docs/format.md, "Header", then signer_count; the signer keys go after it."""
    out = put_u8(out, version)
    out = put_u8(out, kind)
    out = put_u32(out, content_length)
    return put_u8(out, signer_count)


# ----------------------------------------------------------------------------
# Validation helpers shared by the constructors (messages name field and rule).

cdef bytes utf8_field(value, str field, Py_ssize_t lo, Py_ssize_t hi):
    cdef bytes b
    if not isinstance(value, str):
        raise InvalidRecord(f"{field}: expected str, got {type(value).__name__}")
    try:
        b = (<str>value).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"{field}: not encodable as UTF-8 (lone surrogate)") from None
    if PyBytes_GET_SIZE(b) < lo:
        raise InvalidRecord(f"{field}: must not be empty" if lo == 1 else
                            f"{field}: must be at least {lo} bytes")
    if PyBytes_GET_SIZE(b) > hi:
        raise InvalidRecord(
            f"{field}: {PyBytes_GET_SIZE(b)} bytes of UTF-8, the limit is {hi}"
        )
    return b


cdef bytes hash_field(value, str field, Py_ssize_t size, bint optional):
    if value is None:
        if optional:
            return None
        raise InvalidRecord(f"{field}: required, got None")
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise InvalidRecord(f"{field}: expected {size} bytes, got {type(value).__name__}")
    if PyBytes_GET_SIZE(value) != size:
        raise InvalidRecord(f"{field}: expected {size} bytes, got {PyBytes_GET_SIZE(value)}")
    return value


cdef uint8_t enum_field(value, str field, tuple names) except 255:
    cdef Py_ssize_t i
    if isinstance(value, bool):
        raise InvalidRecord(f"{field}: expected a name or number, got bool")
    if isinstance(value, int):
        if 0 <= value < len(names):
            return <uint8_t>value
        raise InvalidRecord(f"{field}: unknown value {value!r} (known: 0..{len(names) - 1})")
    if isinstance(value, str):
        wanted = (<str>value).replace("_", "").replace(" ", "").lower()
        for i in range(len(names)):
            if (<str>names[i]).replace("_", "") == wanted:
                return <uint8_t>i
        raise InvalidRecord(f"{field}: unknown value {value!r} (known: {', '.join(names)})")
    raise InvalidRecord(f"{field}: expected a name or number, got {type(value).__name__}")


cdef uint64_t timestamp_field(value) except? 0:
    if value is None:
        return <uint64_t>(time.time_ns() // 1000)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(
            f"timestamp: expected int microseconds since the Unix epoch, got {type(value).__name__}"
        )
    if value < 0 or value >= (1 << 64):
        raise InvalidRecord(f"timestamp: {value} is outside 0..2**64-1 microseconds")
    return <uint64_t>value


cdef tuple signers_field(value):
    cdef list keys = []
    if value is None:
        return ()
    if isinstance(value, (bytes, bytearray, str)):
        raise InvalidRecord("signers: expected a sequence of 32-byte public keys, got a single value")
    for key in value:
        key = hash_field(key, "signers", KEY_SIZE, False)
        if key in keys:
            raise InvalidRecord(f"signers: public key {key.hex()} is listed twice")
        keys.append(key)
    if len(keys) > MAX_SIGNERS:
        raise InvalidRecord(f"signers: {len(keys)} keys, the limit is {MAX_SIGNERS}")
    return tuple(keys)


cdef bytes vector_field(value):
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidRecord("vector: expected a sequence of numbers") from None
    if array.ndim != 1:
        raise InvalidRecord(f"vector: expected one dimension, got {array.ndim}")
    if not 1 <= array.shape[0] <= MAX_VECTOR:
        raise InvalidRecord(f"vector: {array.shape[0]} values, allowed 1..{MAX_VECTOR}")
    with np.errstate(over="ignore"):
        packed = array.astype("<f4")
    if not np.isfinite(packed).all():
        raise InvalidRecord("vector: every value must be finite as a 32-bit float")
    packed[packed == 0] = 0.0  # one canonical zero
    return packed.tobytes()


# ----------------------------------------------------------------------------
# Entity references as object values.

cdef class Ref:
    """A reference to an entity, used as an assertion's object: `Ref("acme-corp")`."""

    cdef readonly str entity

    def __init__(self, entity):
        utf8_field(entity, "object (reference)", 1, MAX_REFERENCE)
        self.entity = entity

    def __eq__(self, other):
        return isinstance(other, Ref) and (<Ref>other).entity == self.entity

    def __hash__(self):
        return hash(("stemedb.Ref", self.entity))

    def __repr__(self):
        return f"Ref({self.entity!r})"

    def __reduce__(self):
        return (Ref, (self.entity,))


# ----------------------------------------------------------------------------
# Record cores.

cdef class Record:
    """Fields and encoding shared by every record kind: signers, proof, timestamp."""

    def __cinit__(self):
        self._signers = ()
        self._signatures = ()

    cdef uint8_t kind_code(self):
        return 0

    cdef uint8_t header_version(self):
        return FORMAT_VERSION

    cdef Py_ssize_t body_size(self):
        return 0

    cdef uint8_t* write_body(self, uint8_t* out):
        return out

    cdef Py_ssize_t content_size(self):
        return HEADER_SIZE + SIZE_U8 + KEY_SIZE * len(self._signers) + self.body_size()

    cdef uint8_t* write_content(self, uint8_t* out):
        cdef uint8_t* p
        cdef Py_ssize_t size = self.content_size()
        if size > <Py_ssize_t>0xFFFFFFFF:
            raise InvalidRecord(f"record: content of {size} bytes exceeds 2**32-1")
        p = write_header(out, self.header_version(), self.kind_code(), <uint32_t>size,
                         <uint8_t>len(self._signers))
        for key in self._signers:
            p = put_blob(p, <bytes>key)
        return self.write_body(p)

    cdef Py_ssize_t proof_size(self):
        if self._envelope is not None:
            return SIZE_U8 + ID_SIZE
        if self._signatures:
            return SIZE_U8 + SIZE_U8 + SIGNATURE_ENTRY_SIZE * len(self._signatures)
        return SIZE_U8

    cdef uint8_t* write_proof(self, uint8_t* out):
        cdef uint8_t* p = out
        if self._envelope is not None:
            p = put_u8(p, PROOF_ENVELOPE)
            return put_blob(p, self._envelope)
        if self._signatures:
            p = put_u8(p, PROOF_SIGNATURES)
            p = put_u8(p, <uint8_t>len(self._signatures))
            for index, signature in self._signatures:
                p = put_u8(p, <uint8_t>index)
                p = put_blob(p, <bytes>signature)
            return p
        return put_u8(p, PROOF_NONE)

    cdef void copy_base_into(self, Record other):
        other._signers = self._signers
        other._signatures = self._signatures
        other._envelope = self._envelope
        other._timestamp = self._timestamp
        other._content_cache = self._content_cache
        other._id_cache = self._id_cache

    # -- Python-visible API -------------------------------------------------

    @property
    def timestamp(self):
        """Microseconds since the Unix epoch, set by the writer."""
        return self._timestamp

    @property
    def signers(self):
        """Declared signer public keys (part of the ID), in order."""
        return self._signers

    @property
    def signatures(self):
        """(public key, signature) pairs carried by this record; not part of the ID."""
        return tuple((self._signers[i], s) for i, s in self._signatures)

    @property
    def _signature_entries(self):
        """(signer index, signature) pairs, ascending index (the wire form)."""
        return self._signatures

    @property
    def envelope(self):
        """ID of the envelope that proves this record, or None."""
        return self._envelope

    @property
    def format_version(self):
        """The header's version byte: 1, or 2 for a vote that carries its assertion's subject."""
        return self.header_version()

    def content(self):
        """The canonical content bytes: what the ID hashes."""
        cdef Py_ssize_t size
        cdef bytes out
        if self._content_cache is None:
            size = self.content_size()
            out = PyBytes_FromStringAndSize(NULL, size)
            self.write_content(<uint8_t*>PyBytes_AS_STRING(out))
            self._content_cache = out
        return self._content_cache

    def encode(self):
        """Canonical content followed by the proof section (docs/format.md)."""
        cdef bytes content = self.content()
        cdef Py_ssize_t csize = PyBytes_GET_SIZE(content)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, csize + self.proof_size())
        cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(p, PyBytes_AS_STRING(content), csize)
        self.write_proof(p + csize)
        return out

    @property
    def id(self):
        """BLAKE3-256 of the canonical content (signer keys in, signatures out)."""
        cdef bytes content
        cdef bytes digest
        if self._id_cache is None:
            content = self.content()
            digest = PyBytes_FromStringAndSize(NULL, ID_SIZE)
            stm_blake3(<const uint8_t*>PyBytes_AS_STRING(content), PyBytes_GET_SIZE(content),
                       <uint8_t*>PyBytes_AS_STRING(digest))
            self._id_cache = digest
        return self._id_cache

    def _with_proof(self, signers, signatures, envelope):
        """A copy with another signer list and proof (used by signing)."""
        cdef Record copy = type(self).__new__(type(self))
        self._copy_fields_into(copy)
        self.copy_base_into(copy)
        signers = tuple(signers)
        if signers != self._signers:
            copy._signers = signers_field(signers)
            copy._content_cache = None
            copy._id_cache = None
        copy._signatures = tuple(sorted(signatures))
        copy._envelope = envelope
        return copy

    def _copy_fields_into(self, other):
        raise NotImplementedError

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.content() == (<Record>other).content() and \
            self._signatures == (<Record>other)._signatures and \
            self._envelope == (<Record>other)._envelope

    def __hash__(self):
        return hash(self.id)

    def __reduce__(self):
        return (decode, (self.encode(),))


cdef inline Py_ssize_t pair_size(bytes subject, bytes predicate):
    return SIZE_U16 + PyBytes_GET_SIZE(subject) + SIZE_U16 + PyBytes_GET_SIZE(predicate)


cdef uint8_t* write_pair(uint8_t* p, bytes subject, bytes predicate):
    """subject_len:u16 subject predicate_len:u16 predicate: how an assertion's body starts,
    and what the pair key hashes."""
    p = put_u16(p, <uint16_t>PyBytes_GET_SIZE(subject))
    p = put_blob(p, subject)
    p = put_u16(p, <uint16_t>PyBytes_GET_SIZE(predicate))
    return put_blob(p, predicate)


cdef set_object(AssertionCore self, value):
    cdef double number
    if isinstance(value, bool):
        self._tag = OBJECT_BOOLEAN
        self._number = 1.0 if value else 0.0
    elif isinstance(value, str):
        self._tag = OBJECT_TEXT
        self._object_bytes = utf8_field(value, "object (text)", 0, MAX_TEXT)
    elif isinstance(value, Ref):
        self._tag = OBJECT_REFERENCE
        self._object_bytes = (<Ref>value).entity.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        self._tag = OBJECT_BYTES
        self._object_bytes = bytes(value)
        if PyBytes_GET_SIZE(self._object_bytes) > MAX_BYTES:
            raise InvalidRecord(
                f"object (bytes): {PyBytes_GET_SIZE(self._object_bytes)} bytes, the limit is {MAX_BYTES}"
            )
    elif isinstance(value, int):
        if not -(1 << 53) <= value <= (1 << 53):
            raise InvalidRecord(
                f"object (number): integer {value} cannot be stored exactly as a 64-bit float; "
                "pass a float or a str"
            )
        self._tag = OBJECT_NUMBER
        self._number = <double>value
    elif isinstance(value, float):
        number = value
        if not isfinite(number):
            raise InvalidRecord(f"object (number): {value!r} is not finite")
        self._tag = OBJECT_NUMBER
        self._number = 0.0 if number == 0 else number
    else:
        raise InvalidRecord(
            f"object: unsupported type {type(value).__name__} "
            "(use str, int, float, bool, bytes or stemedb.Ref)"
        )


cdef class AssertionCore(Record):
    cdef uint8_t kind_code(self):
        return KIND_ASSERTION

    def _init(self, subject, predicate, value, confidence, timestamp, source_class, lifecycle,
              source_hash, parent_hash, epoch, visual_hash, vector, signers):
        cdef double conf
        self._subject = utf8_field(subject, "subject", 1, MAX_SUBJECT)
        self._predicate = utf8_field(predicate, "predicate", 1, MAX_PREDICATE)
        set_object(self, value)
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            raise InvalidRecord(f"confidence: expected a number in [0, 1], got {type(confidence).__name__}")
        conf = confidence
        if isnan(conf):
            raise InvalidRecord("confidence: NaN is not allowed (expected a number in [0, 1])")
        if not (0.0 <= conf <= 1.0):
            raise InvalidRecord(f"confidence: {confidence!r} is outside [0, 1]")
        self._confidence = <float>conf
        if self._confidence == 0:
            self._confidence = 0.0
        self._timestamp = timestamp_field(timestamp)
        self._source_class = enum_field(source_class, "source_class", SOURCE_CLASS_NAMES)
        self._lifecycle = enum_field(lifecycle, "lifecycle", LIFECYCLE_NAMES)
        if source_hash is None:
            source_hash = bytes(SOURCE_HASH_SIZE)
        self._source_hash = hash_field(source_hash, "source_hash", SOURCE_HASH_SIZE, False)
        self._parent_hash = hash_field(parent_hash, "parent_hash", ID_SIZE, True)
        self._epoch = hash_field(epoch, "epoch", ID_SIZE, True)
        self._visual_hash = hash_field(visual_hash, "visual_hash", VISUAL_HASH_SIZE, True)
        self._vector = vector_field(vector)
        self._signers = signers_field(signers)

    def _copy_fields_into(self, AssertionCore other):
        other._subject = self._subject
        other._predicate = self._predicate
        other._tag = self._tag
        other._object_bytes = self._object_bytes
        other._number = self._number
        other._confidence = self._confidence
        other._source_class = self._source_class
        other._lifecycle = self._lifecycle
        other._source_hash = self._source_hash
        other._parent_hash = self._parent_hash
        other._epoch = self._epoch
        other._visual_hash = self._visual_hash
        other._vector = self._vector

    cdef Py_ssize_t body_size(self):
        cdef Py_ssize_t n = (pair_size(self._subject, self._predicate) + SIZE_U8  # object_tag
                             + SIZE_F32 + SIZE_U64 + SIZE_U8 + SIZE_U8  # confidence .. lifecycle
                             + SOURCE_HASH_SIZE + SIZE_U8)  # source_hash, optional_mask
        if self._tag == OBJECT_TEXT or self._tag == OBJECT_BYTES:
            n += SIZE_U32 + PyBytes_GET_SIZE(self._object_bytes)
        elif self._tag == OBJECT_REFERENCE:
            n += SIZE_U16 + PyBytes_GET_SIZE(self._object_bytes)
        elif self._tag == OBJECT_NUMBER:
            n += SIZE_F64
        else:
            n += SIZE_U8
        if self._parent_hash is not None:
            n += ID_SIZE
        if self._epoch is not None:
            n += ID_SIZE
        if self._visual_hash is not None:
            n += VISUAL_HASH_SIZE
        if self._vector is not None:
            n += SIZE_U16 + PyBytes_GET_SIZE(self._vector)
        return n

    cdef uint8_t* write_body(self, uint8_t* p):
        cdef uint8_t optional = 0
        p = write_pair(p, self._subject, self._predicate)
        p = put_u8(p, self._tag)
        if self._tag == OBJECT_TEXT or self._tag == OBJECT_BYTES:
            p = put_u32(p, <uint32_t>PyBytes_GET_SIZE(self._object_bytes))
            p = put_blob(p, self._object_bytes)
        elif self._tag == OBJECT_REFERENCE:
            p = put_u16(p, <uint16_t>PyBytes_GET_SIZE(self._object_bytes))
            p = put_blob(p, self._object_bytes)
        elif self._tag == OBJECT_NUMBER:
            p = put_f64(p, self._number)
        else:
            p = put_u8(p, 1 if self._number != 0 else 0)
        p = put_f32(p, self._confidence)
        p = put_u64(p, self._timestamp)
        p = put_u8(p, self._source_class)
        p = put_u8(p, self._lifecycle)
        p = put_blob(p, self._source_hash)
        if self._parent_hash is not None:
            optional |= HAS_PARENT_HASH
        if self._epoch is not None:
            optional |= HAS_EPOCH
        if self._visual_hash is not None:
            optional |= HAS_VISUAL_HASH
        if self._vector is not None:
            optional |= HAS_VECTOR
        p = put_u8(p, optional)
        if self._parent_hash is not None:
            p = put_blob(p, self._parent_hash)
        if self._epoch is not None:
            p = put_blob(p, self._epoch)
        if self._visual_hash is not None:
            p = put_blob(p, self._visual_hash)
        if self._vector is not None:
            p = put_u16(p, <uint16_t>(PyBytes_GET_SIZE(self._vector) // SIZE_F32))
            p = put_blob(p, self._vector)
        return p

    @property
    def subject(self):
        return self._subject.decode("utf-8")

    @property
    def predicate(self):
        return self._predicate.decode("utf-8")

    def _object_value(self):
        if self._tag == OBJECT_TEXT:
            return self._object_bytes.decode("utf-8")
        if self._tag == OBJECT_NUMBER:
            return self._number
        if self._tag == OBJECT_BOOLEAN:
            return self._number != 0
        if self._tag == OBJECT_REFERENCE:
            return Ref(self._object_bytes.decode("utf-8"))
        return self._object_bytes

    @property
    def object_tag(self):
        """1 text, 2 number, 3 boolean, 4 reference, 5 bytes (docs/format.md)."""
        return self._tag

    @property
    def confidence(self):
        return self._confidence

    @property
    def _source_class_code(self):
        return self._source_class

    @property
    def _lifecycle_code(self):
        return self._lifecycle

    @property
    def source_hash(self):
        return self._source_hash

    @property
    def parent_hash(self):
        return self._parent_hash

    @property
    def epoch(self):
        return self._epoch

    @property
    def visual_hash(self):
        return self._visual_hash

    @property
    def vector(self):
        if self._vector is None:
            return None
        return tuple(np.frombuffer(self._vector, dtype="<f4").tolist())


cdef class VoteCore(Record):
    cdef uint8_t kind_code(self):
        return KIND_VOTE

    cdef uint8_t header_version(self):
        return FORMAT_VERSION if self._subject is None else VOTE_FORMAT_VERSION

    def _init(self, assertion_id, weight, timestamp, signers, subject=None):
        cdef double w
        self._assertion_id = hash_field(assertion_id, "assertion_id", ID_SIZE, False)
        self._subject = None if subject is None else utf8_field(subject, "subject", 1, LIMIT_SUBJECT)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidRecord(f"weight: expected a number, got {type(weight).__name__}")
        w = weight
        if not isfinite(w) or not isfinite(<float>w):
            raise InvalidRecord(f"weight: {weight!r} is not finite as a 32-bit float")
        self._weight = <float>w
        if self._weight == 0:
            self._weight = 0.0
        self._timestamp = timestamp_field(timestamp)
        self._signers = signers_field(signers)

    def _copy_fields_into(self, VoteCore other):
        other._assertion_id = self._assertion_id
        other._weight = self._weight
        other._subject = self._subject

    cdef Py_ssize_t body_size(self):
        cdef Py_ssize_t n = ID_SIZE + SIZE_F32 + SIZE_U64
        if self._subject is not None:
            n += SIZE_U16 + PyBytes_GET_SIZE(self._subject)
        return n

    cdef uint8_t* write_body(self, uint8_t* p):
        p = put_blob(p, self._assertion_id)
        p = put_f32(p, self._weight)
        p = put_u64(p, self._timestamp)
        if self._subject is not None:
            p = put_u16(p, <uint16_t>PyBytes_GET_SIZE(self._subject))
            p = put_blob(p, self._subject)
        return p

    @property
    def assertion_id(self):
        return self._assertion_id

    @property
    def weight(self):
        return self._weight

    @property
    def subject(self):
        """The voted assertion's subject (format version 2), or None (version 1)."""
        return None if self._subject is None else self._subject.decode("utf-8")



cdef class EpochCore(Record):
    cdef uint8_t kind_code(self):
        return KIND_EPOCH

    def _init(self, name, description, timestamp, supersedes, kind, signers):
        self._name = utf8_field(name, "name", 1, MAX_EPOCH_NAME)
        self._description = utf8_field(description, "description", 0, MAX_DESCRIPTION)
        self._timestamp = timestamp_field(timestamp)
        if supersedes is None:
            supersedes = ()
        if isinstance(supersedes, (bytes, bytearray, str)):
            raise InvalidRecord("supersedes: expected a sequence of 32-byte epoch IDs, got a single value")
        ids = tuple(hash_field(x, "supersedes", ID_SIZE, False) for x in supersedes)
        if len(ids) > MAX_SUPERSEDES:
            raise InvalidRecord(f"supersedes: {len(ids)} epochs, the limit is {MAX_SUPERSEDES}")
        if len(set(ids)) != len(ids):
            raise InvalidRecord("supersedes: an epoch ID is listed twice")
        self._supersedes = ids
        self._kind = enum_field(kind, "supersession_kind", SUPERSESSION_NAMES)
        self._signers = signers_field(signers)

    def _copy_fields_into(self, EpochCore other):
        other._name = self._name
        other._description = self._description
        other._kind = self._kind
        other._supersedes = self._supersedes

    cdef Py_ssize_t body_size(self):
        return (SIZE_U16 + PyBytes_GET_SIZE(self._name) + SIZE_U32 + PyBytes_GET_SIZE(self._description)
                + SIZE_U64 + SIZE_U8 + SIZE_U16 + ID_SIZE * len(self._supersedes))

    cdef uint8_t* write_body(self, uint8_t* p):
        p = put_u16(p, <uint16_t>PyBytes_GET_SIZE(self._name))
        p = put_blob(p, self._name)
        p = put_u32(p, <uint32_t>PyBytes_GET_SIZE(self._description))
        p = put_blob(p, self._description)
        p = put_u64(p, self._timestamp)
        p = put_u8(p, self._kind)
        p = put_u16(p, <uint16_t>len(self._supersedes))
        for epoch_id in self._supersedes:
            p = put_blob(p, <bytes>epoch_id)
        return p

    @property
    def name(self):
        return self._name.decode("utf-8")

    @property
    def description(self):
        return self._description.decode("utf-8")

    @property
    def supersedes(self):
        return self._supersedes

    @property
    def _supersession_code(self):
        return self._kind


cdef class EnvelopeCore(Record):
    cdef uint8_t kind_code(self):
        return KIND_ENVELOPE

    def _init(self, signer_key, members, timestamp):
        cdef Py_ssize_t n
        self._signers = signers_field((signer_key,))
        self._timestamp = timestamp_field(timestamp)
        if isinstance(members, np.ndarray):
            if members.dtype != np.uint8 or members.ndim != 2 or members.shape[1] != ID_SIZE:
                raise InvalidRecord("members: expected an (n, 32) uint8 array of record IDs")
            packed = np.ascontiguousarray(members).tobytes()
        else:
            packed = b"".join([hash_field(m, "members", ID_SIZE, False) for m in members])
        n = len(packed) // ID_SIZE
        if not 1 <= n <= MAX_MEMBERS:
            raise InvalidRecord(f"members: {n} record IDs, allowed 1..{MAX_MEMBERS}")
        self._members = packed

    def _copy_fields_into(self, EnvelopeCore other):
        other._members = self._members

    cdef Py_ssize_t body_size(self):
        return SIZE_U64 + SIZE_U32 + PyBytes_GET_SIZE(self._members)

    cdef uint8_t* write_body(self, uint8_t* p):
        p = put_u64(p, self._timestamp)
        p = put_u32(p, <uint32_t>(PyBytes_GET_SIZE(self._members) // ID_SIZE))
        return put_blob(p, self._members)

    @property
    def members(self):
        """Member record IDs, in the order they were listed."""
        cdef bytes m = self._members
        return tuple(m[i:i + ID_SIZE] for i in range(0, len(m), ID_SIZE))

    @property
    def member_count(self):
        return PyBytes_GET_SIZE(self._members) // ID_SIZE

    def member_array(self):
        """Member IDs as an (n, 32) uint8 numpy array (no copy of the bytes)."""
        return np.frombuffer(self._members, dtype=np.uint8).reshape(-1, ID_SIZE)


# ----------------------------------------------------------------------------
# Decoding: strict, canonical-only. The walk found every field; these judge
# them (limits, UTF-8, canonical floats, enum ranges) and build the objects.

cdef inline bytes bytes_at(const uint8_t* p, Py_ssize_t size):
    return PyBytes_FromStringAndSize(<const char*>p, size)


cdef inline bytes span_bytes(Span s):
    return bytes_at(s.data, s.size)


cdef inline bint _all_ascii(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint8_t seen = 0
    for i in range(n):
        seen |= p[i]
    return seen < 0x80


cdef bytes span_utf8(Span s, str field, Py_ssize_t lo, Py_ssize_t hi):
    """The bytes of a length-prefixed string: lo..hi of them, valid UTF-8."""
    cdef bytes b
    if s.size < lo or s.size > hi:
        if lo == 0:
            raise InvalidRecord(f"{field}: {s.size} bytes, the limit is {hi}")
        raise InvalidRecord(f"{field}: length {s.size}, allowed {lo}..{hi}")
    b = span_bytes(s)
    if _all_ascii(s.data, s.size):
        return b          # ASCII is valid UTF-8: no str object made and thrown away
    try:
        b.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(f"{field}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return b


cdef inline bytes optional_bytes(const uint8_t* p, Py_ssize_t size):
    return bytes_at(p, size) if p != NULL else None


cdef float canonical_f32(float v, str field) except? -1:
    if isnan(v):
        raise InvalidRecord(f"{field}: NaN is not allowed")
    if v == 0 and signbit(v):
        raise InvalidRecord(f"{field}: negative zero is not canonical")
    return v


cdef extern from *:
    """
    static PyObject* stm_tp_new(PyObject* cls, PyObject* args) {
        return ((PyTypeObject*)cls)->tp_new((PyTypeObject*)cls, args, NULL);
    }
    """
    object _tp_new "stm_tp_new"(object cls, object args)


cdef Record new_record(uint8_t kind):
    cls = _classes[kind]
    if cls is None:
        raise RuntimeError("stemedb.records has not registered its classes")
    return _tp_new(cls, ())     # as cls.__new__(cls), without looking __new__ up per record


cdef tuple decode_signers(const RecordFields* f):
    cdef Py_ssize_t i, count = f.signers.size // KEY_SIZE
    cdef list keys = []
    if count > MAX_SIGNERS:
        raise InvalidRecord(f"signer_count: {count}, the limit is {MAX_SIGNERS}")
    for i in range(count):
        key = bytes_at(f.signers.data + i * KEY_SIZE, KEY_SIZE)
        if key in keys:
            raise InvalidRecord(f"signers: public key {key.hex()} is listed twice")
        keys.append(key)
    return tuple(keys)


cdef int decode_object(AssertionCore a, const AssertionFields* b) except -1:
    cdef double number
    cdef uint8_t byte
    if b.object_tag == OBJECT_TEXT:
        a._object_bytes = span_utf8(b.value, "object (text)", 0, MAX_TEXT)
    elif b.object_tag == OBJECT_NUMBER:
        number = get_f64(b.value.data)
        if not isfinite(number):
            raise InvalidRecord("object (number): not finite")
        if number == 0 and signbit(number):
            raise InvalidRecord("object (number): negative zero is not canonical")
        a._number = number
    elif b.object_tag == OBJECT_BOOLEAN:
        byte = b.value.data[0]
        if byte > 1:
            raise InvalidRecord(f"object (boolean): byte {byte}, expected 0 or 1")
        a._number = byte
    elif b.object_tag == OBJECT_REFERENCE:
        a._object_bytes = span_utf8(b.value, "object (reference)", 1, MAX_REFERENCE)
    else:
        if b.value.size > MAX_BYTES:
            raise InvalidRecord(f"object (bytes): {b.value.size} bytes, the limit is {MAX_BYTES}")
        a._object_bytes = span_bytes(b.value)
    a._tag = b.object_tag
    return 0


cdef int decode_vector(AssertionCore a, Span vector) except -1:
    cdef Py_ssize_t i, n = vector.size // SIZE_F32
    if n < 1 or n > MAX_VECTOR:
        raise InvalidRecord(f"vector: {n} values, allowed 1..{MAX_VECTOR}")
    for i in range(n):
        if not isfinite(canonical_f32(get_f32(vector.data + i * SIZE_F32), "vector")):
            raise InvalidRecord("vector: every value must be finite")
    a._vector = span_bytes(vector)
    return 0


cdef int decode_assertion(AssertionCore a, const AssertionFields* b) except -1:
    a._subject = span_utf8(b.subject, "subject", 1, MAX_SUBJECT)
    a._predicate = span_utf8(b.predicate, "predicate", 1, MAX_PREDICATE)
    decode_object(a, b)
    a._confidence = canonical_f32(b.confidence, "confidence")
    if not (0 <= a._confidence <= 1):
        raise InvalidRecord(f"confidence: {a._confidence!r} is outside [0, 1]")
    a._timestamp = b.timestamp
    if b.source_class >= len(SOURCE_CLASS_NAMES):
        raise InvalidRecord(f"source_class: unknown value {b.source_class}")
    a._source_class = b.source_class
    if b.lifecycle >= len(LIFECYCLE_NAMES):
        raise InvalidRecord(f"lifecycle: unknown value {b.lifecycle}")
    a._lifecycle = b.lifecycle
    a._source_hash = bytes_at(b.source_hash, SOURCE_HASH_SIZE)
    if b.optional_mask & OPTIONAL_RESERVED:
        raise InvalidRecord(f"optional fields mask: reserved bits set (0x{b.optional_mask:02x})")
    a._parent_hash = optional_bytes(b.parent_hash, ID_SIZE)
    a._epoch = optional_bytes(b.epoch, ID_SIZE)
    a._visual_hash = optional_bytes(b.visual_hash, VISUAL_HASH_SIZE)
    if b.vector.data != NULL:
        decode_vector(a, b.vector)
    return 0


cdef int decode_vote(VoteCore v, const VoteFields* b) except -1:
    v._assertion_id = bytes_at(b.assertion_id, ID_SIZE)
    v._weight = canonical_f32(b.weight, "weight")
    if not isfinite(v._weight):
        raise InvalidRecord("weight: not finite")
    v._timestamp = b.timestamp
    v._subject = span_utf8(b.subject, "subject", 1, MAX_SUBJECT) if b.subject.data != NULL else None
    return 0


cdef int decode_epoch(EpochCore e, const EpochFields* b) except -1:
    cdef Py_ssize_t i, count = b.supersedes.size // ID_SIZE
    e._name = span_utf8(b.name, "name", 1, MAX_EPOCH_NAME)
    e._description = span_utf8(b.description, "description", 0, MAX_DESCRIPTION)
    e._timestamp = b.timestamp
    if b.supersession_kind >= len(SUPERSESSION_NAMES):
        raise InvalidRecord(f"supersession_kind: unknown value {b.supersession_kind}")
    e._kind = b.supersession_kind
    if count > MAX_SUPERSEDES:
        raise InvalidRecord(f"supersedes: {count} epochs, the limit is {MAX_SUPERSEDES}")
    ids = tuple([bytes_at(b.supersedes.data + i * ID_SIZE, ID_SIZE) for i in range(count)])
    if len(set(ids)) != len(ids):
        raise InvalidRecord("supersedes: an epoch ID is listed twice")
    e._supersedes = ids
    return 0


cdef int decode_envelope(EnvelopeCore env, const RecordFields* f) except -1:
    cdef const EnvelopeFields* b = &f.fields.envelope
    cdef Py_ssize_t count = b.members.size // ID_SIZE
    if len(env._signers) != 1:
        raise InvalidRecord(f"signers: an envelope has exactly one signer, found {len(env._signers)}")
    env._timestamp = b.timestamp
    if count < 1 or count > MAX_MEMBERS:
        raise InvalidRecord(f"members: {count} record IDs, allowed 1..{MAX_MEMBERS}")
    env._members = span_bytes(b.members)
    return 0


cdef int decode_proof(Record rec, const RecordFields* f) except -1:
    cdef const ProofFields* proof = &f.proof
    cdef Py_ssize_t i, count, signers = len(rec._signers)
    cdef int index, last_index = -1
    cdef list entries = []
    if proof.kind == PROOF_SIGNATURES:
        count = signature_count(proof)
        if count < 1 or count > signers:
            raise InvalidRecord(f"signatures: count {count}, allowed 1..{signers} (the signer count)")
        for i in range(count):
            index = signature_index(proof, i)
            if index <= last_index or index >= signers:
                raise InvalidRecord(
                    f"signatures: signer index {index} out of order or not below the signer count {signers}"
                )
            last_index = index
            entries.append((index, bytes_at(signature_bytes(proof, i), SIGNATURE_SIZE)))
        rec._signatures = tuple(entries)
    elif proof.kind == PROOF_ENVELOPE:
        if f.kind == KIND_ENVELOPE:
            raise InvalidRecord("proof: an envelope cannot be proven by another envelope")
        rec._envelope = bytes_at(proof.envelope, ID_SIZE)
    return 0


cdef Record decode_at(const uint8_t* data, Py_ssize_t length, Py_ssize_t* consumed):
    """Decode one record from data[0:length]; sets consumed to the bytes used."""
    cdef Reader r
    cdef RecordFields f
    cdef Record rec
    if not walk_record(&r, &f, data, length):
        raise InvalidRecord(parse_failure(&r))
    rec = new_record(f.kind)
    rec._signers = decode_signers(&f)
    if f.kind == KIND_ASSERTION:
        decode_assertion(<AssertionCore>rec, &f.fields.assertion)
    elif f.kind == KIND_VOTE:
        decode_vote(<VoteCore>rec, &f.fields.vote)
    elif f.kind == KIND_EPOCH:
        decode_epoch(<EpochCore>rec, &f.fields.epoch)
    else:
        decode_envelope(<EnvelopeCore>rec, &f)
    rec._content_cache = span_bytes(f.content)
    decode_proof(rec, &f)
    consumed[0] = r.pos
    return rec


def decode(data):
    """Decode exactly one record from `data` (any bytes-like object).

    Raises InvalidRecord naming the field for truncated, trailing,
    non-canonical or out-of-range bytes.
    """
    cdef const uint8_t[::1] view
    cdef Py_ssize_t consumed = 0
    cdef Record rec
    try:
        view = data
    except (TypeError, ValueError):
        raise InvalidRecord(f"data: expected a bytes-like object, got {type(data).__name__}") from None
    if view.shape[0] == 0:
        raise InvalidRecord("header: truncated: empty input")
    rec = decode_at(&view[0], view.shape[0], &consumed)
    if consumed != view.shape[0]:
        raise InvalidRecord(f"trailing bytes: {view.shape[0] - consumed} bytes after the record's proof")
    return rec


cdef const int64_t[::1] checked_offsets(offsets, Py_ssize_t size) except *:
    cdef const int64_t[::1] offs = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef Py_ssize_t i
    if offs.shape[0] < 1:
        raise ValueError("offsets: needs at least one entry (n records need n + 1 offsets)")
    for i in range(offs.shape[0]):
        if offs[i] < 0 or offs[i] > size or (i > 0 and offs[i] < offs[i - 1]):
            raise ValueError(f"offsets[{i}] = {offs[i]} is decreasing or outside the buffer of {size} bytes")
    return offs


def decode_many(buffer, offsets):
    """Decode the records at buffer[offsets[i]:offsets[i+1]]; returns a list."""
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef Py_ssize_t i, consumed, start, length
    cdef list out = []
    for i in range(offs.shape[0] - 1):
        start = offs[i]
        length = offs[i + 1] - start
        if length == 0:
            raise InvalidRecord(f"record {i}: empty")
        try:
            rec = decode_at(&view[start], length, &consumed)
        except InvalidRecord as exc:
            raise InvalidRecord(f"record {i}: {exc}") from None
        if consumed != length:
            raise InvalidRecord(f"record {i}: trailing bytes: {length - consumed} after the proof")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------
# Batches: encode and hash many records per call.

def encode_many(records, bint remember=False, before=()):
    """Encode many records at once (after the records of `before`, if any, in one blob).

    Returns (blob, offsets, ids): record i is blob[offsets[i]:offsets[i+1]]
    (content then proof) and its ID is ids[i], an (n, 32) uint8 array. The
    hashing runs without the GIL, several records per SIMD lane group;
    records whose ID is already known are not hashed again. With remember,
    each record keeps its content and ID (what signing a batch wants, so
    that storing the signed members later costs no second encode or hash).
    """
    cdef list items = list(before) if before else []
    cdef Py_ssize_t first = len(items)
    items.extend(records)
    cdef Py_ssize_t n = len(items), i, total = 0, csize, pending = 0
    cdef Record rec
    offsets = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] offs = offsets
    cdef size_t* lens = <size_t*>malloc(max(n, 1) * sizeof(size_t))
    cdef const uint8_t** ptrs = <const uint8_t**>malloc(max(n, 1) * sizeof(uint8_t*))
    cdef int64_t* slots = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
    cdef uint8_t* digests = NULL
    cdef bytes blob
    cdef uint8_t* base
    cdef uint8_t* p
    ids = np.empty((n, ID_SIZE), dtype=np.uint8)
    cdef uint8_t[:, ::1] idv = ids
    if lens == NULL or ptrs == NULL or slots == NULL:
        free(lens)
        free(ptrs)
        free(slots)
        raise MemoryError()
    try:
        for i in range(n):
            obj = items[i]
            if not isinstance(obj, Record):
                where = f"records[{i - first}]" if i >= first else f"envelope[{i}]"
                raise InvalidRecord(f"{where}: expected a StemeDB record, got {type(obj).__name__}")
            rec = <Record>obj
            csize = (PyBytes_GET_SIZE(rec._content_cache) if rec._content_cache is not None
                     else rec.content_size())
            lens[i] = csize
            offs[i] = total
            total += csize + rec.proof_size()
        offs[n] = total
        blob = PyBytes_FromStringAndSize(NULL, total)
        base = <uint8_t*>PyBytes_AS_STRING(blob)
        for i in range(n):
            rec = <Record>items[i]
            p = base + offs[i]
            if rec._content_cache is not None:
                memcpy(p, PyBytes_AS_STRING(rec._content_cache), lens[i])
            else:
                rec.write_content(p)
            rec.write_proof(p + lens[i])
            if rec._id_cache is not None:
                memcpy(&idv[i, 0], PyBytes_AS_STRING(rec._id_cache), ID_SIZE)
            else:
                ptrs[pending] = p
                lens[pending] = lens[i]
                slots[pending] = i
                pending += 1
        if pending:
            digests = <uint8_t*>malloc(pending * ID_SIZE)
            if digests == NULL:
                raise MemoryError()
            with nogil:
                stm_blake3_many(ptrs, lens, pending, digests)
                for i in range(pending):
                    memcpy(&idv[slots[i], 0], digests + i * ID_SIZE, ID_SIZE)
        if remember:
            for i in range(n):
                rec = <Record>items[i]
                if rec._content_cache is None:
                    csize = offs[i + 1] - offs[i] - rec.proof_size()
                    rec._content_cache = PyBytes_FromStringAndSize(<const char*>(base + offs[i]), csize)
                if rec._id_cache is None:
                    rec._id_cache = PyBytes_FromStringAndSize(<const char*>&idv[i, 0], ID_SIZE)
    finally:
        free(lens)
        free(ptrs)
        free(slots)
        free(digests)
    return blob, offsets, ids


def ids_of(records):
    """IDs of many records as an (n, 32) uint8 array."""
    return encode_many(records)[2]


def content_lengths(buffer, offsets):
    """The content length (the hashed prefix) of each encoded record."""
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef Py_ssize_t i, n = offs.shape[0] - 1
    out = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] o = out
    cdef Reader r
    cdef RecordFields f
    for i in range(n):
        if not walk_header(&r, &f, &view[0] + offs[i], offs[i + 1] - offs[i]):
            raise InvalidRecord(f"record {i}: {parse_failure(&r)}")
        o[i] = f.content.size
    return out


def hash_encoded(buffer, offsets):
    """IDs of already-encoded records (hash of each content prefix), (n, 32) uint8."""
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef const int64_t[::1] clen = content_lengths(buffer, offsets)
    cdef Py_ssize_t i, n = offs.shape[0] - 1
    ids = np.empty((n, ID_SIZE), dtype=np.uint8)
    cdef uint8_t[:, ::1] idv = ids
    if n == 0:
        return ids
    cdef size_t* lens = <size_t*>malloc(n * sizeof(size_t))
    cdef const uint8_t** ptrs = <const uint8_t**>malloc(n * sizeof(uint8_t*))
    if lens == NULL or ptrs == NULL:
        free(lens)
        free(ptrs)
        raise MemoryError()
    for i in range(n):
        ptrs[i] = &view[0] + offs[i]
        lens[i] = clen[i]
    with nogil:
        stm_blake3_many(ptrs, lens, n, &idv[0, 0])
    free(lens)
    free(ptrs)
    return ids


# ----------------------------------------------------------------------------
# Column extraction: the fixed-width per-record fields the indexes and lenses
# read (docs/format.md, "Columns"). Keys are the first 8 bytes, little-endian,
# of a BLAKE3 hash: stable across versions and machines, so they can persist.

cdef inline uint64_t key64(const uint8_t* data, Py_ssize_t n) noexcept nogil:
    cdef uint8_t digest[ID_SIZE]
    stm_blake3(data, n, digest)
    return get_u64(digest)


def subject_key(str subject):
    """Posting-list key of a subject."""
    cdef bytes b = subject.encode("utf-8")
    return key64(<const uint8_t*>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def predicate_key(str predicate):
    """Posting-list key of a predicate."""
    cdef bytes b = predicate.encode("utf-8")
    return key64(<const uint8_t*>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def pair_key(str subject, str predicate):
    """Posting-list key of a (subject, predicate) pair.

    The key of the bytes exactly as they sit in an encoded assertion
    (write_pair): u16 len(subject), subject, u16 len(predicate), predicate.
    """
    cdef bytes s = subject.encode("utf-8")
    cdef bytes p = predicate.encode("utf-8")
    cdef Py_ssize_t size = pair_size(s, p)
    cdef bytes joined = PyBytes_FromStringAndSize(NULL, size)
    write_pair(<uint8_t*>PyBytes_AS_STRING(joined), s, p)
    return key64(<const uint8_t*>PyBytes_AS_STRING(joined), size)


def id_key(bytes record_id):
    """Key of a record ID (its first 8 bytes, little-endian)."""
    if len(record_id) != ID_SIZE:
        raise ValueError("record ID: expected 32 bytes")
    return get_u64(<const uint8_t*>PyBytes_AS_STRING(record_id))


COLUMNS = {
    "kind": np.uint8,           # RecordKind
    "timestamp": np.uint64,     # microseconds
    "confidence": np.float32,   # assertion confidence, vote weight, else 0
    "source_class": np.uint8,   # assertions; 255 otherwise
    "lifecycle": np.uint8,      # assertions; 255 otherwise
    "subject": np.uint64,       # subject key; 0 for non-assertions
    "predicate": np.uint64,     # predicate key
    "pair": np.uint64,          # (subject, predicate) key
    "object": np.uint64,        # key of object tag + value bytes (Consensus groups by it)
    "signer": np.uint64,        # first 8 bytes of the first signer key; 0 unsigned
    "epoch": np.uint64,         # key of the assertion's epoch, or 0
    "target": np.uint64,        # vote: key of the assertion voted on; assertion: parent key
    "proof": np.uint8,          # ProofKind
    "place": np.uint64,         # placement key: an assertion's subject key, a version-2 vote's
                                # (its assertion's subject); else 0 (placed in the global partition)
}


cdef enum:
    KEY_SUBJECT = 0             # an assertion's four keys, hashed together in SIMD lanes
    KEY_PREDICATE = 1
    KEY_PAIR = 2
    KEY_OBJECT = 3
    KEYS_PER_RECORD = 4
    NOT_AN_ASSERTION = 255      # source_class and lifecycle of the other kinds ("Columns")


cdef struct ColumnArrays:       # the COLUMNS arrays of one batch, as raw pointers (one row per record)
    uint8_t* kind
    uint64_t* timestamp
    float* confidence
    uint8_t* source_class
    uint8_t* lifecycle
    uint64_t* subject
    uint64_t* predicate
    uint64_t* pair
    uint64_t* object
    uint64_t* signer
    uint64_t* epoch
    uint64_t* target
    uint8_t* proof
    uint64_t* place


cdef struct KeyInputs:          # what one stm_blake3_many call hashes for a batch
    const uint8_t** data        # KEYS_PER_RECORD per assertion (+ one content per record for IDs)
    size_t* sizes
    int64_t* owner              # per record: an assertion's first key input; -2 - the input of a
                                # version-2 vote's subject; else -1
    Py_ssize_t count


cdef dict new_columns(Py_ssize_t n, ColumnArrays* c):
    """Zeroed COLUMNS arrays for n records, and pointers to them in c."""
    cdef dict out = {name: np.zeros(n, dtype=dtype) for name, dtype in COLUMNS.items()}
    cdef uint8_t[::1] kind = out["kind"]
    cdef uint64_t[::1] timestamp = out["timestamp"]
    cdef float[::1] confidence = out["confidence"]
    cdef uint8_t[::1] source_class = out["source_class"]
    cdef uint8_t[::1] lifecycle = out["lifecycle"]
    cdef uint64_t[::1] subject = out["subject"]
    cdef uint64_t[::1] predicate = out["predicate"]
    cdef uint64_t[::1] pair = out["pair"]
    cdef uint64_t[::1] obj = out["object"]
    cdef uint64_t[::1] signer = out["signer"]
    cdef uint64_t[::1] epoch = out["epoch"]
    cdef uint64_t[::1] target = out["target"]
    cdef uint8_t[::1] proof = out["proof"]
    cdef uint64_t[::1] place = out["place"]
    if n == 0:
        return out
    c.kind = &kind[0]
    c.timestamp = &timestamp[0]
    c.confidence = &confidence[0]
    c.source_class = &source_class[0]
    c.lifecycle = &lifecycle[0]
    c.subject = &subject[0]
    c.predicate = &predicate[0]
    c.pair = &pair[0]
    c.object = &obj[0]
    c.signer = &signer[0]
    c.epoch = &epoch[0]
    c.target = &target[0]
    c.proof = &proof[0]
    c.place = &place[0]
    return out


cdef int alloc_key_inputs(KeyInputs* k, Py_ssize_t n, Py_ssize_t per_record) except -1:
    cdef Py_ssize_t capacity = max(n, 1) * per_record
    k.data = <const uint8_t**>malloc(capacity * sizeof(uint8_t*))
    k.sizes = <size_t*>malloc(capacity * sizeof(size_t))
    k.owner = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
    k.count = 0
    if k.data == NULL or k.sizes == NULL or k.owner == NULL:
        free_key_inputs(k)
        raise MemoryError()
    return 0


cdef void free_key_inputs(KeyInputs* k) noexcept:
    free(k.data)
    free(k.sizes)
    free(k.owner)
    k.data = NULL
    k.sizes = NULL
    k.owner = NULL


cdef inline void add_key_input(KeyInputs* k, Span s) noexcept nogil:
    k.data[k.count] = s.data
    k.sizes[k.count] = s.size
    k.count += 1


cdef inline void fill_columns(ColumnArrays* c, Py_ssize_t i, const RecordFields* f,
                              KeyInputs* keys) noexcept nogil:
    """Row i of the columns from one walked record; an assertion's key inputs go to `keys`."""
    cdef const AssertionFields* a
    keys.owner[i] = -1
    c.kind[i] = f.kind
    c.proof[i] = f.proof.kind
    c.source_class[i] = NOT_AN_ASSERTION
    c.lifecycle[i] = NOT_AN_ASSERTION
    if f.signers.size:
        c.signer[i] = get_u64(f.signers.data)
    if f.kind == KIND_ASSERTION:
        a = &f.fields.assertion
        keys.owner[i] = keys.count
        add_key_input(keys, a.subject)      # KEY_SUBJECT
        add_key_input(keys, a.predicate)    # KEY_PREDICATE
        add_key_input(keys, a.pair)         # KEY_PAIR
        add_key_input(keys, a.object)       # KEY_OBJECT
        c.confidence[i] = a.confidence
        c.timestamp[i] = a.timestamp
        c.source_class[i] = a.source_class
        c.lifecycle[i] = a.lifecycle
        if a.parent_hash != NULL:
            c.target[i] = get_u64(a.parent_hash)
        if a.epoch != NULL:
            c.epoch[i] = get_u64(a.epoch)
    elif f.kind == KIND_VOTE:
        c.target[i] = get_u64(f.fields.vote.assertion_id)
        c.confidence[i] = f.fields.vote.weight
        c.timestamp[i] = f.fields.vote.timestamp
        if f.fields.vote.subject.data != NULL:
            keys.owner[i] = -2 - keys.count
            add_key_input(keys, f.fields.vote.subject)
    elif f.kind == KIND_EPOCH:
        c.timestamp[i] = f.fields.epoch.timestamp
    else:
        c.timestamp[i] = f.fields.envelope.timestamp


cdef inline void fill_keys(ColumnArrays* c, Py_ssize_t n, const KeyInputs* keys,
                           const uint8_t* digests) noexcept nogil:
    """The four keys of each assertion, and the placement key of each assertion and version-2
    vote, from the digests of their key inputs."""
    cdef Py_ssize_t i, j
    for i in range(n):
        j = keys.owner[i]
        if j >= 0:
            c.subject[i] = get_u64(digests + (j + KEY_SUBJECT) * ID_SIZE)
            c.predicate[i] = get_u64(digests + (j + KEY_PREDICATE) * ID_SIZE)
            c.pair[i] = get_u64(digests + (j + KEY_PAIR) * ID_SIZE)
            c.object[i] = get_u64(digests + (j + KEY_OBJECT) * ID_SIZE)
            c.place[i] = c.subject[i]
        elif j <= -2:
            c.place[i] = get_u64(digests + (-2 - j) * ID_SIZE)


def extract_columns(buffer, positions, lengths):
    """Parse the column fields of the records at buffer[positions[i]:+lengths[i]].

    The records were validated when written and their frames passed their
    checksums; they are still walked with the bounds-checked reader
    (walk_record), and one that breaks the layout raises InvalidRecord naming
    the record and the field. The four keys of each assertion are hashed in
    one stm_blake3_many call, eight inputs per lane group.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] pos = np.ascontiguousarray(positions, dtype=np.int64)
    cdef const uint32_t[::1] lens = np.ascontiguousarray(lengths, dtype=np.uint32)
    cdef Py_ssize_t n = pos.shape[0], i
    cdef ColumnArrays c
    cdef dict out = new_columns(n, &c)
    cdef Reader r
    cdef RecordFields f
    cdef Py_ssize_t bad = -1
    cdef KeyInputs keys
    cdef uint8_t* digests = NULL
    alloc_key_inputs(&keys, n, KEYS_PER_RECORD)
    try:
        with nogil:
            for i in range(n):
                if not walk_record(&r, &f, &view[0] + pos[i], lens[i]):
                    bad = i
                    break
                fill_columns(&c, i, &f, &keys)
        if bad >= 0:
            raise InvalidRecord(f"record {bad}: {parse_failure(&r)}")
        if keys.count:
            digests = <uint8_t*>malloc(keys.count * ID_SIZE)
            if digests == NULL:
                raise MemoryError()
            with nogil:
                stm_blake3_many(keys.data, keys.sizes, keys.count, digests)
                fill_keys(&c, n, &keys, digests)
    finally:
        free_key_inputs(&keys)
        free(digests)
    return out


# ----------------------------------------------------------------------------
# Judging encoded records without building objects: the write path of records
# that arrive encoded (a client's PUT, a peer's records). judge_record applies
# every rule that decode_at applies (limits, UTF-8, canonical floats, enum
# ranges, duplicates, the proof's shape), in C and without the GIL, but only
# says whether a record passes. A record that fails is then decoded, and
# decode_at raises the one message that names its field and rule: both paths
# refuse the same bytes with the same words, and the rules stay written once
# in words (decoding) and once in C (here), cross-checked by tests/test_put_encoded.py.

cdef bint utf8_valid(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 as Python decodes it: no overlong forms, surrogates or code points past U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef uint8_t b, b1
    while i < n:
        b = s[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif 0xE0 <= b <= 0xEF:
            if i + 2 >= n or (s[i + 2] & 0xC0) != 0x80:
                return False
            b1 = s[i + 1]
            if b == 0xE0:
                if not 0xA0 <= b1 <= 0xBF:
                    return False
            elif b == 0xED:
                if not 0x80 <= b1 <= 0x9F:
                    return False
            elif (b1 & 0xC0) != 0x80:
                return False
            i += 3
        elif 0xF0 <= b <= 0xF4:
            if i + 3 >= n or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            b1 = s[i + 1]
            if b == 0xF0:
                if not 0x90 <= b1 <= 0xBF:
                    return False
            elif b == 0xF4:
                if not 0x80 <= b1 <= 0x8F:
                    return False
            elif (b1 & 0xC0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef inline bint utf8_text(Span s, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """span_utf8's rule: lo..hi bytes of valid UTF-8."""
    return lo <= s.size <= hi and utf8_valid(s.data, s.size)


cdef inline bint canonical_number(double v) noexcept nogil:
    """canonical_f32's rule: not NaN, not negative zero."""
    return not isnan(v) and not (v == 0 and signbit(v))


cdef int compare_ids(const void* a, const void* b) noexcept nogil:
    return memcmp((<const uint8_t**>a)[0], (<const uint8_t**>b)[0], ID_SIZE)


cdef bint distinct_ids(const uint8_t* ids, Py_ssize_t count) noexcept nogil:
    """No ID of ids[0:count * ID_SIZE] is listed twice (sorted pointers, neighbours compared)."""
    cdef const uint8_t** order
    cdef Py_ssize_t i
    cdef bint distinct = True
    if count < 2:
        return True
    order = <const uint8_t**>malloc(count * sizeof(uint8_t*))
    if order == NULL:
        return False  # refused: decoding the record then says what it holds
    for i in range(count):
        order[i] = ids + i * ID_SIZE
    qsort(order, count, sizeof(uint8_t*), compare_ids)
    for i in range(1, count):
        if memcmp(order[i - 1], order[i], ID_SIZE) == 0:
            distinct = False
            break
    free(order)
    return distinct


cdef bint judge_signers(const RecordFields* f) noexcept nogil:
    """decode_signers: at most MAX_SIGNERS keys, none listed twice."""
    cdef Py_ssize_t i, j, count = f.signers.size // KEY_SIZE
    if count > MAX_SIGNERS:
        return False
    for i in range(count):
        for j in range(i):
            if memcmp(f.signers.data + i * KEY_SIZE, f.signers.data + j * KEY_SIZE, KEY_SIZE) == 0:
                return False
    return True


cdef bint judge_object(const AssertionFields* a) noexcept nogil:
    """decode_object."""
    cdef double number
    if a.object_tag == OBJECT_TEXT:
        return utf8_text(a.value, 0, LIMIT_TEXT)
    if a.object_tag == OBJECT_NUMBER:
        number = get_f64(a.value.data)
        return isfinite(number) and canonical_number(number)
    if a.object_tag == OBJECT_BOOLEAN:
        return a.value.data[0] <= 1
    if a.object_tag == OBJECT_REFERENCE:
        return utf8_text(a.value, 1, LIMIT_REFERENCE)
    return a.value.size <= LIMIT_BYTES


cdef bint judge_vector(Span vector) noexcept nogil:
    """decode_vector: 1..LIMIT_VECTOR finite, canonical values."""
    cdef Py_ssize_t i, n = vector.size // SIZE_F32
    cdef float value
    if n < 1 or n > LIMIT_VECTOR:
        return False
    for i in range(n):
        value = get_f32(vector.data + i * SIZE_F32)
        if not (canonical_number(value) and isfinite(value)):
            return False
    return True


cdef bint judge_assertion(const AssertionFields* a) noexcept nogil:
    """decode_assertion."""
    return (utf8_text(a.subject, 1, LIMIT_SUBJECT) and utf8_text(a.predicate, 1, LIMIT_PREDICATE)
            and judge_object(a)
            and canonical_number(a.confidence) and 0 <= a.confidence <= 1
            and a.source_class < SOURCE_CLASSES and a.lifecycle < LIFECYCLES
            and not (a.optional_mask & OPTIONAL_RESERVED)
            and (a.vector.data == NULL or judge_vector(a.vector)))


cdef bint judge_vote(const VoteFields* v) noexcept nogil:
    """decode_vote."""
    return (canonical_number(v.weight) and isfinite(v.weight)
            and (v.subject.data == NULL or utf8_text(v.subject, 1, LIMIT_SUBJECT)))


cdef bint judge_epoch(const EpochFields* e) noexcept nogil:
    """decode_epoch."""
    cdef Py_ssize_t count = e.supersedes.size // ID_SIZE
    return (utf8_text(e.name, 1, LIMIT_EPOCH_NAME) and utf8_text(e.description, 0, LIMIT_DESCRIPTION)
            and e.supersession_kind < SUPERSESSION_KINDS and count <= LIMIT_SUPERSEDES
            and distinct_ids(e.supersedes.data, count))


cdef bint judge_envelope(const RecordFields* f) noexcept nogil:
    """decode_envelope: one signer, 1..LIMIT_MEMBERS members."""
    cdef Py_ssize_t count = f.fields.envelope.members.size // ID_SIZE
    return f.signers.size == KEY_SIZE and 1 <= count <= LIMIT_MEMBERS


cdef bint judge_proof(const RecordFields* f) noexcept nogil:
    """decode_proof: 1..signer-count signatures in ascending signer order; no envelope for an envelope."""
    cdef const ProofFields* proof = &f.proof
    cdef Py_ssize_t i, count, signers = f.signers.size // KEY_SIZE
    cdef int index, last_index = -1
    if proof.kind == PROOF_SIGNATURES:
        count = signature_count(proof)
        if count < 1 or count > signers:
            return False
        for i in range(count):
            index = signature_index(proof, i)
            if index <= last_index or index >= signers:
                return False
            last_index = index
    elif proof.kind == PROOF_ENVELOPE:
        return f.kind != KIND_ENVELOPE
    return True


cdef bint judge_record(const RecordFields* f) noexcept nogil:
    """Every rule decode_at applies to a record whose walk succeeded."""
    if not judge_signers(f):
        return False
    if f.kind == KIND_ASSERTION:
        if not judge_assertion(&f.fields.assertion):
            return False
    elif f.kind == KIND_VOTE:
        if not judge_vote(&f.fields.vote):
            return False
    elif f.kind == KIND_EPOCH:
        if not judge_epoch(&f.fields.epoch):
            return False
    elif not judge_envelope(f):
        return False
    return judge_proof(f)


cdef void refuse_record(const uint8_t* data, Py_ssize_t length, Py_ssize_t index) except *:
    """Raise the InvalidRecord decode_many would raise for record `index` (judge_record refused it)."""
    cdef Py_ssize_t consumed = 0
    if length == 0:
        raise InvalidRecord(f"record {index}: empty")
    try:
        decode_at(data, length, &consumed)
    except InvalidRecord as exc:
        raise InvalidRecord(f"record {index}: {exc}") from None
    if consumed != length:
        raise InvalidRecord(f"record {index}: trailing bytes: {length - consumed} after the proof")
    raise InvalidRecord(f"record {index}: refused by the canonical checks, but it decodes "
                        "(a bug: please report it with the record's bytes)")


def validate_many(buffer, offsets):
    """Check the encoded records at buffer[offsets[i]:offsets[i+1]] as decode_many would, without objects.

    Returns (ids, columns): the (n, 32) uint8 IDs recomputed from the bytes
    (BLAKE3 of each content prefix) and the COLUMNS arrays of the records (as
    extract_columns gives them). Raises InvalidRecord with decode_many's
    message for the first record decoding would refuse. One walk per
    record, without the GIL; the IDs and the assertions' keys are hashed in
    one stm_blake3_many call.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef Py_ssize_t n = offs.shape[0] - 1, i, length
    cdef const uint8_t* base = &view[0] if view.shape[0] else NOTHING
    cdef ColumnArrays c
    cdef dict columns = new_columns(n, &c)
    ids = np.zeros((n, ID_SIZE), dtype=np.uint8)
    cdef uint8_t[:, ::1] idv = ids
    cdef Reader r
    cdef RecordFields f
    cdef Py_ssize_t bad = -1, first_key
    cdef KeyInputs keys
    cdef uint8_t* digests = NULL
    if n == 0:
        return ids, columns
    # inputs 0..n-1 are the records' contents (their IDs), then the assertions' keys
    alloc_key_inputs(&keys, n, KEYS_PER_RECORD + 1)
    try:
        keys.count = n
        with nogil:
            for i in range(n):
                length = offs[i + 1] - offs[i]
                if (length == 0 or not walk_record(&r, &f, base + offs[i], length)
                        or r.pos != length or not judge_record(&f)):
                    bad = i
                    break
                keys.data[i] = f.content.data
                keys.sizes[i] = f.content.size
                fill_columns(&c, i, &f, &keys)
        if bad >= 0:
            refuse_record(base + offs[bad], offs[bad + 1] - offs[bad], bad)
        digests = <uint8_t*>malloc(keys.count * ID_SIZE)
        if digests == NULL:
            raise MemoryError()
        with nogil:
            stm_blake3_many(keys.data, keys.sizes, keys.count, digests)
            memcpy(&idv[0, 0], digests, n * ID_SIZE)
            fill_keys(&c, n, &keys, digests)
    finally:
        free_key_inputs(&keys)
        free(digests)
    return ids, columns


def signature_entries(buffer, offsets, rows):
    """The signatures carried by the records rows[j] of buffer/offsets, for verifying them.

    Returns (keys, signatures, owner, complete): for every signature of every
    record, its signer's key ((m, 32) uint8), the signature ((m, 64) uint8)
    and the position j of its record in `rows`; and per record j whether
    every one of its declared signers (at least one) has a signature. The
    records must have passed validate_many (or come from encode_many); one
    whose header or proof does not walk raises InvalidRecord naming it.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef const int64_t[::1] chosen = np.ascontiguousarray(rows, dtype=np.int64)
    cdef Py_ssize_t n = offs.shape[0] - 1, count = chosen.shape[0], j, k, row, total = 0
    cdef Py_ssize_t signers, at = 0, signed
    cdef const uint8_t* base = &view[0] if view.shape[0] else NOTHING
    cdef Reader r
    cdef RecordFields f
    cdef uint8_t index
    for j in range(count):
        row = chosen[j]
        if row < 0 or row >= n:
            raise ValueError(f"rows[{j}] = {row} is not a record of the batch")
        if not walk_header(&r, &f, base + offs[row], offs[row + 1] - offs[row]) or not walk_proof(&r, &f):
            raise InvalidRecord(f"record {row}: {parse_failure(&r)}")
        if f.proof.kind == PROOF_SIGNATURES:
            total += signature_count(&f.proof)
    keys = np.zeros((total, KEY_SIZE), dtype=np.uint8)
    signatures = np.zeros((total, SIGNATURE_SIZE), dtype=np.uint8)
    owner = np.zeros(total, dtype=np.int64)
    complete = np.zeros(count, dtype=np.bool_)
    cdef uint8_t[:, ::1] kv = keys
    cdef uint8_t[:, ::1] sv = signatures
    cdef int64_t[::1] ov = owner
    cdef uint8_t[::1] cv = complete.view(np.uint8)
    for j in range(count):
        row = chosen[j]
        walk_header(&r, &f, base + offs[row], offs[row + 1] - offs[row])
        walk_proof(&r, &f)
        signers = f.signers.size // KEY_SIZE
        signed = 0
        if f.proof.kind == PROOF_SIGNATURES:
            for k in range(signature_count(&f.proof)):
                index = signature_index(&f.proof, k)
                if index >= signers:
                    raise InvalidRecord(f"record {row}: signatures: signer index {index} is not "
                                        f"below the signer count {signers}")
                if index == signed:     # ascending indices: each signer in turn
                    signed += 1
                memcpy(&kv[at, 0], f.signers.data + index * KEY_SIZE, KEY_SIZE)
                memcpy(&sv[at, 0], signature_bytes(&f.proof, k), SIGNATURE_SIZE)
                ov[at] = j
                at += 1
        cv[j] = signers > 0 and signed == signers
    return keys, signatures, owner, complete


def record_heads(buffer, offsets):
    """(kinds, first signer keys) of the encoded records: only their headers are read.

    kinds is uint8 (RecordKind), first signer keys an (n, 32) uint8 array
    (zeros for a record without signers). For a server's admission checks
    (quotas, the kind a request allows) before the records are validated;
    a header that does not parse raises InvalidRecord naming the record.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef Py_ssize_t n = offs.shape[0] - 1, i, length
    cdef const uint8_t* base = &view[0] if view.shape[0] else NOTHING
    cdef Reader r
    cdef RecordFields f
    kinds = np.zeros(n, dtype=np.uint8)
    signers = np.zeros((n, KEY_SIZE), dtype=np.uint8)
    cdef uint8_t[::1] kv = kinds
    cdef uint8_t[:, ::1] sv = signers
    for i in range(n):
        length = offs[i + 1] - offs[i]
        if length == 0:
            raise InvalidRecord(f"record {i}: empty")
        if not walk_header(&r, &f, base + offs[i], length):
            raise InvalidRecord(f"record {i}: {parse_failure(&r)}")
        kv[i] = f.kind
        if f.signers.size:
            memcpy(&sv[i, 0], f.signers.data, KEY_SIZE)
    return kinds, signers


def envelope_proofs(buffer, offsets):
    """For each record: (envelope ID, its single signer key, ok flag) as arrays.

    ok is False unless the record has exactly one signer and an envelope proof
    that ends the record; the IDs and keys of other records are zero. Only the
    header and the proof are walked: content_length says where the proof is.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef Py_ssize_t i, n = offs.shape[0] - 1, length
    cdef Reader r
    cdef RecordFields f
    envelopes = np.zeros((n, ID_SIZE), dtype=np.uint8)
    signers = np.zeros((n, KEY_SIZE), dtype=np.uint8)
    ok = np.zeros(n, dtype=np.bool_)
    cdef uint8_t[:, ::1] ev = envelopes
    cdef uint8_t[:, ::1] sv = signers
    cdef uint8_t[::1] okv = ok.view(np.uint8)
    with nogil:
        for i in range(n):
            length = offs[i + 1] - offs[i]
            walk_header(&r, &f, &view[0] + offs[i], length)
            if (not walk_proof(&r, &f) or r.pos != length or f.signers.size != KEY_SIZE
                    or f.proof.kind != PROOF_ENVELOPE):
                continue
            memcpy(&sv[i, 0], f.signers.data, KEY_SIZE)
            memcpy(&ev[i, 0], f.proof.envelope, ID_SIZE)
            okv[i] = 1
    return envelopes, signers, ok


def vote_assertions(buffer, offsets, rows):
    """The assertion IDs that the vote records rows[j] of buffer/offsets vote on, (m, 32) uint8.

    The records must have passed validate_many (or come from encode_many);
    one that is not a vote, or does not walk, raises InvalidRecord naming it.
    """
    cdef const uint8_t[::1] view = buffer
    cdef const int64_t[::1] offs = checked_offsets(offsets, view.shape[0])
    cdef const int64_t[::1] chosen = np.ascontiguousarray(rows, dtype=np.int64)
    cdef Py_ssize_t n = offs.shape[0] - 1, count = chosen.shape[0], j, row
    cdef const uint8_t* base = &view[0] if view.shape[0] else NOTHING
    cdef Reader r
    cdef RecordFields f
    out = np.zeros((count, ID_SIZE), dtype=np.uint8)
    cdef uint8_t[:, ::1] ov = out
    for j in range(count):
        row = chosen[j]
        if row < 0 or row >= n:
            raise ValueError(f"rows[{j}] = {row} is not a record of the batch")
        if not walk_record(&r, &f, base + offs[row], offs[row + 1] - offs[row]):
            raise InvalidRecord(f"record {row}: {parse_failure(&r)}")
        if f.kind != KIND_VOTE:
            raise InvalidRecord(f"record {row}: not a vote (kind {f.kind})")
        memcpy(&ov[j, 0], f.fields.vote.assertion_id, ID_SIZE)
    return out


def id_list(ids):
    """The rows of an (n, 32) uint8 array as a list of 32-byte bytes objects."""
    cdef const uint8_t[:, ::1] view = np.ascontiguousarray(ids, dtype=np.uint8)
    cdef Py_ssize_t i, n = view.shape[0]
    if n and view.shape[1] != ID_SIZE:
        raise ValueError(f"ids: expected 32 bytes per row, got {view.shape[1]}")
    cdef list out = [None] * n
    for i in range(n):
        out[i] = PyBytes_FromStringAndSize(<const char*>&view[i, 0], ID_SIZE)
    return out
