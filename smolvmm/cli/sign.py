"""``smolvmm keygen|sign``: Ed25519 keys and signed bundles (spec/smolmachine.md §4.2)."""

from __future__ import annotations

import argparse

import smolvmm

KEY_FORMAT = (
    "Key files are PEM as OpenSSL writes them: KEY is an unencrypted PKCS#8 private key (mode 0600),"
    " KEY.pub its SubjectPublicKeyInfo public key; put .pub files in a directory for --trusted-keys."
)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Declare the arguments of ``name`` (keygen or sign)."""
    parser.epilog = KEY_FORMAT
    if name == "keygen":
        parser.add_argument("key", metavar="KEY", help="where to write the private key (KEY.pub gets the public key)")
        return
    parser.add_argument("--key", required=True, metavar="KEY", help="the private key to sign with (from keygen)")
    parser.add_argument(
        "-o", "--output", metavar="OUT", help="write the signed bundle to OUT (default: a new file renamed over BUNDLE)"
    )
    parser.add_argument("bundle", metavar="BUNDLE")


def run(name: str, args: argparse.Namespace) -> int:
    """Run ``name``; a bad key or bundle is one line and exit status 1."""
    if name == "keygen":
        print(f"{args.key}: {smolvmm.generate_signing_key(args.key)} (public key in {args.key}.pub)")
        return 0
    signer = smolvmm.sign_bundle(args.bundle, args.key, args.output)
    print(f"{args.output or args.bundle}: signed by {signer}")
    return 0
