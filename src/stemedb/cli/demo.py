"""`stemedb demo`: the record layer shown step by step, without a store.

Owns: nothing but its output. Must never: touch a store or the network.
"""

from __future__ import annotations

import argparse
from typing import Any

import stemedb
from stemedb.cli.core import EXIT_OK, add_json_option
from stemedb.cli.formats import dumps, float32_text, object_text


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="create, sign, encode and verify a few records")
    add_json_option(demo, "also print the records as JSON")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace, context: Any) -> int:
    """Create, sign, encode, decode and verify a few records, showing each step."""
    alice = stemedb.Signer.from_seed(b"\x01" * 32)
    bob = stemedb.Signer.from_seed(b"\x02" * 32)
    print("StemeDB demo: claims, not facts.\n")
    print(f"signers: alice {alice.public_key.hex()[:16]}…  bob {bob.public_key.hex()[:16]}…\n")
    claims = [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.9,
                          source_class="clinical", lifecycle="approved").sign(alice),
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.4,
                          source_class="anecdotal").sign(bob),
        stemedb.Assertion("aspirin", "max_daily_mg", 4000, confidence=0.8,
                          source_class="regulatory").sign(alice),
    ]
    for claim in claims:
        data = claim.encode()
        back = stemedb.decode(data)
        back.verify()
        if back != claim:
            raise stemedb.CorruptionError(f"record {claim.id.hex()} did not survive its encoding")
        print(f"{claim.subject} — {claim.predicate} — {object_text(claim.object)}")
        print(f"  id         {claim.id.hex()}")
        print(f"  encoded    {len(data)} bytes: {data[:24].hex()}…")
        print(f"  source     {claim.source_class.name.lower()}, confidence "
              f"{float32_text(claim.confidence)}, lifecycle {claim.lifecycle.name.lower()}")
        print("  signature  verified\n")
    vote = stemedb.Vote(claims[0], 1.0).sign(bob)
    vote.verify()
    print(f"bob votes for {claims[0].id.hex()[:16]}…: vote id {vote.id.hex()[:16]}…")
    members, envelope = alice.sign_batch(
        [stemedb.Assertion(f"sensor-{i}", "reading", 20.0 + i) for i in range(1000)]
    )
    stemedb.verify_batch(envelope, members)
    print(f"signed batch: 1000 records under one signature (envelope {envelope.id.hex()[:16]}…), "
          "verified\n")
    if args.json:
        print(dumps([c.to_dict() for c in claims]))
    return EXIT_OK
