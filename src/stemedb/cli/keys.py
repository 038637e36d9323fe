"""`stemedb keygen`, and reading the key files it writes.

Owns: the key file format ({"type": "ed25519", "seed": hex, "public_key":
hex}, mode 0600). Must never: overwrite a key file without --force, or
leave a new one readable by others even for a moment.

Error handling: an existing file (without --force), a missing directory or
a file that is not a key file raise CliError / OSError, printed as one line.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import stemedb
from stemedb.cli.core import EXIT_OK, CliError


def register(commands: Any) -> None:
    keygen = commands.add_parser("keygen", help="write a new signing key file (owner-only)")
    keygen.add_argument("output", help="key file to create")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(handler=run_keygen)


def run_keygen(args: argparse.Namespace, context: Any) -> int:
    """Write a new Ed25519 signing key, readable by its owner only; print its public key."""
    signer = stemedb.Signer.generate()
    document = {"type": "ed25519", "seed": signer.seed.hex(), "public_key": signer.public_key.hex()}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        raise CliError(f"{args.output} exists; pass --force to overwrite it") from None
    except FileNotFoundError:
        directory = os.path.dirname(args.output) or "."
        raise CliError(f"cannot create {args.output}: the directory {directory} does not exist") from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(document, handle)
        handle.write("\n")
    print(signer.public_key.hex())
    return EXIT_OK


def load_signer(path: str) -> stemedb.Signer:
    """The Signer in a key file written by `stemedb keygen`."""
    try:
        with open(path) as handle:
            document = json.load(handle)
        return stemedb.Signer.from_seed(bytes.fromhex(document["seed"]))
    except FileNotFoundError:
        raise CliError(f"--key: {path}: no such key file (stemedb keygen {path} makes one)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"--key: {path}: not a StemeDB key file ({exc})") from None
