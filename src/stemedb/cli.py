"""The `stemedb` command.

Owns: argument parsing and human/JSON output for every subcommand. Must never:
hold logic that the Python API does not also offer (each command is a thin
layer over stemedb's public functions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import stemedb


def _demo(args: argparse.Namespace) -> int:
    """Create, sign, encode, decode and verify a few records, showing each step."""
    alice = stemedb.Signer.from_seed(b"\x01" * 32)
    bob = stemedb.Signer.from_seed(b"\x02" * 32)
    out = sys.stdout
    print("StemeDB demo: claims, not facts.\n", file=out)
    print(f"signers: alice {alice.public_key.hex()[:16]}…  bob {bob.public_key.hex()[:16]}…\n",
          file=out)
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
        assert back == claim
        print(f"{claim.subject} — {claim.predicate} — {claim.object!r}", file=out)
        print(f"  id         {claim.id.hex()}", file=out)
        print(f"  encoded    {len(data)} bytes: {data[:24].hex()}…", file=out)
        print(f"  source     {claim.source_class.name.lower()}, confidence {claim.confidence:.2f}, "
              f"lifecycle {claim.lifecycle.name.lower()}", file=out)
        print("  signature  verified\n", file=out)
    vote = stemedb.Vote(claims[0], 1.0).sign(bob)
    vote.verify()
    print(f"bob votes for {claims[0].id.hex()[:16]}…: vote id {vote.id.hex()[:16]}…", file=out)
    members, envelope = alice.sign_batch(
        [stemedb.Assertion(f"sensor-{i}", "reading", 20.0 + i) for i in range(1000)]
    )
    stemedb.verify_batch(envelope, members)
    print(f"signed batch: 1000 records under one signature (envelope {envelope.id.hex()[:16]}…), "
          "verified\n", file=out)
    if args.json:
        print(json.dumps([c.to_dict() for c in claims], indent=1), file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemedb", description=stemedb.__doc__)
    parser.add_argument("--version", action="version", version=f"stemedb {stemedb.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="create, sign, encode and verify a few records")
    demo.add_argument("--json", action="store_true", help="also print the records as JSON")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except stemedb.StemeError as exc:
        print(f"stemedb: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
