# Header of the canonical record codec (docs/format.md, "Record encoding").
#
# The record classes keep their fields as C values and canonical byte
# strings so that batch encoding is a memcpy per field, never a Python call.

from libc.stdint cimport uint8_t, uint64_t


cdef enum:
    FORMAT_VERSION = 1          # first byte of every record's content
    HEADER_SIZE = 6             # version:u8 kind:u8 content_length:u32
    KEY_SIZE = 32               # Ed25519 public key
    SIGNATURE_SIZE = 64         # Ed25519 signature
    ID_SIZE = 32                # BLAKE3-256
    MAX_SIGNERS = 16


cdef enum RecordKind:
    KIND_ASSERTION = 1
    KIND_VOTE = 2
    KIND_EPOCH = 3
    KIND_ENVELOPE = 4


cdef enum ObjectTag:
    OBJECT_TEXT = 1
    OBJECT_NUMBER = 2
    OBJECT_BOOLEAN = 3
    OBJECT_REFERENCE = 4
    OBJECT_BYTES = 5


cdef enum ProofKind:
    PROOF_NONE = 0              # unsigned (a draft, or handed to a group-signing writer)
    PROOF_SIGNATURES = 1        # one Ed25519 signature per declared signer
    PROOF_ENVELOPE = 2          # listed in the envelope whose ID follows


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


cdef class EpochCore(Record):
    cdef bytes _name            # UTF-8, 1..256 bytes
    cdef bytes _description     # UTF-8, 0..65536 bytes
    cdef uint8_t _kind          # SupersessionKind value, 0..2
    cdef tuple _supersedes      # tuple[bytes(32)]


cdef class EnvelopeCore(Record):
    cdef bytes _members         # concatenated member IDs, 32 bytes each
