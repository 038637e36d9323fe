# Header of the canonical record codec (docs/format.md, "Record encoding").
#
# The record layout is written down here once: the constants below, and one
# struct per part of a record holding what a single bounds-checked walk over
# the bytes found (walk_header, walk_body, walk_proof in _codec.pyx).
# Decoding builds objects from these structs, column extraction and the
# envelope-proof reader read fixed-width fields from them, and the client's
# group signing (_protocol.envelope_members) rewrites records with them, so no
# other code knows where a field sits. Byte order lives in _bytes.pxd.
#
# The record classes keep their fields as C values and canonical byte
# strings so that batch encoding is a memcpy per field, never a Python call.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    FORMAT_VERSION = 1          # "Header": first byte of every record's content
    VOTE_FORMAT_VERSION = 2     # "Header": a vote that carries its assertion's subject
    HEADER_SIZE = 6             # "Header": version:u8 kind:u8 content_length:u32
    KEY_SIZE = 32               # "Signers": an Ed25519 public key
    MAX_SIGNERS = 16            # "Signers", "Limits": signer_count is 0..16
    ID_SIZE = 32                # "ID": BLAKE3-256 of the content
    SOURCE_HASH_SIZE = 32       # "Body: Assertion": source_hash, BLAKE3 of the evidence
    VISUAL_HASH_SIZE = 8        # "Body: Assertion": visual_hash
    SIGNATURE_SIZE = 64         # "Proof": an Ed25519 signature
    SIGNATURE_ENTRY_SIZE = 1 + SIGNATURE_SIZE  # "Proof": signer_index:u8 signature:64B


cdef enum RecordKind:           # "Header": kind (stemedb.RecordKind in Python)
    KIND_ASSERTION = 1
    KIND_VOTE = 2
    KIND_EPOCH = 3
    KIND_ENVELOPE = 4


cdef enum ObjectTag:            # "Body: Assertion": object_tag
    OBJECT_TEXT = 1             # len:u32 + UTF-8
    OBJECT_NUMBER = 2           # f64
    OBJECT_BOOLEAN = 3          # u8 0 or 1
    OBJECT_REFERENCE = 4        # len:u16 + UTF-8
    OBJECT_BYTES = 5            # len:u32 + raw bytes


cdef enum OptionalField:        # "Body: Assertion": bits of optional_mask, in field order
    HAS_PARENT_HASH = 1         # parent_hash:32B
    HAS_EPOCH = 2               # epoch:32B
    HAS_VISUAL_HASH = 4         # visual_hash:8B
    HAS_VECTOR = 8              # vector_len:u16 vector:f32 x vector_len
    OPTIONAL_RESERVED = 0xF0    # must be zero


cdef enum ProofKind:            # "Proof": proof_kind
    PROOF_NONE = 0              # unsigned (a draft, or handed to a group-signing writer)
    PROOF_SIGNATURES = 1        # one Ed25519 signature per declared signer
    PROOF_ENVELOPE = 2          # listed in the envelope whose ID follows


# ----------------------------------------------------------------------------
# What one walk over an encoded record finds. Spans and pointers point into
# the parsed bytes and are valid only while those bytes are; nothing here is
# judged yet (limits, UTF-8, canonical floats are decoding's checks).

cdef struct Span:               # a run of bytes inside the record
    const uint8_t* data
    Py_ssize_t size


cdef struct AssertionFields:    # "Body: Assertion (kind 1)"
    Span subject                # UTF-8 (without its u16 length)
    Span predicate              # UTF-8 (without its u16 length)
    Span pair                   # subject_len, subject, predicate_len, predicate: the pair key's bytes
    Span object                 # object_tag and the value as encoded: the object key's bytes
    uint8_t object_tag          # ObjectTag
    Span value                  # the value without tag or length prefix: text, f64, u8, UTF-8, bytes
    float confidence
    uint64_t timestamp          # microseconds since the Unix epoch
    uint8_t source_class        # SourceClass value
    uint8_t lifecycle           # Lifecycle value
    const uint8_t* source_hash  # SOURCE_HASH_SIZE bytes
    uint8_t optional_mask       # OptionalField bits
    const uint8_t* parent_hash  # ID_SIZE bytes, or NULL when its bit is clear
    const uint8_t* epoch        # ID_SIZE bytes, or NULL
    const uint8_t* visual_hash  # VISUAL_HASH_SIZE bytes, or NULL
    Span vector                 # vector_len packed f32 values; data NULL when absent


cdef struct VoteFields:         # "Body: Vote (kind 2)"
    const uint8_t* assertion_id # ID_SIZE bytes
    float weight
    uint64_t timestamp
    Span subject                # version 2: UTF-8 (without its u16 length); data NULL in version 1


cdef struct EpochFields:        # "Body: Epoch (kind 3)"
    Span name                   # UTF-8 (without its u16 length)
    Span description            # UTF-8 (without its u32 length)
    uint64_t timestamp
    uint8_t supersession_kind   # SupersessionKind value
    Span supersedes             # supersedes_count x ID_SIZE bytes


cdef struct EnvelopeFields:     # "Body: Envelope (kind 4)"
    uint64_t timestamp
    Span members                # member_count x ID_SIZE bytes


cdef union BodyFields:          # the one that RecordFields.kind names
    AssertionFields assertion
    VoteFields vote
    EpochFields epoch
    EnvelopeFields envelope


