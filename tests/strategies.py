"""Hypothesis strategies that build every kind of record (shared by the tests)."""

from __future__ import annotations

from hypothesis import strategies as st

import stemedb

SEEDS = [bytes([i]) * 32 for i in range(1, 4)]
SIGNERS = [stemedb.Signer.from_seed(seed) for seed in SEEDS]

text = st.text(min_size=1, max_size=40).filter(lambda s: 1 <= len(s.encode("utf-8", "surrogatepass")) <= 256)
utf8_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
hash32 = st.binary(min_size=32, max_size=32)
timestamps = st.integers(min_value=0, max_value=2**64 - 1)
f32_unit = st.floats(min_value=0.0, max_value=1.0, width=32)

objects = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.booleans(),
    st.binary(max_size=60),
    utf8_text.map(stemedb.Ref),
)


@st.composite
def assertions(draw: st.DrawFn) -> stemedb.Assertion:
    return stemedb.Assertion(
        draw(utf8_text),
        draw(utf8_text),
        draw(objects),
        confidence=draw(f32_unit),
        timestamp=draw(timestamps),
        source_class=draw(st.sampled_from(list(stemedb.SourceClass))),
        lifecycle=draw(st.sampled_from(list(stemedb.Lifecycle))),
        source_hash=draw(hash32),
        parent_hash=draw(st.none() | hash32),
        epoch=draw(st.none() | hash32),
        visual_hash=draw(st.none() | st.binary(min_size=8, max_size=8)),
        vector=draw(st.none() | st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                         min_size=1, max_size=8)),
    )


@st.composite
def votes(draw: st.DrawFn) -> stemedb.Vote:
    # subject None: a format version 1 vote; else version 2 (it carries its assertion's subject)
    return stemedb.Vote(draw(hash32), draw(st.floats(width=32, allow_nan=False, allow_infinity=False)),
                        timestamp=draw(timestamps), subject=draw(st.none() | utf8_text))


@st.composite
def epochs(draw: st.DrawFn) -> stemedb.Epoch:
    return stemedb.Epoch(
        draw(utf8_text),
        draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)),
        supersedes=draw(st.lists(hash32, max_size=3, unique=True)),
        supersession_kind=draw(st.sampled_from(list(stemedb.SupersessionKind))),
        timestamp=draw(timestamps),
    )


@st.composite
def envelopes(draw: st.DrawFn) -> stemedb.Envelope:
    signer = draw(st.sampled_from(SIGNERS))
    members = draw(st.lists(hash32, min_size=1, max_size=5))
    return stemedb.Envelope(signer.public_key, members, timestamp=draw(timestamps)).sign(signer)


unsigned_records = st.one_of(assertions(), votes(), epochs())


@st.composite
def signed_records(draw: st.DrawFn) -> object:
    record = draw(unsigned_records)
    chosen = draw(st.lists(st.sampled_from(SIGNERS), min_size=1, max_size=3, unique_by=id))
    record = record._with_proof([s.public_key for s in chosen], (), None)
    for signer in chosen:
        record = record.sign(signer)
    return record


any_record = st.one_of(unsigned_records, signed_records(), envelopes())