cdef struct ProofFields:        # "Proof"
    uint8_t kind                # ProofKind
    Span signatures             # PROOF_SIGNATURES: count x (signer_index:u8 signature:64B)
    const uint8_t* envelope     # PROOF_ENVELOPE: ID_SIZE bytes; else NULL


cdef struct RecordFields:       # one encoded record: content (header signers body) then proof
    uint8_t version             # FORMAT_VERSION
    uint8_t kind                # RecordKind
    Span content                # the hashed prefix, header included (content_length bytes)
    Span signers                # signer_count x KEY_SIZE bytes, in declared order
    Span body                   # the kind's body as bytes: after the signers, to the content's end
    BodyFields fields           # the body's fields, for `kind`
    ProofFields proof


cdef enum ParseFailure:         # why a walk stopped (the first failure; the walk then stops reading)
    PARSE_OK = 0
    PARSE_TRUNCATED = 1         # a field needs more bytes than are left
    PARSE_VERSION = 2           # version is not FORMAT_VERSION
    PARSE_KIND = 3              # kind is not a RecordKind
    PARSE_CONTENT_BEYOND = 4    # content_length is larger than the record
    PARSE_CONTENT_SHORT = 5     # content_length leaves no room for the header and signer_count
    PARSE_CONTENT_MISMATCH = 6  # the body's fields do not end at content_length
    PARSE_OBJECT_TAG = 7        # object_tag is not an ObjectTag
    PARSE_PROOF_KIND = 8        # proof_kind is not a ProofKind
    PARSE_VERSION_KIND = 9      # version 2 on a record that is not a vote


cdef struct Reader:             # bytes being walked; every read checks `end`
    const uint8_t* base         # first byte of the record
    Py_ssize_t pos              # offset of the next byte to read
    Py_ssize_t end              # one past the last readable byte (the content's end in the body)
    Py_ssize_t length           # bytes of the whole record as given
    ParseFailure failure        # PARSE_OK until a read or rule fails
    const char* field           # the field that failed
    Py_ssize_t at               # the offset where it failed
    Py_ssize_t needed           # PARSE_TRUNCATED: bytes the field needed; else the offending value
    Py_ssize_t left             # PARSE_TRUNCATED: bytes that were left


# For other modules (_protocol's group signing). False means r holds a failure.
cdef bint parse_header(Reader* r, RecordFields* f, const uint8_t* data,
                       Py_ssize_t length) noexcept nogil      # header and signers
cdef bint parse_proof(Reader* r, RecordFields* f) noexcept nogil  # after parse_header; body skipped
cdef str parse_failure(const Reader* r)                      # the InvalidRecord message for it
cdef uint8_t* write_header(uint8_t* out, uint8_t version, uint8_t kind, uint32_t content_length,
                           uint8_t signer_count) noexcept nogil  # returns where the keys go


cdef class Record:
    cdef tuple _signers         # tuple[bytes(32)], in declared order; part of the ID
    cdef tuple _signatures      # tuple[(signer_index, bytes(64))], ascending index; not in the ID
    cdef bytes _envelope        # envelope ID when the proof is an envelope, else None
    cdef uint64_t _timestamp    # microseconds since the Unix epoch
    cdef bytes _content_cache   # canonical content, computed once
    cdef bytes _id_cache        # BLAKE3 of the content, computed once

    cdef Py_ssize_t body_size(self)
    cdef uint8_t* write_body(self, uint8_t* out)
    cdef uint8_t kind_code(self)
    cdef uint8_t header_version(self)
    cdef Py_ssize_t content_size(self)
    cdef uint8_t* write_content(self, uint8_t* out)
    cdef Py_ssize_t proof_size(self)
    cdef uint8_t* write_proof(self, uint8_t* out)
    cdef void copy_base_into(self, Record other)


cdef class AssertionCore(Record):
    cdef bytes _subject         # UTF-8, 1..1024 bytes
    cdef bytes _predicate       # UTF-8, 1..256 bytes
    cdef uint8_t _tag           # ObjectTag
    cdef bytes _object_bytes    # text / reference UTF-8, or raw bytes; None for number/boolean
    cdef double _number         # OBJECT_NUMBER value; 1.0/0.0 for OBJECT_BOOLEAN
    cdef float _confidence      # in [0, 1], never NaN, never -0.0
    cdef uint8_t _source_class  # SourceClass value, 0..6
    cdef uint8_t _lifecycle     # Lifecycle value, 0..4
    cdef bytes _source_hash     # 32 bytes
    cdef bytes _parent_hash     # 32 bytes or None
    cdef bytes _epoch           # 32 bytes or None
    cdef bytes _visual_hash     # 8 bytes or None
    cdef bytes _vector          # packed little-endian f32, or None


cdef class VoteCore(Record):
    cdef bytes _assertion_id    # 32 bytes
    cdef float _weight          # finite
    cdef bytes _subject         # version 2: the voted assertion's subject, UTF-8, 1..1024 bytes; else None


cdef class EpochCore(Record):
    cdef bytes _name            # UTF-8, 1..256 bytes
    cdef bytes _description     # UTF-8, 0..65536 bytes
    cdef uint8_t _kind          # SupersessionKind value, 0..2
    cdef tuple _supersedes      # tuple[bytes(32)]


cdef class EnvelopeCore(Record):
    cdef bytes _members         # concatenated member IDs, 32 bytes each


# Decode one record from data[0:length] (checks as `decode`); *consumed is set to the
# bytes it used, which the caller compares with length (trailing bytes are an error).
cdef Record decode_at(const uint8_t* data, Py_ssize_t length, Py_ssize_t* consumed)
